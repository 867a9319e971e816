"""stam-jax checkpoints: an orbax directory holding the params AND the model config.

Layout of a checkpoint directory (written atomically by orbax):

    DIR/params   the Flax params (orbax StandardCheckpointHandler)
    DIR/config   JSON: {"format": "stam_jax", "version": 1, "model": {...}, "metadata": {...}}

`load(DIR)` needs nothing else: the architecture comes from the config, so a converted official
checkpoint is one call away from logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from stam_jax.interrupts import interrupts_held
from stam_jax.model import STAM, fitting_model, params_misfit
from stam_jax.paths import swap_in, unwritable
from stam_jax.variants import model_config, model_from_config

FORMAT = "stam_jax"
VERSION = 1

# An overwrite writes the new checkpoint to DIR + _NEW first, then renames DIR to DIR + _OLD,
# DIR + _NEW to DIR, and only then deletes DIR + _OLD: a run killed at any point leaves a complete
# checkpoint at DIR, or (between the two renames only) both complete ones under these names.
_NEW, _OLD = ".stam-jax-new", ".stam-jax-old"
_T = TypeVar("_T")


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


def is_checkpoint_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a stam-jax checkpoint directory (holds `config/` and `params/`)."""
    path = Path(directory)
    return (
        path.is_dir()
        and not path.is_symlink()
        and (path / "config").is_dir()
        and (path / "params").is_dir()
    )


# What orbax writes in a stam-jax checkpoint directory, and in its `config/` and `params/`;
# anything else is a user's file. Besides these names, orbax writes its metadata files (named
# '_' and capitals, e.g. `_CHECKPOINT_METADATA`, `_METADATA`, and `_sharding`) and one OCDBT
# folder per saving process (`ocdbt.process_N`): only those exact forms, and only as a file or a
# folder as orbax makes them, are taken for orbax's (a user's `_notes.txt` or `_backup/` is not).
_WRITTEN = {
    ".": {"config", "params", "commit_success.txt"},
    "config": {"metadata", "commit_success.txt"},
    "params": {"d", "array_metadatas", "manifest.ocdbt", "commit_success.txt", "descriptor"},
}
_ORBAX_FILE = re.compile(r"_[A-Z][A-Z_]*|_sharding")
_ORBAX_FOLDER = re.compile(r"ocdbt\.process_\d+")


def _written_by_orbax(entry: Path) -> bool:
    """Whether `entry`, in a checkpoint directory or its `config/` or `params/`, is one of the
    metadata files or OCDBT folders orbax writes there."""
    if entry.is_symlink():
        return False
    if _ORBAX_FILE.fullmatch(entry.name):
        return entry.is_file()
    return bool(_ORBAX_FOLDER.fullmatch(entry.name)) and entry.is_dir()


def _foreign_entries(path: Path) -> list[str]:
    """Entries of checkpoint directory `path` that orbax did not write there, or that make it
    something else than a stam-jax checkpoint (e.g. a project folder with `config/`, `params/`)."""
    foreign = []
    for folder, names in _WRITTEN.items():
        for entry in sorted((path / folder).iterdir()):
            name = entry.name
            if name in names or _written_by_orbax(entry):
                continue
            foreign.append(name if folder == "." else f"{folder}/{name}")
    try:
        config = json.loads((path / "config" / "metadata").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        foreign.append("config/ without a stam-jax config")
    return foreign


def _some(names: list[str]) -> str:
    """The first five names, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_destination(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuses a checkpoint destination that `save` could not or must not write; deletes nothing.

    With `overwrite`, an existing destination is replaced only if it is a stam-jax checkpoint
    directory or an empty directory; a file, a symbolic link or any other directory is refused.
    Cheap: call it before a long conversion so that no work is lost to a bad output path.

    Args:
      directory: the checkpoint directory to be written.
      overwrite: whether an existing checkpoint directory may be replaced (`--force`).

    Returns:
      The absolute destination path.

    Raises:
      CheckpointError: naming the path, why it cannot be written, and what to do instead.
    """
    path = Path(os.path.abspath(directory))  # 'out/..' and '.' have a name to stage beside
    keep = "so nothing was deleted: choose a new directory."
    if path.is_symlink():
        raise CheckpointError(
            f"{path} is a symbolic link (to {os.readlink(path)}); a checkpoint is never written "
            "through or over a link: pass the directory itself, or a new directory."
        )
    if path.exists():
        if not overwrite:
            raise CheckpointError(
                f"{path} already exists; choose a new directory or pass --force (overwrite=True "
                "from Python) to replace it."
            )
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file, not a checkpoint directory; --force replaces only a stam-jax "
                f"checkpoint directory or an empty directory, {keep}"
            )
        if not is_checkpoint_dir(path):
            try:
                names = sorted(p.name for p in path.iterdir())
            except OSError as e:
                raise CheckpointError(f"cannot read {path}: {e.strerror or e}.") from None
            if names:
                raise CheckpointError(
                    f"{path} is not a stam-jax checkpoint (it holds {_some(names)}); --force "
                    f"replaces only a stam-jax checkpoint directory or an empty directory, {keep}"
                )
        else:
            foreign = _foreign_entries(path)
            if foreign:
                raise CheckpointError(
                    f"{path} holds what a stam-jax checkpoint does not ({_some(foreign)}); "
                    f"replacing it would delete them, so nothing was deleted: choose a new "
                    "directory, or move them out first."
                )
    # Created in the parent; an existing checkpoint is also emptied before it is replaced.
    problem = unwritable(path) or (unwritable(path, into=True) if path.exists() else None)
    if problem:
        raise CheckpointError(f"cannot write {path}: {problem}; choose another path.")
    return path


