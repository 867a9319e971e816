"""Initialising a STAM from a stam-jax checkpoint of a possibly different architecture, or
from an image ViT (timm `.pth`/`.safetensors`, Google ViT `.npz`) for its spatial part.

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
- any other shape mismatch: `InitError`, naming each path and both shapes; so are other
  `num_heads` or `temporal_heads` (same shapes, another function), and another
  `layer_norm_eps` is reported;
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
from stam_jax.variants import model_config

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

    Raises:
      InitError: `pos_embed` is not `(1, N + 1, D)` with N a square of at least 1.
    """
    pos = np.asarray(pos_embed, np.float32)
    # The shape first: a 1-D array, or one without grid rows, failed with an IndexError, a
    # ValueError from isqrt or a ZeroDivisionError.
    old = math.isqrt(pos.shape[1] - 1) if pos.ndim == 3 and pos.shape[1] >= 2 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or old < 1 or old * old != pos.shape[1] - 1:
        raise InitError(
            f"pos_embed of shape {pos.shape} does not hold a square patch grid; expected "
            "(1, N + 1, D): the cls row, then N = side x side patch rows."
        )
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

    Raises:
      InitError: `pos_embed` is not `(1, T + 1, D)` with T >= 1.
    """
    pos = np.asarray(pos_embed, np.float32)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        raise InitError(f"aggregate/pos_embed of shape {pos.shape} holds no frame rows.")
    frames = pos[0, 1:]
    if frames.shape[0] == 1:
        resized = np.repeat(frames, num_frames, axis=0)
    else:
        shape = (num_frames, frames.shape[1])
        resized = jax.image.resize(jnp.asarray(frames), shape, "linear", antialias=False)
        resized = np.asarray(resized)
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
    sources: dict[str, str] | None = None,
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
      checkpoint: a stam-jax checkpoint directory (`checkpoints.save`, `python -m convert`),
        or an image ViT file for the spatial part (`read_vit`: timm `.pth` / `.safetensors`,
        Google ViT `.npz`).
      temporal_pos_embed_std: see above; 0 keeps the fresh temporal position embedding.
      sources: a dict to fill with every param path of `model` and where its value came
        from ('copied', 'resampled ...', 're-initialised ...', 'fresh ...', 'drawn ...'): the
        report by name, where `report` counts and groups (`WORKDIR/init_report.txt`).

    Returns:
      `(params, report)`: the params tree (jax arrays, each in its fresh leaf's dtype) and
      human-readable lines saying what was copied, resampled, re-initialised and left unused.

    Raises:
      TypeError: `model` is not a `STAM` (a variant's name).
      ValueError: `temporal_pos_embed_std` is negative or NaN.
      InitError: a shape mismatch the rules do not cover (the message lists every path with
        the checkpoint's and the model's shapes), other head counts than the model's, `fresh`
        does not fit `model` (or is the whole variables), or an image ViT file `read_vit`
        refuses.
      checkpoints.CheckpointError: `checkpoint` is not a readable stam-jax checkpoint.
      convert.ConversionError: a ViT `.pth` / `.pt` / `.bin` that cannot be read safely.
      OSError: a ViT `.npz` or `.safetensors` that does not exist or cannot be opened.
    """
    if not isinstance(model, STAM):  # a variant's name, or the arguments swapped
        raise TypeError(
            f"model is a {type(model).__name__}, not a STAM; pass the module, e.g. "
            "init_from_checkpoint(create_model('stam_16', num_frames=8), fresh, checkpoint)."
        )
    if not temporal_pos_embed_std >= 0:  # NaN too: it compares False and was ignored
        raise ValueError(f"temporal_pos_embed_std={temporal_pos_embed_std} must be >= 0.")
    if isinstance(fresh, Mapping) and set(fresh) == {"params"}:
        raise InitError("pass the params tree (variables['params']), not the whole variables.")
    try:
        checkpoints.check_params(
            model, fresh, fix="Make them for this model: model.init(key, videos)['params']."
        )
    except checkpoints.CheckpointError as error:
        raise InitError(f"`fresh` is not a params tree of `model`: {error}") from error

    if str(checkpoint).endswith(VIT_SUFFIXES):
        source, notes = read_vit(checkpoint)
    else:
        config, _, params = checkpoints.read(checkpoint)
        source, notes = traverse_util.flatten_dict(params, sep="/"), []
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
    if not copied and not resampled:  # e.g. a ViT file of other key names: a run from scratch
        found = next((n for n in notes if n.startswith("not part of STAM")), "no tensor at all")
        raise InitError(
            f"nothing in {checkpoint} fits this model ({found}). An image ViT file needs "
            "timm's key names (patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...), or "
            "as .npz Google's (embedding/kernel, Transformer/encoderblock_0/...); rename its "
            "keys, or leave the checkpoint out to start from a fresh initialisation."
        )
    if not str(checkpoint).endswith(VIT_SUFFIXES):  # after the shapes, which say more
        notes += _same_shape_differences(model, config["model"], checkpoint)
    # What the model takes from the checkpoint: not the paths it lacks, nor a re-initialised head.
    fresh_paths = {*missing, *(HEAD if head_fresh else ())}
    taken = {path: source[path] for path in out if path not in fresh_paths}
    bad = checkpoints.non_finite_params(taken)
    if bad:  # training from them would stop at its first step with a NaN loss
        raise InitError(
            f"{checkpoints.non_finite_message(checkpoint, bad)}; initialise from a checkpoint "
            f"with finite params ({checkpoints.EARLIER_STEP})."
        )

    report = [f"{len(copied)} of {len(target)} tensors copied from {checkpoint}", *notes]
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

    if sources is not None:
        for path in target:
            sources[path] = "copied"
        for line in resampled:  # 'path: resampled ...'
            path, _, how = line.partition(": ")
            sources[path] = how
        for path in HEAD if head_fresh else ():
            sources[path] = "re-initialised (another class count)"
        for path in missing:
            sources[path] = "fresh (not in the checkpoint)"
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
            if sources is not None:
                sources[TEMPORAL_POS_EMBED] = f"drawn as normal(0, {temporal_pos_embed_std})"
    return traverse_util.unflatten_dict(out, sep="/"), report


