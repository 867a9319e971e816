"""Registered STAM variants (a table of sizes) and (de)serialisation of model configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from stam_jax.model import RUNTIME_FIELDS, STAM

# Fields that describe the architecture; saved in checkpoints (the rest: `RUNTIME_FIELDS`).
ARCH_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(STAM)
    if f.name not in RUNTIME_FIELDS and f.name not in ("parent", "name")
)

_TINY = dict(
    num_classes=10,
    num_frames=4,
    image_size=32,
    patch_size=8,
    hidden_size=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    temporal_depth=2,
    temporal_heads=4,
    temporal_mlp_dim=48,
)

# The official models differ only in T; everything else is STAM's ViT-B/16 default.
VARIANTS: dict[str, dict[str, Any]] = {
    "stam_16": dict(num_frames=16),
    "stam_32": dict(num_frames=32),
    "stam_64": dict(num_frames=64),
    # Tiny variants for tests and the demo: same code paths, seconds to run on a CPU.
    "stam_tiny": dict(_TINY),
    "stam_tiny_mean": dict(_TINY, aggregate="mean"),
    # The demo (`make demo`): 8 frames of 32x32, 2 classes; trains in about a minute on a CPU.
    "stam_demo": dict(
        num_classes=2,
        num_frames=8,
        image_size=32,
        patch_size=8,
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        temporal_depth=2,
        temporal_heads=4,
        temporal_mlp_dim=128,
    ),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any, field: str = "dtype") -> Any:
    """Returns the jnp dtype for 'float32' / 'bfloat16' / 'float16' (or such a dtype itself).

    Args:
      dtype: a dtype's name, or a dtype (numpy's, jnp's).
      field: the name the refusal gives the value (`param_dtype` for the params').

    Raises:
      ValueError: anything else, naming `field`, the value and the choices.
    """
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:  # not a dtype at all (3, an object): numpy's words named neither
        name = None
    if name not in _DTYPES:
        raise ValueError(f"{field}={dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def create_model(name: str, /, **overrides: Any) -> STAM:
    """Builds a registered variant, e.g. `create_model('stam_16', dtype='bfloat16')`.

    Args:
      name: a key of `VARIANTS`.
      **overrides: any `STAM` field (sizes, `aggregate`, `dtype`, ...), and flax's `name=` of
        the module (its key in the params of a module of your own that holds it).

    Returns:
      The `STAM` module (unbound; inside a parent's `@nn.compact` method, its submodule).

    Raises:
      ValueError: an unknown variant `name`, an override that is not a `STAM` field, or a
        `dtype` / `param_dtype` other than float32, bfloat16 and float16. Values are checked
        when the model is first run (`STAM.__call__`).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; registered variants: {sorted(VARIANTS)}.")
    module_name = overrides.pop("name", None)
    return model_from_config({**VARIANTS[name], **overrides}, name=module_name)


def model_from_config(
    config: dict[str, Any], /, *, name: str | None = None, **runtime: Any
) -> STAM:
    """Builds a `STAM` from a dict of its fields, refusing unknown names.

    Args:
      config: architecture fields (as saved by `model_config`), optionally run-time ones.
      name: flax's name of the module (None: flax names it, e.g. `STAM_0` in a parent).
      **runtime: fields that override `config`, usually the run-time ones (`RUNTIME_FIELDS`:
        `dtype`, `param_dtype`, `attention_impl`, `remat`, `frame_chunk`, ...).

    Returns:
      The `STAM` module (unbound; inside a parent's `@nn.compact` method, its submodule).

    Raises:
      ValueError: a name that is not a `STAM` field (all of them listed), or an unsupported
        `dtype` / `param_dtype`.
    """
    fields = {**config, **runtime}
    known = set(ARCH_FIELDS) | set(RUNTIME_FIELDS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model fields {unknown}; valid fields: {sorted(known)}.")
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = parse_dtype(fields[key], key)
    return STAM(**fields, name=name)


def model_config(model: STAM) -> dict[str, Any]:
    """The architecture of `model` as a JSON-serialisable dict (no run-time fields).

    A mean-aggregate model has no temporal transformer, so its `temporal_*` fields are left out:
    two models that compute the same function have the same config.
    """
    skip = model.aggregate == "mean"
    return {
        name: getattr(model, name)
        for name in ARCH_FIELDS
        if not (skip and name.startswith("temporal_"))
    }


def variant_name(model: STAM) -> str | None:
    """The registered variant whose architecture equals `model`'s, if any."""
    config = model_config(model)
    for name in VARIANTS:
        if model_config(create_model(name)) == config:
            return name
    return None
