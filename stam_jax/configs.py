"""Turning an ml_collections run config (`configs/*.py`) into a model."""

from __future__ import annotations

from typing import Any

from stam_jax.model import STAM
from stam_jax.variants import create_model


def model_from_run_config(config: Any) -> STAM:
    """Builds the `STAM` a run config describes (variant + overrides + run-time dtypes).

    Args:
      config: a ConfigDict with `model`, `model_overrides`, `dtype`, `param_dtype`,
        `attention_impl`, `remat`, `frame_chunk` (see `configs/common.py`).

    Returns:
      The (unbound) `STAM` module.
    """
    return create_model(
        config.model,
        **{k: v for k, v in dict(config.model_overrides).items() if v is not None},
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        remat=config.remat,
        frame_chunk=config.frame_chunk,
    )
