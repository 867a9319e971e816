"""Turning an ml_collections run config (`configs/*.py`) into a model."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from typing import Any

import flax

from stam_jax.data.loader import WORKERS_RULE
from stam_jax.model import AGGREGATES, ATTENTION_IMPLS, STAM
from stam_jax.variants import VARIANTS, create_model, parse_dtype


def check_run_config(config: Any) -> None:
    """Refuses run-time model fields no model can be built with, naming the flag to fix.

    Raises:
      ValueError: an unknown `model`, `dtype`, `param_dtype`, `attention_impl`, or a
        `model_overrides` (a count, a dropout rate), `data.workers` or `data.prefetch` value
        out of range.
    """
    if config.model not in VARIANTS:
        raise ValueError(
            f"--config.model={config.model!r} is not a registered variant; use one of "
            f"{', '.join(sorted(VARIANTS))} (configs/*.py set it for you)."
        )
    for key in ("dtype", "param_dtype"):
        try:
            parse_dtype(config[key])
        except (ValueError, TypeError):
            raise ValueError(
                f"--config.{key}={config[key]!r} is not supported; use float32, bfloat16 or "
                "float16."
            ) from None
    if config.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"--config.attention_impl={config.attention_impl!r} is not supported; use one of "
            f"{', '.join(ATTENTION_IMPLS)}."
        )
    data = config.get("data")
    if data is not None and data.workers < -1:
        raise ValueError(f"--config.data.workers={data.workers}; {WORKERS_RULE}")
    if data is not None and data.prefetch < 0:
        raise ValueError(
            f"--config.data.prefetch={data.prefetch}; use the number of videos to decode ahead, "
            "or 0 for twice the per-process batch."
        )
    overrides = config.model_overrides
    for key in ("num_classes", "num_frames"):
        if overrides[key] is not None and overrides[key] < 1:
            raise ValueError(f"--config.model_overrides.{key}={overrides[key]}; it must be >= 1.")
    for key in ("dropout_rate", "drop_path_rate", "temporal_dropout_rate"):
        # Out of range, flax's dropout zeroes every activation or rescales them all.
        if overrides[key] is not None and not 0 <= overrides[key] < 1:
            raise ValueError(
                f"--config.model_overrides.{key}={overrides[key]}; use a probability in [0, 1) "
                "(0: off)."
            )
    if overrides.aggregate is not None and overrides.aggregate not in AGGREGATES:
        raise ValueError(
            f"--config.model_overrides.aggregate={overrides.aggregate!r}; use one of "
            f"{', '.join(AGGREGATES)}."
        )


def flat_fields(config: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a run config by dotted name ('train.steps': 1000), sorted, without those
    named in `leave_out` or under them ('train' leaves out every 'train.*')."""
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {
        k: v
        for k, v in sorted(flat.items())
        if not any(k == f or k.startswith(f + ".") for f in leave_out)
    }


_DATA_FIELDS = (
    "frame_rate",
    "resize",
    "crop",
    "num_clips",
    "num_crops",
    "short_videos",
    "train_flip",
    "train_min_area",
)


def name_data_flags(error: Exception) -> str:
    """A `ClipSpec` error with its field names as the flags that set them
    (`crop=300` -> `--config.data.crop=300`)."""
    fields = "|".join(_DATA_FIELDS)
    return re.sub(rf"(?<![\w.])({fields})=", r"--config.data.\1=", str(error))


def model_from_run_config(config: Any) -> STAM:
    """Builds the `STAM` a run config describes (variant + overrides + run-time dtypes).

    Args:
      config: a ConfigDict with `model`, `model_overrides`, `dtype`, `param_dtype`,
        `attention_impl`, `remat`, `frame_chunk` (see `configs/common.py`).

    Returns:
      The (unbound) `STAM` module.

    Raises:
      ValueError: see `check_run_config`; the message names the flag.
    """
    check_run_config(config)
    return create_model(
        config.model,
        **{k: v for k, v in dict(config.model_overrides).items() if v is not None},
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        remat=config.remat,
        frame_chunk=config.frame_chunk,
    )


@functools.cache
def _config_files() -> tuple[tuple[str, int, int], ...]:
    """(path, frames, crop) of each run config in the `configs` package (its default run)."""
    try:
        package = importlib.import_module("configs")
    except ImportError:  # stam_jax used outside its repository
        return ()
    out = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        try:
            config = importlib.import_module(f"configs.{info.name}").get_config()
            frames = model_from_run_config(config).num_frames
        except Exception:  # not a run config (common.py): these are only suggestions
            continue
        out.append((f"configs/{info.name}.py", frames, config.data.crop))
    return tuple(out)


def config_files_for(num_frames: int, image_size: int) -> list[str]:
    """The files in `configs/` whose run samples `num_frames` frames cropped to `image_size`."""
    return [path for path, t, crop in _config_files() if (t, crop) == (num_frames, image_size)]