# Fields that change what the params compute but not their shapes: a checkpoint of other heads
# would be copied whole into a model that splits its kernels otherwise.
_SAME_SHAPE_FIELDS = ("num_heads", "temporal_heads")


def _same_shape_differences(
    model: STAM, stored: Mapping[str, Any], checkpoint: str | os.PathLike
) -> list[str]:
    """Report notes for the checkpoint's config against `model`'s; `InitError` for other heads."""
    ours = model_config(model)
    differ = [
        f"{name}={stored[name]!r} (the model has {ours[name]!r})"
        for name in _SAME_SHAPE_FIELDS
        if name in stored and name in ours and stored[name] != ours[name]
    ]
    if differ:
        raise InitError(
            f"the checkpoint {checkpoint} has {', '.join(differ)}: its params have the model's "
            "shapes but split into other attention heads, a different function; build the model "
            "with the checkpoint's head counts."
        )
    eps = stored.get("layer_norm_eps", model.layer_norm_eps)
    if eps != model.layer_norm_eps:
        return [
            f"layer_norm_eps: the checkpoint's is {eps:g}, the model's {model.layer_norm_eps:g} "
            "(weights copied as they are)"
        ]
    return []


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


VIT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_LINEAR, _CONV = (1, 0), (2, 3, 1, 0)  # PyTorch (out, in[, kh, kw]) -> Flax layouts


