"""Conversion between official STAM `.pth` checkpoints and stam-jax (orbax) checkpoints.

    python -m convert stam_16.pth ckpt/stam_16          # official -> stam-jax
    python -m convert.to_torch ckpt/stam_16 out.pth     # stam-jax -> official

The conversions live in `convert.core`, the key/layout table in `convert.mapping`, `.pth`
reading and writing in `convert.torch_io`. The exports below are imported on first use, so that
`python -m convert` has its Ctrl-C handling in place before JAX is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

TORCH_DTYPES = ("float32", "float16", "bfloat16")

if TYPE_CHECKING:  # what type checkers and editors see; at run time, `__getattr__` below
    from convert.core import convert_checkpoint, export_checkpoint, official_notes
    from convert.mapping import ConversionError, Report, flax_to_torch, torch_to_flax

_EXPORTS = {
    "ConversionError": "convert.mapping",
    "Report": "convert.mapping",
    "convert_checkpoint": "convert.core",
    "export_checkpoint": "convert.core",
    "flax_to_torch": "convert.mapping",
    "official_notes": "convert.core",
    "torch_to_flax": "convert.mapping",
}
__all__ = [
    "TORCH_DTYPES",
    "ConversionError",
    "Report",
    "convert_checkpoint",
    "export_checkpoint",
    "flax_to_torch",
    "official_notes",
    "torch_to_flax",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
