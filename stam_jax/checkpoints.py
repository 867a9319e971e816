"""stam-jax checkpoints: an orbax directory holding the params AND the model config.

Layout of a checkpoint directory (written atomically by orbax):

    DIR/params   the Flax params (orbax StandardCheckpointHandler)
    DIR/config   JSON: {"format": "stam_jax", "version": 1, "model": {...}, "metadata": {...}}

`load(DIR)` needs nothing else: the architecture comes from the config, so a converted official
checkpoint is one call away from logits.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from stam_jax.model import STAM
from stam_jax.variants import model_config, model_from_config

FORMAT = "stam_jax"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message says why."""


def _checkpointer() -> ocp.Checkpointer:
    # Host staging for serialisation is bounded (50 MB in flight), so saving a checkpoint costs
    # well under one extra copy of the params in memory (see BENCHMARKS.md, converter).
    # A stam-jax checkpoint is written and read by one process on its own (process 0 of a
    # multi-host run writes while the others wait), so orbax must not wait for the others.
    alone = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(),
        active_processes={jax.process_index()},
        barrier_sync_key_prefix=f"stam_jax_process_{jax.process_index()}",
    )
    params = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=0.05, save_device_host_concurrent_gb=0.05, multiprocessing_options=alone
    )
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
        params=params,
        config=ocp.JsonCheckpointHandler(multiprocessing_options=alone),
    )
    return ocp.Checkpointer(handler, multiprocessing_options=alone)


def save(
    directory: str | os.PathLike,
    model: STAM,
    params: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `params` and `model`'s architecture to `directory`.

    Args:
      directory: destination; must not exist unless `overwrite`.
      model: the `STAM` whose params these are (its run-time dtype is not saved).
      params: the params tree (numpy or jax arrays).
      metadata: free JSON-serialisable facts (source file, source dtype, ...).
      overwrite: replace an existing directory.

    Returns:
      The absolute checkpoint path.
    """
    path = Path(directory).absolute()
    if path.exists():
        if not overwrite:
            raise CheckpointError(
                f"{path} already exists; choose a new directory or pass overwrite=True (--force)."
            )
        shutil.rmtree(path)
    check_params(model, params)
    # Orbax stages jax arrays to the host in bounded chunks, but copies numpy leaves whole. In a
    # multi-host run it takes only global arrays, so there the leaves go as numpy.
    params = jax.tree.map(jnp.asarray if jax.process_count() == 1 else np.asarray, params)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_config(model),
        "metadata": dict(metadata or {}),
    }
    with _checkpointer() as ckpt:
        ckpt.save(
            path,
            ocp.args.Composite(
                params=ocp.args.PyTreeSave(params), config=ocp.args.JsonSave(config)
            ),
        )
    return path


def _require_checkpoint(directory: str | os.PathLike) -> Path:
    path = Path(directory).absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; expected a stam-jax checkpoint directory "
            "(convert an official .pth with: python -m convert stam_16.pth OUT_DIR)."
        )
    if not (path / "config").is_dir() or not (path / "params").is_dir():
        raise CheckpointError(
            f"{path} is not a stam-jax checkpoint (no 'config' and 'params' inside); "
            "convert an official .pth with: python -m convert stam_16.pth OUT_DIR."
        )
    return path


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads only the JSON config (model fields and metadata) of a checkpoint."""
    path = _require_checkpoint(directory)
    with _checkpointer() as ckpt:
        restored = ckpt.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = restored["config"]
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} holds format {config.get('format')!r}, not {FORMAT!r}.")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer stam-jax (version {config['version']} > {VERSION}); "
            "upgrade stam-jax."
        )
    return config


def load(
    directory: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
) -> tuple[STAM, dict[str, Any]]:
    """Loads a checkpoint as `(model, params)`.

    `model.apply({'params': params}, videos)` then gives logits `(B, num_classes)`.

    Args:
      directory: a checkpoint written by `save` or `python -m convert`.
      dtype: compute dtype of the returned model ('float32', 'bfloat16', 'float16').
      param_dtype: dtype the params are cast to.
      attention_impl: 'auto', 'xla' or 'cudnn'.

    Returns:
      The `STAM` module and its params (jax arrays on the default device).
    """
    config = read_config(directory)
    model = model_from_config(
        config["model"], dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
    )
    params = read_params(directory, model)
    return model, jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)


def read_params(directory: str | os.PathLike, model: STAM) -> dict[str, Any]:
    """Reads a checkpoint's params as host numpy arrays, checked against `model` first.

    Args:
      directory: a stam-jax checkpoint directory.
      model: the model the params must fit (e.g. from `read_config`).

    Returns:
      The params tree of numpy arrays, in their stored dtype.
    """
    path = _require_checkpoint(directory)
    with _checkpointer() as ckpt:
        stored = ckpt.metadata(path).item_metadata["params"]
        check_params(model, stored)  # from the metadata: refused before any tensor is read
        # Host arrays: valid whatever devices wrote the checkpoint or read it now.
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        restored = ckpt.restore(
            path, ocp.args.Composite(params=ocp.args.PyTreeRestore(restore_args=as_numpy))
        )
    return restored["params"]


def abstract_params(model: STAM) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s params, without allocating them."""
    t, s = model.num_frames, model.image_size
    video = jax.ShapeDtypeStruct((1, t, s, s, 3), jnp.uint8)
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)["params"]


def check_params(model: STAM, params: Mapping[str, Any]) -> None:
    """Raises `CheckpointError` naming every param whose path or shape does not fit `model`."""
    expected = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
    }
    found = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    problems = [f"missing param {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected param {k}" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"param {k}: expected shape {expected[k]}, found {found[k]}"
        for k in sorted(expected.keys() & found.keys())
        if expected[k] != found[k]
    ]
    if problems:
        raise CheckpointError("params do not fit the model:\n  " + "\n  ".join(problems))