def _siblings(path: Path, suffix: str) -> Iterator[Path]:
    """`path + suffix` and orbax's temporary folders for it, where they exist."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name == path.name + suffix or name.startswith(f"{path.name}{suffix}.orbax-checkpoint-"):
            yield path.parent / name


def _remove_leftovers(path: Path, *suffixes: str) -> None:
    """Deletes what an interrupted save of `path` left beside it (never anything else)."""
    for suffix in suffixes:
        for leftover in _siblings(path, suffix):
            if leftover.is_symlink() or not leftover.is_dir():
                continue  # not ours
            shutil.rmtree(leftover, ignore_errors=True)


def save(
    directory: str | os.PathLike,
    model: STAM,
    params: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `params` and `model`'s architecture to `directory`.

    An overwrite is safe to interrupt: the new checkpoint is written beside `directory` first and
    swapped in by renames, and the old one is deleted only after; `directory` then always holds a
    complete checkpoint (see `_require_checkpoint` for the one narrow exception).

    Args:
      directory: destination; must not exist unless `overwrite`.
      model: the `STAM` whose params these are (its run-time dtype is not saved).
      params: the params tree (numpy or jax arrays).
      metadata: free facts (source file, source dtype, ...): str keys, plain JSON values (no
        numpy numbers, no NaN); anything else is refused before anything is written.
      overwrite: replace an existing checkpoint directory (or an empty directory); anything else
        at `directory` is refused (`check_destination`).

    Returns:
      The absolute checkpoint path.

    Raises:
      CheckpointError: a destination that cannot be written (nothing deleted), params that do not
        fit `model`, metadata or a model field (e.g. `num_classes=np.int64(5)`) that is not
        JSON, or a write that failed (the old checkpoint, if any, kept; a new one is removed
        whole).
    """
    path = check_destination(directory, overwrite=overwrite)
    check_params(model, params)
    metadata = _json_metadata(metadata)
    architecture = _json_architecture(model)
    # Orbax stages jax arrays to the host in bounded chunks, but copies numpy leaves whole. In a
    # multi-host run it takes only global arrays, so there the leaves go as numpy.
    params = jax.tree.map(jnp.asarray if jax.process_count() == 1 else np.asarray, params)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": architecture,
        "metadata": metadata,
    }
    new, old = path.with_name(path.name + _NEW), path.with_name(path.name + _OLD)
    written = None  # a complete new directory, until it is in place
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty directory: nothing to keep
        replacing = path.exists()
        _remove_leftovers(path, _NEW)  # a staging copy an interrupted save left
        # Orbax's write is not cut by a Ctrl-C (cut, it leaves its temporary directory and its
        # threads print errors): the interrupt comes once the write is whole, and the new
        # checkpoint is then removed below.
        with interrupts_held(), _checkpointer() as ckpt:
            written = new if replacing else path
            ckpt.save(
                written,
                ocp.args.Composite(
                    params=ocp.args.PyTreeSave(params), config=ocp.args.JsonSave(config)
                ),
            )
        if replacing:
            _remove_leftovers(path, _OLD)
            swap_in(new, path, old)
        written = None
        _remove_leftovers(path, _OLD, _NEW)
    except BaseException as e:
        _remove_leftovers(path, _NEW)
        if written == path:  # interrupted or failed: nothing is written
            _remove_leftovers(path, "")
        if isinstance(e, OSError):
            raise CheckpointError(
                f"cannot write {path}: {e.strerror or e}"
                + (f" ({e.filename})" if e.filename else "")
                + "; any previous checkpoint there is unchanged."
            ) from None
        raise
    return path


