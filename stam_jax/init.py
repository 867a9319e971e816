"""Initialising a STAM from a stam-jax checkpoint of a possibly different architecture.

`init_from_checkpoint(model, fresh, checkpoint)` walks `model`'s param tree (`fresh`, the
model's own freshly initialised params) leaf by leaf and decides, for each '/'-joined path:

- same path and shape in the checkpoint: copied (cast to the fresh leaf's dtype);
- `pos_embed` (spatial, `(1, N + 1, D)`, cls row first) of another patch grid: the cls row is
  kept and the `sqrt(N) x sqrt(N)` grid is resampled bilinearly to the model's grid;
- `aggregate/pos_embed` (temporal, `(1, T + 1, D)`, cls row first) of another frame count: the
  cls row is kept and the T frame rows are resampled linearly along time (a single-frame
  checkpoint gives every frame its one row). A mean-aggregate model has no aggregate params,
  so nothing temporal is resampled for it;
- `head/kernel`, `head/bias` of another class count: kept fresh (re-initialised);
- any other shape mismatch: `InitError`, naming each path and both shapes;
- absent from the checkpoint (e.g. a transformer aggregate for a mean-aggregate checkpoint):
  kept fresh and reported, grouped by top-level module.

Checkpoint params that the model does not use are reported too. Optionally
(`temporal_pos_embed_std > 0`), a temporal position embedding that was not taken from the
checkpoint is redrawn from a wider normal distribution (see `init_from_checkpoint`).

Resampling follows `jax.image.resize` (half-pixel centres, no antialiasing): sample `i` of `n`
sits at `(i + 0.5) / n` of the axis, so upsampling keeps the first and last rows.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from stam_jax import checkpoints
from stam_jax.model import STAM
from stam_jax.variants import model_from_config

SPATIAL_POS_EMBED = "pos_embed"
TEMPORAL_POS_EMBED = "aggregate/pos_embed"
HEAD = ("head/kernel", "head/bias")


class InitError(ValueError):
    """The checkpoint's params cannot initialise the model; the message names what differs."""


def resample_spatial_pos_embed(pos_embed: Any, grid: int) -> np.ndarray:
    """Resamples a spatial position embedding to a `grid x grid` patch grid.

    Args:
      pos_embed: `(1, N + 1, D)`, the cls row first, then the `sqrt(N) x sqrt(N)` grid row-major.
      grid: the new grid side.

    Returns:
      `(1, grid * grid + 1, D)` float32: the same cls row, the grid resampled bilinearly.
    """
    pos = np.asarray(pos_embed, np.float32)
    old = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or pos.shape[0] != 1 or old * old != pos.shape[1] - 1:
        raise InitError(f"pos_embed of shape {pos.shape} does not hold a square patch grid.")
    width = pos.shape[2]
    patches = jnp.asarray(pos[0, 1:].reshape(old, old, width))
    resized = jax.image.resize(patches, (grid, grid, width), "bilinear", antialias=False)
    resized = np.asarray(resized).reshape(1, grid * grid, width)
    return np.concatenate([pos[:, :1], resized], axis=1)


def resample_temporal_pos_embed(pos_embed: Any, num_frames: int) -> np.ndarray:
    """Resamples a temporal position embedding to `num_frames` frames.

    Args:
      pos_embed: `(1, T + 1, D)`, the cls row first, then one row per frame.
      num_frames: the new frame count.

    Returns:
      `(1, num_frames + 1, D)` float32: the same cls row, the frame rows resampled linearly
      along time (every row equal to the single frame row when T is 1).
    """
    pos = np.asarray(pos_embed, np.float32)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        raise InitError(f"aggregate/pos_embed of shape {pos.shape} holds no frame rows.")
    frames = pos[0, 1:]
    if frames.shape[0] == 1:
        resized = np.repeat(frames, num_frames, axis=0)
    else:
        shape = (num_frames, frames.shape[1])
        resized = np.asarray(jax.image.resize(jnp.asarray(frames), shape, "linear"))
    return np.concatenate([pos[:, :1], resized[None]], axis=1)


