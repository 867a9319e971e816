"""The two conversions: official `.pth` -> stam-jax checkpoint, and back.

Imported by `convert` on first use of its exports (this module imports JAX; the command-line
tools import it only once their Ctrl-C handling is in place).
"""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from convert import TORCH_DTYPES
from convert.mapping import ConversionError, Report, flax_to_torch, torch_to_flax
from stam_jax import checkpoints
from stam_jax.paths import unwritable
from stam_jax.variants import model_from_config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(
    pth: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    strict: bool = False,
    overwrite: bool = False,
    num_heads: int | None = None,
    temporal_heads: int | None = None,
    num_frames: int | None = None,
) -> tuple[Path, dict[str, Any], Report]:
    """Converts an official `.pth` into a stam-jax checkpoint directory.

    Args:
      pth: official checkpoint (`{'model': sd}`, `{'state_dict': sd}` or a bare state dict).
      out_dir: destination directory (must not exist unless `overwrite`).
      strict: refuse unexpected keys instead of warning.
      overwrite: replace an existing `out_dir` if it is a stam-jax checkpoint or empty
        (`checkpoints.check_destination`); the old one is kept until the new one is complete.
      num_heads: ViT heads if not width/64 (heads are not visible in tensor shapes).
      temporal_heads: temporal heads if not 8.
      num_frames: T, needed only for mean-aggregate checkpoints.

    Returns:
      (checkpoint path, inferred model config, report of warnings).

    Raises:
      ConversionError: the `.pth` cannot be read or converted (naming the file or keys), or
        `out_dir` ends in `.pth` / `.pt` (the two commands mixed up).
      checkpoints.CheckpointError: `out_dir` cannot or must not be written.
    """
    from convert.torch_io import load_state_dict

    pth = Path(pth)
    # Checked before the (possibly long) read so no work is lost to a typo or a bad output path.
    if str(out_dir).lower().endswith((".pth", ".pt")):  # the two commands mixed up
        raise ConversionError(
            f"{out_dir} names a PyTorch file, but python -m convert writes a stam-jax checkpoint "
            "directory: name a directory (e.g. ckpt/stam_16); python -m convert.to_torch writes "
            ".pth files."
        )
    out = checkpoints.check_destination(out_dir, overwrite=overwrite)
    state_dict = load_state_dict(pth)
    config, params, report = torch_to_flax(
        state_dict,
        strict=strict,
        num_heads=num_heads,
        temporal_heads=temporal_heads,
        num_frames=num_frames,
    )
    # Release the file mapping before saving: at most about two copies of the weights are
    # ever resident (BENCHMARKS.md, converter).
    del state_dict
    gc.collect()
    metadata = {
        "source": pth.name,
        "source_sha256": _sha256(pth),
        "source_dtypes": report.source_dtypes,
        "zero_filled": report.zero_filled,
        "ignored_keys": report.unexpected,
        "non_finite": report.non_finite,
    }
    path = checkpoints.save(
        out, model_from_config(config), params, metadata=metadata, overwrite=overwrite
    )
    return path, config, report


def export_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_pth: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, str, list[str]]:
    """Writes a stam-jax checkpoint back as an official `{'model': state_dict}` `.pth`.

    Args:
      ckpt_dir: a stam-jax checkpoint directory.
      out_pth: destination file; missing parent directories are created.
      dtype: tensor dtype; default: the dtype the checkpoint was converted from, else float32.
      overwrite: replace an existing file.

    Returns:
      (written path, dtype used, notes): the notes are `official_notes` of the checkpoint
      read, what of its model the `.pth` cannot carry (`python -m convert.to_torch` prints
      them); empty for an official model.

    Raises:
      ConversionError: `out_pth` cannot be written (checked before the checkpoint is read), a
        bad `dtype`, or float16 for params beyond its range (+-65504), which it would make Inf.
      checkpoints.CheckpointError: `ckpt_dir` is not a readable stam-jax checkpoint.
    """
    from convert.torch_io import save_state_dict

    out = _check_output_file(Path(out_pth), overwrite)
    config = checkpoints.read_config(ckpt_dir)
    if dtype is None:
        sources = config["metadata"].get("source_dtypes", [])
        dtype = sources[0] if len(sources) == 1 and sources[0] in TORCH_DTYPES else "float32"
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {TORCH_DTYPES}.")
    model = model_from_config(config["model"])
    params = checkpoints.read_params(ckpt_dir, model, config=config)
    if dtype == "float16":  # the .pth would hold Inf where the checkpoint holds large values
        over = checkpoints.out_of_range_params(params, np.float16)
        if over:
            raise ConversionError(
                f"{checkpoints.out_of_range_message(ckpt_dir, over, np.float16)}; write the "
                ".pth in bfloat16 (float32's range) or float32 (--dtype, dtype= from Python)."
            )
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    state_dict = flax_to_torch(model, params, np_dtype, consume=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create {out.parent}: {e.strerror or e}.") from None
    save_state_dict(state_dict, out)
    return out, dtype, official_notes(config["model"])  # of the config read (read once)


def official_notes(model: dict[str, Any]) -> list[str]:
    """What a `.pth` written from a model of config `model` does not carry.

    Shapes carry the sizes; the official code fixes the rest: LayerNorm eps 1e-5, a temporal
    transformer as wide as the ViT, and head counts of width/64 and 8. Lines starting with
    "warning:" mean the official code cannot load the file or gives other logits; "note:"
    lines name the `python -m convert` flags that read it back as it was.
    """
    notes = []
    if model.get("layer_norm_eps", 1e-5) != 1e-5:
        notes.append(
            f"warning: layer_norm_eps={model['layer_norm_eps']:g} is not stored in a .pth; the "
            "official code (and python -m convert) uses 1e-5, so its logits will differ from "
            "this model's."
        )
    width = model["hidden_size"]
    transformer = model.get("aggregate", "transformer") == "transformer"
    temporal_width = model.get("temporal_hidden_size") or width
    if transformer and temporal_width != width:
        notes.append(
            f"warning: the temporal transformer is {temporal_width} wide and the ViT {width}: "
            "the .pth holds aggregate.input_proj, which the official code does not have, so "
            "it cannot load the file (python -m convert can)."
        )
    unstored = {}  # what the .pth does not store -> the flag that gives it back
    if width % 64 or model["num_heads"] != width // 64:
        unstored["the ViT head count"] = f"--num-heads {model['num_heads']}"
    if transformer and model.get("temporal_heads", 8) != 8:
        unstored["the temporal head count"] = f"--temporal-heads {model['temporal_heads']}"
    if not transformer:
        unstored["T (a mean aggregate has no temporal tensors)"] = (
            f"--num-frames {model['num_frames']}"
        )
    if unstored:
        notes.append(
            f"note: the .pth does not store {' or '.join(unstored)}; read it back with: "
            f"python -m convert FILE.pth OUT_DIR {' '.join(unstored.values())}"
        )
    return notes


def _check_output_file(out: Path, overwrite: bool) -> Path:
    """Refuses an output `.pth` path that cannot be written, before any work is done."""
    if out.is_dir():
        raise ConversionError(
            f"{out} is a directory; pass the name of the .pth file to write "
            f"(e.g. {out / 'stam.pth'})."
        )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConversionError(
            f"{out} already exists; choose another name or pass --force (overwrite=True from "
            "Python)."
        )
    problem = unwritable(out)
    if problem:
        raise ConversionError(f"cannot write {out}: {problem}; choose another path.")
    return out


__all__ = ["ConversionError", "convert_checkpoint", "export_checkpoint", "official_notes"]