def _not_json(key: Any, value: Any) -> str | None:
    """Why `{key: value}` cannot be stored in the checkpoint's JSON config, or None."""
    if not isinstance(key, str):
        return f"keys must be str, not {type(key).__name__}"
    try:
        json.dumps(value, allow_nan=False)  # also refuses a value that contains itself
    except (TypeError, ValueError) as e:
        return str(e)
    # json.dumps turns int, float, bool and None keys of nested dicts into strings: read back,
    # such a dict would not be the one given.
    nested = [value]
    while nested:
        item = nested.pop()
        if isinstance(item, dict):
            for inner, child in item.items():
                if not isinstance(inner, str):
                    return f"key {inner!r} inside it: keys must be str, not {type(inner).__name__}"
                nested.append(child)
        elif isinstance(item, (list, tuple)):
            nested.extend(item)
    return None


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """`metadata` as a dict, refused before anything is written unless it is plain JSON."""
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        why = _not_json(key, value)
        if why is not None:
            raise CheckpointError(
                f"metadata[{key!r}] = {value!r} cannot be stored as JSON ({why}); pass plain "
                "Python values: str keys, and float(x) / int(x) / x.tolist() for numpy values, "
                "None for NaN. Nothing was written."
            )
    return metadata


def _json_architecture(model: STAM) -> dict[str, Any]:
    """`model_config(model)`, refused before anything is written unless it is plain JSON (a
    field set from a numpy value, such as num_classes=np.int64(5), failed inside orbax)."""
    config = model_config(model)
    for field, value in config.items():
        if _not_json(field, value) is not None:
            raise CheckpointError(
                f"the model's {field}={value!r} ({type(value).__name__}) cannot be stored in the "
                f"checkpoint's JSON config; build the model with a plain Python value (e.g. "
                f"{field}=int(x) or float(x)). Nothing was written."
            )
    return config


def _require_checkpoint(directory: str | os.PathLike) -> Path:
    path = Path(directory).absolute()
    convert = "convert an official .pth with: python -m convert stam_16.pth OUT_DIR"
    if not path.exists():
        left = [
            p for suffix in (_NEW, _OLD) for p in _siblings(path, suffix) if is_checkpoint_dir(p)
        ]
        if left:
            raise CheckpointError(
                f"{path} does not exist, but an overwrite of it was interrupted and left "
                + " and ".join(
                    f"{p} (the {'new' if p.name.endswith(_NEW) else 'previous'} checkpoint)"
                    for p in left
                )
                + f": rename the one you want to {path}."
            )
    if path.is_file() and path.suffix.lower() in (".pth", ".pt"):
        raise CheckpointError(
            f"{path} is a PyTorch file; a stam-jax checkpoint directory is expected: convert it "
            f"once with python -m convert {path} {path.with_suffix('')} and pass "
            f"{path.with_suffix('')}."
        )
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(
            f"{path} {what}; expected a stam-jax checkpoint directory ({convert})."
        )
    if not (path / "config").is_dir() or not (path / "params").is_dir():
        runs = [name for name in ("final", "final_ema") if is_checkpoint_dir(path / name)]
        if runs or (path / "checkpoints").is_dir():
            if runs:
                use = " or ".join(str(path / name) for name in runs)
                hint = f"pass {use}" + (" (the EMA params)" if "final_ema" in runs else "")
            else:
                hint = f"pass {path / 'final'} once training has finished"
            raise CheckpointError(
                f"{path} looks like a run_train.py workdir, not a stam-jax checkpoint: {hint}. "
                "(Its checkpoints/ holds the train state for resuming; python -m "
                f"stam_jax.export {path} OUT_DIR --step N makes a checkpoint of a saved step.)"
            )
        if (path / "state").is_dir() and path.parent.name == "checkpoints":
            raise CheckpointError(
                f"{path} is a saved train state of the run in {path.parent.parent}, not a "
                f"stam-jax checkpoint: make one of its params with python -m stam_jax.export "
                f"{path} OUT_DIR (--ema for their EMA), and pass OUT_DIR."
            )
        if is_checkpoint_dir(path.parent):
            raise CheckpointError(
                f"{path} is a folder inside the checkpoint {path.parent}: pass {path.parent}."
            )
        raise CheckpointError(
            f"{path} is not a stam-jax checkpoint (no 'config' and 'params' inside); {convert}."
        )
    return path