def _timm_paths(key: str) -> tuple[str, tuple[int, ...] | None] | None:
    """The stam-jax path and layout change of a timm ViT key (None: not part of STAM)."""
    fixed = {
        "cls_token": ("cls_token", None),
        "pos_embed": ("pos_embed", None),
        "patch_embed.proj.weight": ("patch_embed/proj/kernel", _CONV),
        "patch_embed.proj.bias": ("patch_embed/proj/bias", None),
        "norm.weight": ("norm/scale", None),
        "norm.bias": ("norm/bias", None),
        "head.weight": ("head/kernel", _LINEAR),
        "head.bias": ("head/bias", None),
    }
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if len(parts) >= 4 and parts[0] == "blocks" and parts[1].isdigit():
        module = "/".join(parts[2:-1])
        if module in ("norm1", "norm2", "attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
            leaf = parts[-1]
            norm = module.startswith("norm")
            name = {"weight": "scale" if norm else "kernel", "bias": "bias"}.get(leaf)
            if name:
                layout = _LINEAR if name == "kernel" else None
                return f"blocks_{parts[1]}/{module}/{name}", layout
    return None


def _read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file (header length, JSON header, raw little-endian data)."""
    import json

    import ml_dtypes

    kinds = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}

    def damaged(why: str) -> InitError:
        return InitError(
            f"{path} is not a readable .safetensors file ({why}): a damaged or incomplete "
            "download, or another file under that name (a web page?); download it again."
        )

    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        # The length comes first: read blindly, a file of other contents (text, HTML) asked
        # for exabytes and failed with a MemoryError.
        if file_size < 8 or size > file_size - 8:
            raise damaged(f"its header length, {size} bytes, exceeds its size of {file_size}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise damaged("its header is not a JSON object")
        data = f.read()
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in kinds:
            raise InitError(f"{path}: tensor {name} has dtype {entry['dtype']}, not a float.")
        start, end = entry["data_offsets"]
        try:
            array = np.frombuffer(data[start:end], kinds[entry["dtype"]]).reshape(entry["shape"])
        except ValueError:
            raise damaged(f"tensor {name}'s data ends past the file, or has another size") from None
        out[name] = array.astype(np.float32)
    return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a `.npz` file, or an `InitError` naming it (numpy's errors for a file of
    other contents are a zipfile error, or advice to load it unsafely with `allow_pickle`)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # a .npz is a zip archive
                raise ValueError("not a zip archive")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InitError(
            f"{path} is not a readable .npz file ({e}): a damaged or incomplete download, or "
            "another file under that name; download it again."
        ) from None


def _google_vit(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Google ViT (`vit_jax` / big_vision `.npz`) names and layouts -> stam-jax paths."""
    out: dict[str, np.ndarray] = {}
    rename = {
        "cls": "cls_token",
        "embedding/kernel": "patch_embed/proj/kernel",
        "embedding/bias": "patch_embed/proj/bias",
        "Transformer/posembed_input/pos_embedding": "pos_embed",
        "Transformer/encoder_norm/scale": "norm/scale",
        "Transformer/encoder_norm/bias": "norm/bias",
        "head/kernel": "head/kernel",
        "head/bias": "head/bias",
    }
    for name, path in rename.items():
        if name in arrays:
            out[path] = np.asarray(arrays[name], np.float32)
    blocks = sorted(
        {int(k.split("/")[1].rsplit("_", 1)[1]) for k in arrays if "/encoderblock_" in k}
    )
    for i in blocks:
        src, dst = f"Transformer/encoderblock_{i}", f"blocks_{i}"
        for google, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{dst}/{ours}/scale"] = arrays[f"{src}/{google}/scale"]
            out[f"{dst}/{ours}/bias"] = arrays[f"{src}/{google}/bias"]
        for google, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            for leaf in ("kernel", "bias"):
                out[f"{dst}/mlp/{ours}/{leaf}"] = arrays[f"{src}/MlpBlock_3/{google}/{leaf}"]
        attn = f"{src}/MultiHeadDotProductAttention_1"
        q, k, v = (arrays[f"{attn}/{n}/kernel"] for n in ("query", "key", "value"))
        width = q.shape[0]
        # (D, heads, head_dim) each -> one (D, 3D) kernel: q | k | v, heads contiguous.
        out[f"{dst}/attn/qkv/kernel"] = np.concatenate([x.reshape(width, -1) for x in (q, k, v)], 1)
        out[f"{dst}/attn/qkv/bias"] = np.concatenate(
            [arrays[f"{attn}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        )
        out[f"{dst}/attn/proj/kernel"] = arrays[f"{attn}/out/kernel"].reshape(-1, width)
        out[f"{dst}/attn/proj/bias"] = arrays[f"{attn}/out/bias"]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def read_vit(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """An image ViT's tensors as flat stam-jax paths (host float32 numpy), plus report notes.

    timm `.pth`/`.pt`/`.bin` (read by the repository's safe, torch-free unpickler) and
    `.safetensors`: the keys are STAM's spatial keys (`blocks.N.attn.qkv.weight`, ...), as the
    official STAM code names them. Google ViT `.npz` (`vit_jax`, big_vision): q/k/v kernels
    fused, `(heads, head_dim)` axes flattened. Keys that are not part of STAM (`fc_norm`,
    `pre_logits`, register tokens, ...) are listed in the notes; the temporal part is absent.

    Raises:
      InitError: an official STAM checkpoint (convert it instead), a damaged `.npz` or
        `.safetensors`, or a `.safetensors` tensor that is not floating point.
      convert.ConversionError: a `.pth` / `.pt` / `.bin` that cannot be read safely.
      OSError: a `.npz` or `.safetensors` that does not exist or cannot be opened.
    """
    path = os.fspath(path)
    notes: list[str] = []
    if path.endswith(".npz"):
        arrays = _read_npz(path)
        out = _google_vit(arrays)
        known = ("cls", "embedding/", "Transformer/", "head/")
        ignored = sorted(k for k in arrays if not k.startswith(known))
        if ignored:
            notes.append(f"not part of STAM, ignored: {len(ignored)} arrays ({', '.join(ignored)})")
        notes.append(
            "Google ViT file: its LayerNorm epsilon is 1e-6 and STAM's 1e-5 (weights copied as is)"
        )
        return out, notes
    if path.endswith(".safetensors"):
        tensors = _read_safetensors(path)
    else:
        from convert.torch_io import load_state_dict

        tensors = load_state_dict(path)
    if any(key.removeprefix("module.").startswith("aggregate.") for key in tensors):
        raise InitError(
            f"{path} is an official STAM checkpoint (it holds aggregate.* tensors), not an image "
            f"ViT; read as one, its temporal transformer would be dropped. Convert it first: "
            f"python -m convert {path} CKPT_DIR, then pass --config.checkpoint=CKPT_DIR."
        )
    out, ignored = {}, []
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        mapped = _timm_paths(key)
        if mapped is None:
            ignored.append(key)
            continue
        name, layout = mapped
        array = np.asarray(value, np.float32)
        out[name] = array.transpose(layout) if layout else array
    if ignored:
        shown = ", ".join(sorted(ignored)[:6]) + (" ..." if len(ignored) > 6 else "")
        notes.append(f"not part of STAM, ignored: {len(ignored)} keys ({shown})")
    return out, notes
