"""The one table between official STAM state-dict keys and stam-jax parameter paths.

No torch needed: tensors are numpy arrays on the PyTorch side, jax arrays on the Flax side.
`torch_to_flax` turns an official state dict (name -> array) into
(model config, Flax params, report); `flax_to_torch` is its exact inverse. Every tensor is
accounted for: missing keys, wrong shapes and (optionally) unexpected keys are errors that name
the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from stam_jax.checkpoints import _some, not_a_params_tree
from stam_jax.model import STAM, param_shapes
from stam_jax.variants import model_from_config

# How a tensor changes between layouts: PyTorch Linear weights are (out, in), Flax kernels
# (in, out); Conv2d weights are (out, in, kh, kw), Flax (kh, kw, in, out).
COPY, LINEAR, CONV = "copy", "linear", "conv"
_TO_FLAX = {COPY: None, LINEAR: (1, 0), CONV: (2, 3, 1, 0)}
_TO_TORCH = {COPY: None, LINEAR: (1, 0), CONV: (3, 2, 0, 1)}


def _linear(torch_prefix: str, flax_prefix: str) -> list[tuple[str, str, str]]:
    return [
        (f"{torch_prefix}.weight", f"{flax_prefix}/kernel", LINEAR),
        (f"{torch_prefix}.bias", f"{flax_prefix}/bias", COPY),
    ]


def _norm(torch_prefix: str, flax_prefix: str) -> list[tuple[str, str, str]]:
    return [
        (f"{torch_prefix}.weight", f"{flax_prefix}/scale", COPY),
        (f"{torch_prefix}.bias", f"{flax_prefix}/bias", COPY),
    ]


def _block(i: int) -> list[tuple[str, str, str]]:
    t, f = f"blocks.{i}", f"blocks_{i}"
    return [
        *_norm(f"{t}.norm1", f"{f}/norm1"),
        *_linear(f"{t}.attn.qkv", f"{f}/attn/qkv"),
        *_linear(f"{t}.attn.proj", f"{f}/attn/proj"),
        *_norm(f"{t}.norm2", f"{f}/norm2"),
        *_linear(f"{t}.mlp.fc1", f"{f}/mlp/fc1"),
        *_linear(f"{t}.mlp.fc2", f"{f}/mlp/fc2"),
    ]


def _temporal_layer(i: int) -> list[tuple[str, str, str]]:
    t = f"aggregate.transformer_enc.layers.{i}"
    f = f"aggregate/transformer_enc/layers_{i}"
    return [
        (f"{t}.self_attn.in_proj_weight", f"{f}/self_attn/in_proj/kernel", LINEAR),
        (f"{t}.self_attn.in_proj_bias", f"{f}/self_attn/in_proj/bias", COPY),
        *_linear(f"{t}.self_attn.out_proj", f"{f}/self_attn/out_proj"),
        *_linear(f"{t}.linear1", f"{f}/linear1"),
        *_linear(f"{t}.linear2", f"{f}/linear2"),
        *_norm(f"{t}.norm1", f"{f}/norm1"),
        *_norm(f"{t}.norm2", f"{f}/norm2"),
    ]


def key_table(model: STAM) -> list[tuple[str, str, str]]:
    """(torch key, flax path, layout) for every tensor of `model`, in official order."""
    table = [
        ("cls_token", "cls_token", COPY),
        ("pos_embed", "pos_embed", COPY),
        ("patch_embed.proj.weight", "patch_embed/proj/kernel", CONV),
        ("patch_embed.proj.bias", "patch_embed/proj/bias", COPY),
    ]
    for i in range(model.depth):
        table += _block(i)
    table += _norm("norm", "norm")
    if model.aggregate == "transformer":
        table += [
            ("aggregate.cls_token", "aggregate/cls_token", COPY),
            ("aggregate.pos_embed", "aggregate/pos_embed", COPY),
        ]
        if (model.temporal_hidden_size or model.hidden_size) != model.hidden_size:
            table += _linear("aggregate.input_proj", "aggregate/input_proj")
        for i in range(model.temporal_depth):
            table += _temporal_layer(i)
        table += _norm("aggregate.transformer_enc.norm", "aggregate/transformer_enc/norm")
    table += _linear("head", "head")
    return table


class ConversionError(ValueError):
    """A state dict that cannot become STAM params; the message names every offending key."""


@dataclasses.dataclass
class Report:
    """What a conversion did besides copying tensors.

    Attributes:
      zero_filled: the official keys of qkv biases absent from the file, set to zeros.
      unexpected: keys of the file that are not part of the model (ignored unless strict).
      stripped_prefix: whether the keys carried DistributedDataParallel's `module.` prefix.
      source_dtypes: the names of the dtypes the file's tensors had ('float32', ...), sorted.
      non_finite: the keys of tensors holding NaN or Inf.
    """

    zero_filled: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    stripped_prefix: bool = False
    source_dtypes: list[str] = dataclasses.field(default_factory=list)
    non_finite: list[str] = dataclasses.field(default_factory=list)

    def warnings(self) -> list[str]:
        """Human-readable warnings, one per line."""
        out = []
        if self.zero_filled:
            out.append(
                f"{len(self.zero_filled)} qkv bias tensors are absent (a checkpoint from before "
                "the official 'fix qkv bias' commit); set to zero as the official loader does: "
                + ", ".join(self.zero_filled)
            )
        if self.unexpected:
            out.append(
                f"{len(self.unexpected)} unexpected keys ignored (pass --strict to refuse): "
                + ", ".join(self.unexpected)
            )
        if self.non_finite:
            out.append(
                "NaN or Inf values in the weights (run_eval.py, run_train.py and "
                "stam_jax.explain refuse such a checkpoint; did the run diverge, or is the file "
                f"damaged?), {len(self.non_finite)} tensor(s): " + ", ".join(self.non_finite)
            )
        return out


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    perm = _TO_TORCH[layout]
    return shape if perm is None else tuple(shape[p] for p in perm)


def strip_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Removes DistributedDataParallel's `module.` prefix from every key that has it.

    Raises:
      ConversionError: a key present both with and without the prefix (`head.weight` and
        `module.head.weight`): which one holds the weights is not knowable.
    """
    stripped = any(k.startswith("module.") for k in state_dict)
    collisions = sorted(
        k for k in state_dict if k.startswith("module.") and k.removeprefix("module.") in state_dict
    )
    if collisions:
        shown = ", ".join(f"{k.removeprefix('module.')} and {k}" for k in collisions[:10])
        more = f" (and {len(collisions) - 10} more pairs)" if len(collisions) > 10 else ""
        raise ConversionError(
            f"the state dict holds keys both with and without the 'module.' prefix: {shown}"
            f"{more}; which of each pair holds the weights is not knowable, so nothing was "
            "converted. Re-save it with one copy of each key (e.g. the model's own state_dict())."
        )
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return out, stripped