def _damaged(path: Path, error: BaseException) -> CheckpointError:
    """The error for a checkpoint directory whose files orbax cannot read."""
    lines = str(error).strip().splitlines()
    detail = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return CheckpointError(
        f"{path} is damaged or incompletely copied ({type(error).__name__}: {detail}); copy it "
        "again from a complete original, or write it anew."
    )


def _quiet_closed_loop_reports(unraisable: Any) -> None:
    # When one read of a damaged checkpoint fails, orbax closes its event loop while tensorstore
    # still completes the other reads; each then reports 'Event loop is closed' as unraisable.
    # Those reports are noise beside the CheckpointError, so they are dropped; any other
    # unraisable report goes to the hook that was installed before.
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    _quiet_closed_loop_reports.previous(unraisable)


_quiet_closed_loop_reports.previous = sys.unraisablehook


def _quiet_abandoned_reads() -> None:
    if sys.unraisablehook is not _quiet_closed_loop_reports:
        _quiet_closed_loop_reports.previous = sys.unraisablehook
        sys.unraisablehook = _quiet_closed_loop_reports


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Orbax reading `path`: whatever it raises is one `CheckpointError` saying the checkpoint
    is damaged (`_damaged`), except running out of memory, which is not the file's fault."""
    _quiet_abandoned_reads()
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:
        raise _damaged(path, e) from None


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory `path` names now (None: none), to tell when an overwrite swapped it.

    The directory's change and modification times: an overwrite swaps in a directory written
    later, and reading changes neither. (Not the inode number, which some FUSE file systems
    renumber while a directory stays the same.)
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ctime_ns, stat.st_mtime_ns


_READ_TRIES = 3


def _read_unchanged(path: Path, read: Callable[[], _T]) -> _T:
    """`read()`, again if the checkpoint at `path` was replaced while it ran.

    An overwrite (`save(..., overwrite=True)`, `python -m convert --force`) swaps the new
    directory in by two renames. A read that spans them can fail on a file that moved, or
    see parts of both checkpoints; it is then made again, from the new one.
    """
    for attempt in range(_READ_TRIES):
        before = _identity(path)
        try:
            result = read()
        except CheckpointError:
            if _identity(path) == before:
                raise
        else:
            if _identity(path) == before:
                return result
        if attempt < _READ_TRIES - 1:
            time.sleep(0.2 * (attempt + 1))  # let the overwrite end its renames
    raise CheckpointError(
        f"{path} was replaced while it was read, {_READ_TRIES} times in a row; read it once "
        "the overwrite (e.g. python -m convert --force) has finished."
    )


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads only the JSON config (model fields and metadata) of a checkpoint.

    Raises:
      CheckpointError: not a checkpoint directory, a damaged one, or one of another format.
    """
    path = Path(directory).absolute()
    return _read_unchanged(path, lambda: _read_config(path))


def _read_config(path: Path) -> dict[str, Any]:
    path = _require_checkpoint(path)
    with _reading(path), _checkpointer() as ckpt:
        config = ckpt.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if not isinstance(config, dict):
        raise _damaged(path, ValueError(f"config/metadata holds a {type(config).__name__}"))
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
      attention_impl: 'auto', 'xla', 'cudnn' or 'heads_first' (see `STAM`).

    Returns:
      The `STAM` module and its params (jax arrays on the default device, in `param_dtype`).

    Raises:
      CheckpointError: not a checkpoint directory (a `.pth`, a training workdir, a missing
        path: the message says what to pass), a damaged one, or one of another format; params
        beyond `param_dtype`'s range (float16: +-65504), which the cast would make Inf.
      ValueError: a `dtype` or `param_dtype` other than float32, bfloat16 and float16.
    """
    _, model, params = read(
        directory, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
    )
    over = out_of_range_params(params, model.param_dtype)
    if over:
        raise CheckpointError(
            f"{out_of_range_message(Path(directory), over, model.param_dtype)}; load them with "
            "param_dtype='bfloat16' (float32's range) or 'float32'."
        )
    return model, jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)


