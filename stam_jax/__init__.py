"""stam-jax: STAM (Sharir et al., 2021) video classification in JAX/Flax.

Exports are imported on first use, so that light modules (the video decoding that runs in
worker processes) do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "STAM": "stam_jax.model",
    "VARIANTS": "stam_jax.variants",
    "create_model": "stam_jax.variants",
    "model_config": "stam_jax.variants",
    "model_from_config": "stam_jax.variants",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stam_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The exports are listed although not yet imported: `help(stam_jax)` documents them.
    return sorted({*globals(), *_EXPORTS})