def _count(keys: list[str], prefix: str, what: str) -> int:
    """How many layers `prefix0.`, `prefix1.`, ... the keys hold; a gap in the numbering is
    refused, naming the keys past it (a damaged file, or keys that do not belong)."""
    numbered = {
        k: int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))
    }
    found = set(numbered.values())
    if found != set(range(len(found))):
        gap = min(set(range(max(found) + 1)) - found)
        past = [k for k, i in numbered.items() if i > gap]
        raise ConversionError(
            f"the {what} ({prefix}N.*) are numbered {_ranges(sorted(found))}: {prefix}{gap}.* "
            f"is missing, so the {len(past)} key(s) past it do not fit a model of {gap} "
            f"layers: {_some(past)}. Remove them if they do not belong (del state_dict[key], "
            "then torch.save), or use an undamaged copy of the file."
        )
    return len(found)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


_LINEAR_LIKE = "(out, in)"  # a Linear weight's shape


def _need(sd: Mapping[str, Any], key: str, why: str, like: str) -> tuple[int, ...]:
    """The shape of `sd[key]`, which the architecture is read from: `like` names the official
    shape, whose number of dimensions it must have, none of them 0."""
    if key not in sd:
        raise ConversionError(
            f"missing key {key!r}, needed to infer {why}; is this a STAM state dict?"
        )
    shape, rank = tuple(sd[key].shape), like.count(",") + 1
    if len(shape) != rank or 0 in shape:
        raise ConversionError(
            f"{key} has shape {shape}; expected {rank} dimensions, none of them 0, as {like}, "
            f"to infer {why}: the file is damaged or not a STAM state dict."
        )
    return shape