def read(
    directory: str | os.PathLike, **runtime: Any
) -> tuple[dict[str, Any], STAM, dict[str, Any]]:
    """Reads a checkpoint's config, its model and its params, all from one directory even when
    an overwrite swaps it meanwhile.

    Args:
      directory: a stam-jax checkpoint directory.
      **runtime: run-time model fields (`dtype`, `param_dtype`, `attention_impl`, ...), passed
        to `model_from_config` over the checkpoint's config.

    Returns:
      (the config as `read_config` gives it, the model, the params as host numpy arrays in
      their stored dtype).

    Raises:
      CheckpointError: not a checkpoint directory, a damaged one, or one of another format.
      ValueError: a `runtime` name that is not a model field, or an unsupported dtype.
    """
    path = Path(directory).absolute()

    def read_all() -> tuple[dict[str, Any], STAM, dict[str, Any]]:
        config = _read_config(path)
        model = model_from_config(config["model"], **runtime)
        return config, model, _read_params(path, model, _inconsistent(path))

    return _read_unchanged(path, read_all)


def read_params(
    directory: str | os.PathLike, model: STAM, *, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Reads a checkpoint's params as host numpy arrays, checked against `model` first.

    Args:
      directory: a stam-jax checkpoint directory.
      model: the model the params must fit (e.g. from `read_config`).
      config: what `read_config` returned for `directory` earlier, if the caller built `model`
        or anything else from it: the params are then refused if an overwrite has since
        replaced the checkpoint with one of another config, rather than mixed with it.

    Returns:
      The params tree of numpy arrays, in their stored dtype.

    Raises:
      CheckpointError: not a checkpoint directory, a damaged one, one replaced since `config`
        was read, or params that do not fit.
    """
    path = Path(directory).absolute()

    if config is not None:  # the model is built from the checkpoint's own config
        fix = _inconsistent(path)
    else:
        fix = (
            f"To read them, build the model from the checkpoint's config, "
            f"stam_jax.variants.model_from_config(read_config({str(path)!r})['model']), or read "
            "both with stam_jax.checkpoints.load."
        )

    def read() -> dict[str, Any]:
        if config is not None:
            _check_same_config(path, config, _read_config(path))
        return _read_params(path, model, fix)

    return _read_unchanged(path, read)


def _check_same_config(path: Path, before: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Raises `CheckpointError` if the config at `path` is no longer `before`."""
    if now == before:
        return
    old, new = before.get("model", {}), now.get("model", {})
    changed = [
        f"{name} {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    what = "model " + ", ".join(changed) if changed else "the same model, other metadata"
    raise CheckpointError(
        f"{path} was replaced after its config was read, by an overwrite such as "
        f"python -m convert --force ({what}); nothing was read from the new one: start again "
        "to use it."
    )


def _inconsistent(path: Path) -> str:
    """The fix for a checkpoint whose config/metadata does not describe its own params."""
    return (
        f"{path}'s config/metadata does not describe its own params: it was edited, or parts "
        "of two checkpoints were mixed; write it again (python -m convert from its .pth, or "
        "python -m stam_jax.export from its training run)."
    )


def _read_params(path: Path, model: STAM, fix: str) -> dict[str, Any]:
    path = _require_checkpoint(path)
    with _checkpointer() as ckpt:
        with _reading(path):
            stored = ckpt.metadata(path).item_metadata["params"]
        if not stored:
            raise _damaged(path, ValueError("params/_METADATA is missing or empty"))
        # From the metadata (its tree of shapes): refused before any tensor is read.
        check_params(model, getattr(stored, "tree", stored), fix=fix)
        # Host arrays: valid whatever devices wrote the checkpoint or read it now.
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        with _reading(path):
            restored = ckpt.restore(
                path, ocp.args.Composite(params=ocp.args.PyTreeRestore(restore_args=as_numpy))
            )
    return restored["params"]


def abstract_params(model: STAM) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s params, without allocating them."""
    t, s = model.num_frames, model.image_size
    video = jax.ShapeDtypeStruct((1, t, s, s, 3), jnp.uint8)
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)["params"]


def not_a_params_tree(params: Any) -> str | None:
    """What `params` is instead of a params tree (a nested dict), with the fix; None if a dict.

    A train state (`stam_jax.train_step.TrainState`, or any object holding `params`) or a list
    of arrays was otherwise taken for a tree whose every param is missing (thousands of lines
    for a full-size model) or failed on a missing dict method.
    """
    if isinstance(params, Mapping):
        return None
    kind = type(params).__name__
    if hasattr(params, "params"):
        also = " (or its EMA, state.ema_params)" if hasattr(params, "ema_params") else ""
        return f"got a {kind}, not a params tree; pass its params, state.params{also}."
    return (
        f"got a {kind}, not a params tree; pass the nested dict of arrays, "
        "model.init(...)['params'] (or the params of checkpoints.load)."
    )


def check_params(model: STAM, params: Mapping[str, Any], *, fix: str | None = None) -> None:
    """Raises `CheckpointError` naming every param whose path or shape does not fit `model`.

    Args:
      model: the model the params must fit.
      params: a params tree (arrays, or anything with a `shape`).
      fix: what the message ends with, for a caller that knows where the params came from;
        by default, the `create_model` call of the model they fit (as far as their shapes
        tell).
    """
    problem = not_a_params_tree(params)
    if problem is not None:
        raise CheckpointError(f"params do not fit the model: {problem}")
    if set(params) == {"params"}:
        # Else every param would be listed twice, as missing and as unexpected.
        raise CheckpointError(
            "params do not fit the model: they are the whole variables ({'params': ...}); pass "
            "the params tree, variables['params']."
        )
    misfit = params_misfit(model, params)
    if misfit is None:
        return
    problems, overrides = misfit
    raise CheckpointError(
        "params do not fit the model:\n  "
        + "\n  ".join(problems)
        + "\n"
        + (fix or f"To use them, {fitting_model(overrides)}.")
    )


def non_finite_params(params: Mapping[str, Any]) -> list[str]:
    """The '/'-joined paths of the params holding NaN or Inf (a run that diverged), in order."""
    from flax.traverse_util import flatten_dict

    return [
        name
        for name, value in flatten_dict(params, sep="/").items()
        if not np.isfinite(np.asarray(value, np.float32)).all()
    ]


def out_of_range_params(params: Mapping[str, Any], dtype: Any) -> list[str]:
    """The '/'-joined paths of the params holding finite values that a cast to `dtype` makes
    Inf (float16: beyond +-65504), in order; none for float32 and bfloat16 (float32's range)."""
    from flax.traverse_util import flatten_dict

    dtype = jnp.dtype(dtype)
    if jnp.finfo(dtype).max >= jnp.finfo(jnp.float32).max:
        return []
    found = []
    for name, value in flatten_dict(params, sep="/").items():
        value = np.asarray(value)
        with np.errstate(over="ignore"):
            cast = value.astype(dtype)
        if (np.isinf(cast) & np.isfinite(value)).any():
            found.append(name)
    return found


def out_of_range_message(source: str | os.PathLike, names: list[str], dtype: Any) -> str:
    """'`source` holds values beyond float16's range in N param(s) (the first five named)'."""
    name = jnp.dtype(dtype).name
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{source} holds values beyond {name}'s range (+-{float(jnp.finfo(name).max):g}) in "
        f"{len(names)} param(s) ({shown}), which a cast to {name} makes Inf"
    )


def non_finite_message(source: str | os.PathLike, names: list[str]) -> str:
    """'`source` holds NaN or Inf values in N param(s) (the first five named)', for refusals."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{source} holds NaN or Inf values in {len(names)} param(s) ({shown})"


# What to do about a diverged run's params, for refusals that name them.
EARLIER_STEP = (
    "a run that diverged: export an earlier step with "
    "python -m stam_jax.export RUN_DIR OUT_DIR --step N"
)
