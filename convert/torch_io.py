"""Reading and writing official-format `.pth` files safely (needs torch, the `torch` extra).

A `.pth` is a pickle. It is only ever opened with `torch.load(weights_only=True)`, whose
unpickler accepts tensors and plain containers and refuses any other global, so a file that would
run code on load is refused before that code runs.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.mapping import ConversionError


class UnsafeCheckpointError(ConversionError):
    """The file's pickle references code (a global outside the tensor allow-list)."""


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError(
            "reading or writing .pth files needs PyTorch: pip install 'stam-jax[torch]' "
            "(or pip install torch==2.13.0 for a CPU build)."
        ) from e
    return torch


def _torch_load(path: Path) -> Any:
    torch = _torch()
    # mmap keeps a large checkpoint out of anonymous memory (tensors are views of the file);
    # the legacy non-zip format cannot be mapped, and is still read weights-only.
    return torch.load(
        path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
    )


def _unpickler_detail(text: str) -> str:
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
            return detail or "unrecognised pickle content"
    return text.splitlines()[0] if text else "unrecognised pickle content"


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads the STAM state dict of an official-format checkpoint as numpy arrays.

    Accepts `{'model': sd}`, `{'state_dict': sd}` and a bare state dict. Values are zero-copy
    views where the dtype allows (bfloat16 tensors become `ml_dtypes.bfloat16` arrays).

    Args:
      path: the `.pth` file.

    Returns:
      key -> numpy array, keys as stored (a `module.` prefix is left for the mapping to strip).

    Raises:
      ConversionError: missing, empty, truncated or non-checkpoint file, or no state dict.
      UnsafeCheckpointError: the pickle would run code; nothing from it was executed.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; expected an official .pth file.")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    size = path.stat().st_size
    if size == 0:
        raise ConversionError(f"{path} is empty (0 bytes): the download or copy did not finish.")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "Unsupported global" in detail:
            raise UnsafeCheckpointError(
                f"{path} was refused: its pickle calls code outside the tensor allow-list "
                f"({detail}), so loading it could run that code. Nothing from it was executed. "
                "Only convert checkpoints from sources you trust, re-saved as plain state dicts "
                "(torch.save({'model': model.state_dict()}, path))."
            ) from None
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint ({size} bytes): {detail}."
        ) from None
    except Exception as e:  # torch raises many types for damaged files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{path} could not be read as a PyTorch checkpoint ({size} bytes; "
            f"{type(e).__name__}: {first}). It may be truncated or corrupt, or not a .pth at "
            "all: download it again and compare its size."
        ) from None
    return _as_numpy(_find_state_dict(obj, path))


def _find_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    torch = _torch()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConversionError(
        f"{path} holds no state dict: expected {{'model': sd}}, {{'state_dict': sd}} or a bare "
        f"dict of tensors; found top-level keys {sorted(map(str, obj))[:20]}."
    )


def _as_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    torch = _torch()
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor."
            )
        value = value.detach()
        if value.dtype == torch.bfloat16:
            out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif value.is_floating_point():
            out[key] = value.numpy()
        else:
            raise ConversionError(
                f"state dict entry {key!r} has dtype {value.dtype}, not floating."
            )
    return out


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes `{'model': state_dict}` as the official code saves it.

    Args:
      state_dict: key -> numpy array (float32, float16 or bfloat16).
      path: destination `.pth`; written to a temporary name and renamed, so a crash never
        leaves a half-written file under the final name.
    """
    torch = _torch()
    tensors = {}
    for key, value in state_dict.items():
        if value.dtype == ml_dtypes.bfloat16:
            tensors[key] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": tensors}, tmp)
    os.replace(tmp, path)