def infer_config(
    state_dict: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    temporal_heads: int | None = None,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """Reads the architecture off the tensor shapes of an official-format state dict.

    Head counts are not visible in any shape: they default to width/64 for the ViT (ViT-B/16's
    12) and to 8 for the temporal encoder (the official value) and may be overridden.

    Args:
      state_dict: official keys (without `module.`) -> arrays or tensors.
      num_heads: ViT heads, if not width/64.
      temporal_heads: temporal heads, if not 8.
      num_frames: T; required only for mean-aggregate checkpoints, which do not store it.

    Returns:
      A dict of `STAM` architecture fields.

    Raises:
      ConversionError: a missing key the architecture is read from, shapes that do not make a
        STAM (non-square patches or grid, a gap in the layer numbers), a head count below 1 or
        not dividing the width, a mean-aggregate state dict without `num_frames`, an argument
        the tensors contradict (another `num_frames` than `aggregate.pos_embed`'s T,
        `temporal_heads` without a temporal transformer), or a checkpoint container
        (`{'model': sd}`) instead of the state dict.
    """
    for flag, value in (
        ("--num-heads", num_heads),
        ("--temporal-heads", temporal_heads),
        ("--num-frames", num_frames),
    ):
        if value is not None and value < 1:
            raise ConversionError(f"{flag} {value} is not a count; pass {flag} N with N >= 1.")
    for container in ("model", "state_dict"):
        if isinstance(state_dict.get(container), Mapping):
            raise ConversionError(
                f"got a checkpoint container (top-level keys {sorted(map(str, state_dict))[:10]}), "
                f"not a state dict; pass checkpoint[{container!r}] (or read the file with "
                "convert.torch_io.load_state_dict, which unwraps it)."
            )
    keys = list(state_dict)
    width, chans, patch, patch_w = _need(
        state_dict, "patch_embed.proj.weight", "the patch size", "(width, 3, p, p)"
    )
    if chans != 3 or patch != patch_w:
        raise ConversionError(
            f"patch_embed.proj.weight has shape {(width, chans, patch, patch_w)}; expected "
            "(width, 3, p, p) for RGB square patches."
        )
    tokens = _need(state_dict, "pos_embed", "the image size", "(1, 1 + patches, width)")[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens or not tokens:
        raise ConversionError(f"pos_embed holds {tokens} patch positions, not a square grid.")
    num_classes = _need(state_dict, "head.weight", "the class count", "(classes, width)")[0]
    config: dict[str, Any] = dict(
        num_classes=num_classes,
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=width,
        depth=_count(keys, "blocks.", "ViT blocks"),
        mlp_dim=_need(state_dict, "blocks.0.mlp.fc1.weight", "the MLP width", _LINEAR_LIKE)[0],
    )
    if num_heads is None and width % 64:
        raise ConversionError(
            f"the ViT head count is not stored in checkpoints and the default, width/64, does "
            f"not apply to width {width}; pass --num-heads."
        )
    heads = width // 64 if num_heads is None else num_heads
    if heads < 1 or width % heads:
        raise ConversionError(f"width {width} does not divide into {heads} heads; fix --num-heads.")
    config["num_heads"] = heads

    if any(k.startswith("aggregate.") for k in keys):
        *_, t_width = _need(
            state_dict, "aggregate.cls_token", "the temporal width", "(1, 1, width)"
        )
        t_frames = (
            _need(state_dict, "aggregate.pos_embed", "the frame count T", "(1, 1 + T, width)")[1]
            - 1
        )
        if not t_frames:
            raise ConversionError(
                "aggregate.pos_embed holds the temporal cls token's position only, no frame's: "
                "the file is damaged or not a STAM state dict."
            )
        if num_frames is not None and num_frames != t_frames:
            raise ConversionError(
                f"--num-frames {num_frames} contradicts aggregate.pos_embed, which holds "
                f"T={t_frames}; leave --num-frames out for transformer checkpoints."
            )
        t_heads = 8 if temporal_heads is None else temporal_heads
        if t_width % t_heads:
            raise ConversionError(
                f"temporal width {t_width} does not divide into {t_heads} heads; pass "
                "--temporal-heads."
            )
        prefix = "aggregate.transformer_enc.layers"
        config.update(
            aggregate="transformer",
            num_frames=t_frames,
            temporal_hidden_size=None if t_width == width else t_width,
            temporal_depth=_count(keys, f"{prefix}.", "temporal layers"),
            temporal_heads=t_heads,
            temporal_mlp_dim=_need(
                state_dict, f"{prefix}.0.linear1.weight", "the temporal FF", _LINEAR_LIKE
            )[0],
        )
    else:
        if num_frames is None:
            raise ConversionError(
                "this checkpoint has no 'aggregate.*' tensors (a mean-aggregate model), so the "
                "frame count T is not stored in it; pass --num-frames T."
            )
        if temporal_heads is not None:
            raise ConversionError(
                f"--temporal-heads {temporal_heads} does not apply: this checkpoint has no "
                "'aggregate.*' tensors (a mean-aggregate model, without a temporal transformer); "
                "leave --temporal-heads out for mean-aggregate checkpoints."
            )
        config.update(aggregate="mean", num_frames=num_frames)
    return config


def torch_to_flax(
    state_dict: Mapping[str, Any],
    *,
    strict: bool = False,
    num_heads: int | None = None,
    temporal_heads: int | None = None,
    num_frames: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any], Report]:
    """Converts an official STAM state dict (numpy arrays or torch tensors) to Flax params.

    Args:
      state_dict: official keys -> numpy arrays or torch tensors (a `module.` prefix is
        stripped).
      strict: refuse unexpected keys instead of warning about them.
      num_heads: see `infer_config`.
      temporal_heads: see `infer_config`.
      num_frames: see `infer_config`.

    Returns:
      (model config dict, nested float32 params as jax arrays, report).

    Raises:
      ConversionError: naming every missing, misshapen or (strict) unexpected key; also a
        `state_dict` that is not a mapping (a torch module: pass its `.state_dict()`), a
        checkpoint container, a key both with and without `module.`, or an architecture
        that cannot be inferred (see `infer_config`).
    """
    if not isinstance(state_dict, Mapping):
        hint = (
            "pass its state_dict() (model.state_dict())"
            if callable(getattr(state_dict, "state_dict", None))
            else "pass the checkpoint's {key: tensor} dict"
        )
        raise ConversionError(
            f"state_dict is a {type(state_dict).__name__}, not a mapping of official keys to "
            f"tensors; {hint} (or read a .pth with convert.torch_io.load_state_dict)."
        )
    sd, stripped = strip_prefix(state_dict)
    config = infer_config(
        sd, num_heads=num_heads, temporal_heads=temporal_heads, num_frames=num_frames
    )
    try:
        model = model_from_config(config)
        shapes = param_shapes(model)
    except ValueError as e:  # sizes no model has, should a check above have let them through
        raise ConversionError(f"the tensors' shapes make no STAM ({config}): {e}") from None
    report = Report(stripped_prefix=stripped)
    params: dict[str, Any] = {}
    missing, misshapen = [], []
    used = set()
    for torch_key, flax_path, layout in key_table(model):
        shape = _torch_shape(shapes[flax_path], layout)
        if torch_key not in sd:
            if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.bias", torch_key):
                report.zero_filled.append(torch_key)
                value = np.zeros(shape, np.float32)  # in the torch layout, like the rest
            else:
                missing.append(torch_key)
                continue
        else:
            used.add(torch_key)
            value = sd[torch_key]
            if tuple(value.shape) != shape:
                misshapen.append(f"{torch_key}: expected {shape}, found {tuple(value.shape)}")
                continue
            report.source_dtypes.append(str(value.dtype).removeprefix("torch."))
        perm = _TO_FLAX[layout]
        if type(value).__name__ in ("Tensor", "Parameter"):  # a torch state dict, as loaded
            from convert.torch_io import _torch_to_numpy

            value = _torch_to_numpy(value)  # np.asarray fails on bfloat16 and grad tensors
        value = np.asarray(value)  # reads a lazily loaded tensor now, one at a time
        if not np.isfinite(value).all():
            report.non_finite.append(torch_key)
        if perm is not None:
            value = value.transpose(perm)
        # Always a fresh float32 device buffer (float16/bfloat16 upcast exactly), never a view
        # of the source, which may be a memory-mapped file about to be released.
        _set(params, flax_path, jnp.array(value, dtype=jnp.float32, copy=True))
    report.unexpected = sorted(set(sd) - used)
    problems = [f"missing key {k}" for k in missing] + [f"wrong shape {m}" for m in misshapen]
    if strict and report.unexpected:
        problems += [f"unexpected key {k} (--strict)" for k in report.unexpected]
    if problems:
        raise ConversionError(
            f"cannot convert this checkpoint to the inferred model {config}:\n  "
            + "\n  ".join(problems)
        )
    report.source_dtypes = sorted(set(report.source_dtypes))
    return config, params, report


def flax_to_torch(
    model: STAM, params: Mapping[str, Any], dtype: Any = np.float32, *, consume: bool = False
) -> dict:
    """Flax params -> official state dict of numpy arrays (exact inverse of `torch_to_flax`).

    Args:
      model: the `STAM` whose params these are.
      params: nested params as returned by `torch_to_flax` or training.
      dtype: dtype of the written tensors: float32, float16, bfloat16 or float64, as a name,
        a numpy/jax dtype or a torch dtype.
      consume: delete each leaf from `params` (mutable dicts all the way down) once converted,
        so that the weights are never held twice.

    Returns:
      An ordered dict official key -> numpy array.

    Raises:
      ConversionError: a variables dict (`{'params': ...}`) instead of the params, a `dtype`
        that is not one of those above, `consume` with frozen params, or params of another
        model (tensors it has no place for, a missing or misshapen one).
    """
    problem = not_a_params_tree(params)
    if problem is not None:
        raise ConversionError(f"flax_to_torch: {problem}")
    if isinstance(params.get("params"), Mapping):
        raise ConversionError(
            f"got a variables dict (top-level keys {sorted(params)}), not params; pass "
            "variables['params']."
        )
    np_dtype = _weight_dtype(dtype)
    if consume:
        frozen = _frozen_mapping(params)
        if frozen is not None:
            raise ConversionError(
                f"consume=True deletes each converted tensor from params, but {frozen} cannot "
                "be changed; pass consume=False, or a dict copy (flax.core.unfreeze(params))."
            )
    shapes = param_shapes(model)
    table = key_table(model)
    # Checked before anything is converted: a model of a smaller variant (fewer blocks, a mean
    # aggregate) would otherwise silently drop the params it has no place for.
    extra = sorted(set(_leaf_paths(params)) - {flax_path for _, flax_path, _ in table})
    if extra:
        raise ConversionError(
            f"the Flax params hold {len(extra)} tensor(s) that the model has no place for: "
            f"{_some(extra)}; these are the params of another model (variant). Pass the model "
            "they were made for (e.g. model_from_config of their checkpoint's config)."
        )
    out = {}
    for torch_key, flax_path, layout in table:
        value = np.asarray(_get(params, flax_path))
        if value.shape != shapes[flax_path]:
            raise ConversionError(
                f"param {flax_path}: expected shape {shapes[flax_path]}, found {value.shape}."
            )
        perm = _TO_TORCH[layout]
        if perm is not None:
            value = value.transpose(perm)
        out[torch_key] = np.array(value, dtype=np_dtype, order="C")  # writable, as torch wants
        if consume:
            parent, _, leaf = flax_path.rpartition("/")
            del (_get(params, parent) if parent else params)[leaf]
    return out


_WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _weight_dtype(dtype: Any) -> np.dtype:
    """`dtype` as a numpy dtype of floating weights, or a ConversionError naming it."""
    name = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else None
    try:  # np.dtype(None) would be float64
        resolved = None if dtype is None else np.dtype(name if name is not None else dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _WEIGHT_DTYPES:
        raise ConversionError(
            f"dtype={dtype!r} is not a dtype for weights; use one of {_WEIGHT_DTYPES} (a name, "
            "a numpy/jax dtype or a torch dtype)."
        )
    return resolved


def _frozen_mapping(tree: Mapping[str, Any], path: str = "params") -> str | None:
    """The path of the first mapping in `tree` that cannot be changed, or None."""
    if not isinstance(tree, MutableMapping):
        return f"{path} (a {type(tree).__name__})"
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found = _frozen_mapping(value, f"{path}[{key!r}]")
            if found is not None:
                return found
    return None


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'a/b/c' for every non-mapping value of the nested `tree`."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, f"{path}/") if isinstance(value, Mapping) else [path]
    return paths


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for p in path.split("/"):
        if p not in tree:
            raise ConversionError(f"param {path} is missing from the Flax params.")
        tree = tree[p]
    return tree


__all__ = [
    "ConversionError",
    "Report",
    "flax_to_torch",
    "infer_config",
    "key_table",
    "torch_to_flax",
]
