"""What a restart of a training run must keep: the run record (`WORKDIR/run_config.json`, the
settings that define what a run computes) and the metrics log cut back to the checkpoint.

A restart in the same workdir continues one run, so it may change how the run is executed,
logged, saved or evaluated, not what it computes (`check_same_run`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax

from stam_jax import sharding
from stam_jax.configs import flat_fields
from stam_jax.data.folder import VideoFolder
from stam_jax.train_step import TrainConfigError

# Fields a restart may change: how the run is executed, logged, saved or evaluated, not what
# it computes. Any other change would silently mix two runs in one workdir.
_RESTART_MAY_CHANGE = (
    "progress",
    "compilation_cache_dir",
    "distributed",
    "attention_impl",
    "remat",
    "frame_chunk",
    "triton_gemm",
    "data.workers",
    "data.prefetch",
    "train.log_every",
    "train.save_every",
    "train.keep",
    "train.eval_every",
    "train.eval_root",
    # Only the periodic evaluation reads these (its best restarts when they change).
    "data.root",
    "data.num_clips",
    "data.num_crops",
    "data.short_videos",
    "eval",
)
RUN_RECORD = "run_config.json"

# Settings added to the run record since it was first written, with the value every run
# started before them computed with: a record without one is compared as holding that value
# (a run of the whole model resumed with train.freeze=vit would otherwise be let through, and
# fail restoring its optimizer state). Add each new setting of the record here.
_ADDED_SINCE = {"train.freeze": "", "train.layer_decay": 1.0}


_LISTING = "train.root_listing"  # the run record's entry for `VideoFolder.listing_digest`
# The run record's entry for how the training data is read: 'videos', or a prepared dataset's
# frames (`data_form`). A prepared dataset's listing is its videos', but not its frames (resized
# when prepared, or JPEG), nor its order of reading.
_FORM = "train.root_form"


def data_form(prepared: Any) -> str:
    """How a run reads its training data: 'videos' (decoded), or 'a prepared dataset (FRAMES)'
    (`PreparedDataset.frames`: raw, or JPEG of a quality)."""
    return "videos" if prepared is None else f"a prepared dataset ({prepared.frames})"


def _run_record(config: Any, folder: VideoFolder, form: str) -> dict[str, Any]:
    """The config fields that define what a run computes, flattened ('train.steps': 1000), the
    digest of the training data's listing (the data may move, not change) and how the data is
    read (`data_form`)."""
    return {
        **flat_fields(config, _RESTART_MAY_CHANGE),
        _LISTING: folder.listing_digest(),
        _FORM: form,
    }


# Run record fields that name where something is, not what it is: the processes of one run
# may find their data and checkpoints at other paths (the listing is compared by its digest).
_PATHS = ("train.root", "checkpoint", "train.teacher", "data.class_list")


# Settings each process of a multi-process run may set for itself: how it runs on its own host
# (which process it is, where it finds the coordinator and how long it waits for it, its reading
# workers, its cache, its progress bar, how often process 0 logs), none of which changes what a
# collective computes or when one runs. `data.root` is not read in training (the periodic
# evaluation reads `train.eval_root`).
_PER_PROCESS = (
    "distributed.process_id",
    "distributed.coordinator",
    "distributed.join_timeout",
    "data.workers",
    "data.prefetch",
    "data.root",
    "progress",
    "compilation_cache_dir",
    "train.log_every",
)


_EVAL_ROOT = "train.eval_root"  # a path, compared by its listing (`process_settings`)


def process_settings(
    config: Any,
    folder: VideoFolder,
    form: str,
    eval_folder: VideoFolder | None = None,
    teacher: Any = None,
) -> dict[str, Any]:
    """What every process of a multi-process training must have the same, as flags
    (`--config.train.steps`): every setting but those of `_PER_PROCESS`, and for the paths
    what they hold, named beside it: the training data's listing and form, the periodic
    evaluation's listing (`eval_folder`, when it is on) and the distillation teacher's params
    (`teacher`, host arrays, with --config.train.teacher). The initial checkpoint is compared
    by the params read from it (`train._initial_params_setting`).

    A restart may change how often a run saves or evaluates, or how it compiles
    (`_RESTART_MAY_CHANGE`), but its processes may not differ in them: each decides when the
    collectives of a save or an evaluation run, and what the compiled step exchanges.
    """
    fields = flat_fields(config, _PER_PROCESS)
    settings = {f"--config.{k}": v for k, v in fields.items() if k not in (*_PATHS, _EVAL_ROOT)}
    settings["--config.train.root's form"] = form
    # Compared by content: the paths may differ between hosts.
    settings["--config.train.root's listing"] = _listing(config.train.root, folder)
    if eval_folder is not None:
        settings[f"--config.{_EVAL_ROOT}'s listing"] = _listing(config.train.eval_root, eval_folder)
    teacher_params = sharding.by_content("none", "none")
    if teacher is not None:
        checksum = sharding.tree_digest(teacher)
        teacher_params = sharding.by_content(
            f"{config.train.teacher} (checksum {checksum})", checksum
        )
    settings["--config.train.teacher's params"] = teacher_params
    return settings


def _listing(root: str, folder: VideoFolder) -> dict[str, str]:
    """A data root as `process_settings` compares it: by its listing's digest, shown with the
    root and the counts of classes and videos."""
    digest = folder.listing_digest()[:12]
    listing = f"{len(folder.classes)} classes, {len(folder.items)} videos, digest {digest}"
    return sharding.by_content(f"{root} ({listing})", listing)


def _same_place(a: Any, b: Any) -> bool:
    """Whether two path settings lead to the same place (both non-empty strings)."""
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def write_run_record(config: Any, workdir: Path, folder: VideoFolder, form: str) -> None:
    """Saves the fields a restart must not change (process 0), for `check_same_run`."""
    if jax.process_index() == 0:
        staging = workdir / f"{RUN_RECORD}.tmp"
        staging.write_text(json.dumps(_run_record(config, folder, form), indent=1) + "\n")
        staging.replace(workdir / RUN_RECORD)


def _left_results(workdir: Path) -> bool:
    """Whether a run in `workdir` logged metrics or kept best params (what a new one would mix
    with)."""
    log = workdir / "metrics.jsonl"
    logged = log.exists() and any(line.strip() for line in log.read_text().splitlines())
    return logged or (workdir / "best.json").exists()


def check_same_run(config: Any, workdir: Path, start: int, folder: VideoFolder, form: str) -> None:
    """Refuses to resume the run in `workdir` with a config that computes something else.

    The training data may move (`--config.train.root` another path to the same listing), but
    not change its form (`data_form`): decoded videos, a prepared dataset of them, raw or JPEG
    frames of another quality give other clips.

    Fields only one side holds (added to or removed from stam-jax since the run started) are
    not compared, but for those of `_ADDED_SINCE`, which a record without them is taken to
    hold at the value older runs computed with; a run from before the record is resumed with
    a warning. With no checkpoint to resume from (`start` 0), a record left by an earlier
    start is checked the same way.
    """
    record = workdir / RUN_RECORD
    # Without a checkpoint (none saved yet, or deleted) the run starts again from step 0, but
    # over its metrics, TensorBoard events, evaluations and best params: only the same run may.
    # One that stopped before logging anything (a refusal mid-start, a NaN loss at step 1)
    # left nothing to mix with, and may start again with other settings.
    if not start and not (record.exists() and _left_results(workdir)):
        return
    run = f"the run at step {start}" if start else "a run that left no checkpoint"
    if not record.exists():
        print(
            f"warning: {workdir} has no {RUN_RECORD} (a run started by an older stam-jax), so "
            "this restart cannot check that its settings are the run's; resuming.",
            file=sys.stderr,
            flush=True,
        )
        return
    try:
        saved = json.loads(record.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a {type(saved).__name__}, not the settings")
    except (OSError, ValueError) as e:
        raise TrainConfigError(
            f"cannot read {record} ({e}), which holds the settings of {run} in {workdir}; "
            "restore it, or start a new --workdir."
        ) from None
    now = json.loads(json.dumps(_run_record(config, folder, form)))  # tuples as lists, as saved
    saved = {**{k: v for k, v in _ADDED_SINCE.items() if k in now}, **saved}
    # Only fields both know: one added (but those of _ADDED_SINCE) or removed by another
    # stam-jax version is not compared.
    # A path written another way (./ckpt, ckpt/) that leads to the same place is no change.
    changed = [
        k
        for k in sorted(saved)
        if now.get(k, saved[k]) != saved[k] and not (k in _PATHS and _same_place(saved[k], now[k]))
    ]
    if changed == ["train.root"] and saved.get(_LISTING) == now[_LISTING]:
        print(
            f"the training data moved from {saved['train.root']} to {now['train.root']}: the "
            f"same {len(folder.items)} videos, classes and labels; "
            f"{'resuming' if start else 'starting it again'}.",
            file=sys.stderr,
            flush=True,
        )
        return

    def line(k: str) -> str:
        if k == _LISTING:
            return f"{k}: the videos, classes or labels of the training data differ"
        if k == _FORM:  # the same videos, other frames: where the run read them is the fix
            return (
                f"{k}: read as {saved[k]} then, as {now[k]} now (other frames; the run read "
                f"--config.train.root={saved.get('train.root')})"
            )
        return f"{k}: {saved[k]!r} -> {now[k]!r}"

    changed = [line(k) for k in changed]
    if changed:
        steps = any(line.startswith("train.steps:") for line in changed)
        raise TrainConfigError(
            f"{workdir} holds {run} made with other settings; "
            f"{'resuming' if start else 'starting over it'} would mix two runs"
            + (
                " (the learning-rate schedule spans train.steps, so a longer run is not a "
                "continuation)"
                if steps
                else ""
            )
            + ". Changed:\n  "
            + "\n  ".join(changed)
            + f"\nRestore those values to {'resume' if start else 'run it again'} (the "
            "training data may move to another "
            "--config.train.root, with the same files), or start a new --workdir"
            + (
                f" (to train longer: --config.checkpoint={workdir / 'final'} there)"
                if steps and (workdir / "final").exists()
                else ""
            )
            + f". {record} holds the run's settings."
        )


def truncate_log(path: Path, step: int) -> list[str]:
    """Drops rows past `step` (logged after the checkpoint a resumed run restarts from); returns
    the rows kept.

    A row that is not a JSON object is dropped too: the last one cut off by a kill or a full
    disk as it was written (it made every resume of the run fail with a traceback), with a
    warning if it is not the last.
    """
    if not path.exists():
        return []
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(rows, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if number < len(rows):
                print(
                    f"warning: {path} line {number} is not a JSON object; dropped.",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return kept