def _group(paths: list[str]) -> list[tuple[str, list[str]]]:
    """Paths grouped by their top-level module, in sorted order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in sorted(paths):
        groups[path.split("/")[0]].append(path)
    return sorted(groups.items())


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def init_from_checkpoint(
    model: STAM,
    fresh: Any,
    checkpoint: str | os.PathLike,
    *,
    temporal_pos_embed_std: float = 0.0,
) -> tuple[dict[str, Any], list[str]]:
    """Initialises `model`'s params from a stam-jax checkpoint of a possibly other architecture.

    The checkpoint may differ from `model` in `num_frames`, `image_size` (same patch size and
    width), `num_classes` and `aggregate` ('mean' vs 'transformer'); the rules are in the module
    docstring. The checkpoint is read as host numpy with its own architecture (from its config).

    `temporal_pos_embed_std`: pre-trained frame features leave the final spatial LayerNorm at
    unit scale, and next to them a temporal position embedding at the official init (truncated
    normal, std 0.02) is too small for the temporal transformer to learn frame order quickly.
    When this is > 0 and `aggregate/pos_embed` was NOT taken (copied or resampled) from the
    checkpoint, it is redrawn as normal(0, std), seeded by `jax.random.key(0)`. Ignored (and
    reported) for a model without a temporal position embedding.

    Args:
      model: the `STAM` to initialise.
      fresh: `model`'s freshly initialised params (`model.init(...)['params']`), a nested dict.
      checkpoint: a stam-jax checkpoint directory (`checkpoints.save`, `python -m convert`).
      temporal_pos_embed_std: see above; 0 keeps the fresh temporal position embedding.

    Returns:
      `(params, report)`: the params tree (jax arrays, each in its fresh leaf's dtype) and
      human-readable lines saying what was copied, resampled, re-initialised and left unused.

    Raises:
      InitError: a shape mismatch the rules do not cover (the message lists every path with
        the checkpoint's and the model's shapes), or `fresh` does not fit `model`.
      checkpoints.CheckpointError: `checkpoint` is not a readable stam-jax checkpoint.
    """
    if temporal_pos_embed_std < 0:
        raise ValueError(f"temporal_pos_embed_std={temporal_pos_embed_std} must be >= 0.")
    if isinstance(fresh, Mapping) and set(fresh) == {"params"}:
        raise InitError("pass the params tree (variables['params']), not the whole variables.")
    try:
        checkpoints.check_params(model, fresh)
    except checkpoints.CheckpointError as error:
        raise InitError(f"`fresh` is not a params tree of `model`: {error}") from error

    source_model = model_from_config(checkpoints.read_config(checkpoint)["model"])
    source = traverse_util.flatten_dict(checkpoints.read_params(checkpoint, source_model), sep="/")
    target = traverse_util.flatten_dict(fresh, sep="/")

    out: dict[str, Any] = {}
    copied: list[str] = []
    missing: list[str] = []
    problems: list[str] = []
    resampled: list[str] = []
    head_fresh = False
    for path, leaf in target.items():
        shape = tuple(leaf.shape)
        if path not in source:
            missing.append(path)
            out[path] = jnp.asarray(leaf)
            continue
        value = source[path]
        old = tuple(value.shape)
        if old == shape:
            out[path] = jnp.asarray(value, leaf.dtype)
            copied.append(path)
        elif path == SPATIAL_POS_EMBED and old[0::2] == shape[0::2]:
            new_grid = math.isqrt(shape[1] - 1)
            old_grid = math.isqrt(old[1] - 1)
            if new_grid**2 != shape[1] - 1 or old_grid**2 != old[1] - 1:
                problems.append(f"{path}: checkpoint {old}, model {shape} (not square grids)")
                continue
            out[path] = jnp.asarray(resample_spatial_pos_embed(value, new_grid), leaf.dtype)
            resampled.append(
                f"{path}: resampled spatial grid {old_grid}x{old_grid} -> {new_grid}x{new_grid}"
            )
        elif path == TEMPORAL_POS_EMBED and old[0::2] == shape[0::2] and old[1] >= 2:
            out[path] = jnp.asarray(resample_temporal_pos_embed(value, shape[1] - 1), leaf.dtype)
            resampled.append(
                f"{path}: resampled {old[1] - 1} frames -> {shape[1] - 1} frames "
                "(cls row kept, frame rows linearly along time)"
            )
        elif path in HEAD and old[:-1] == shape[:-1]:
            out[path] = jnp.asarray(leaf)
            head_fresh = True
        else:
            problems.append(f"{path}: checkpoint {old}, model {shape}")
    if problems:
        raise InitError(
            f"the checkpoint {checkpoint} cannot initialise this model; shapes differ:\n  "
            + "\n  ".join(problems)
        )

    report = [f"{len(copied)} of {len(target)} tensors copied from {checkpoint}"]
    report += resampled
    if head_fresh:
        old_classes = source["head/bias"].shape[-1] if "head/bias" in source else "?"
        report.append(
            f"head: re-initialised (checkpoint has {old_classes} classes, "
            f"model {target['head/bias'].shape[-1]})"
        )
    for group, paths in _group(missing):
        line = f"{group}: {_tensors(len(paths))} not in the checkpoint, freshly initialised"
        if len(paths) <= 3:
            line += f" ({', '.join(paths)})"
        report.append(line)
    unused = [path for path in source if path not in target]
    if unused:
        groups = ", ".join(f"{group} ({_tensors(len(p))})" for group, p in _group(unused))
        report.append(f"unused from the checkpoint: {groups}")

    if temporal_pos_embed_std > 0:
        if TEMPORAL_POS_EMBED not in target:
            report.append(
                f"temporal_pos_embed_std={temporal_pos_embed_std} ignored: the model has no "
                f"{TEMPORAL_POS_EMBED}"
            )
        elif TEMPORAL_POS_EMBED in missing:
            out[TEMPORAL_POS_EMBED] = _normal_like(
                target[TEMPORAL_POS_EMBED], temporal_pos_embed_std
            )
            report.append(
                f"{TEMPORAL_POS_EMBED}: redrawn as normal(0, {temporal_pos_embed_std}) "
                "(not in the checkpoint)"
            )
    return traverse_util.unflatten_dict(out, sep="/"), report


def _normal_like(leaf: Any, std: float) -> jax.Array:
    noise = jax.random.normal(jax.random.key(0), leaf.shape, jnp.float32)
    return (noise * std).astype(leaf.dtype)


def redraw_temporal_pos_embed(params: Any, std: float) -> Any:
    """`params` with `aggregate/pos_embed` drawn as normal(0, std) (training from scratch).

    Raises:
      InitError: the params have no temporal position embedding (a mean-aggregate model).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    if TEMPORAL_POS_EMBED not in flat:
        raise InitError(f"no {TEMPORAL_POS_EMBED} to redraw: the model has no temporal transformer")
    flat[TEMPORAL_POS_EMBED] = _normal_like(flat[TEMPORAL_POS_EMBED], std)
    return traverse_util.unflatten_dict(flat, sep="/")
