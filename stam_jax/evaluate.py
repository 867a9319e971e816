"""Evaluation with the official Kinetics protocol: one jit-compiled, data-parallel forward.

`evaluate(config, workdir)` lists the video folder, checks the checkpoint against the data and the
config (before any compute), compiles the forward once for a fixed global batch, and streams the
videos through it: decoding runs in worker processes ahead of the device, the last partial batch
is padded and its padding ignored, so every video counts exactly once. Each process of a
multi-host run decodes its own share of the files; the results are gathered to every process and
written by process 0: `results.json` and `predictions.jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from stam_jax import checkpoints, partial, sharding
from stam_jax.configs import (
    config_files_for,
    flat_fields,
    model_from_run_config,
    name_data_flags,
)
from stam_jax.data.folder import (
    HIDDEN,
    ClassListError,
    DatasetError,
    VideoFolder,
    ignored_summary,
    listing_report,
    official_differences,
    official_report,
)
from stam_jax.data.loader import (
    Decoded,
    Started,
    decode_in_order,
    with_listed_path,
    worker_count,
)
from stam_jax.data.prepared import PreparedDataset, PreparedError, list_root
from stam_jax.data.video import ClipSpec
from stam_jax.model import STAM
from stam_jax.paths import (
    made_and_claimed,
    missing_folders,
    new_folders_removed_on_failure,
    unwritable,
    within_data,
)
from stam_jax.plot import accuracy_computed
from stam_jax.progress import progress_bar
from stam_jax.variants import model_from_config

EXIT_SKIPPED = 3  # run_eval.py's exit status when some videos could not be evaluated


class EvalConfigError(ValueError):
    """A run that is refused before any compute; the message names the value and the fix."""


def _clip_spec(config: Any, model: STAM) -> ClipSpec:
    data = config.data
    try:
        return ClipSpec(
            num_frames=model.num_frames,
            frame_rate=data.frame_rate,
            resize=data.resize,
            crop=data.crop,
            num_clips=data.num_clips,
            num_crops=data.num_crops,
            short_videos=data.short_videos,
        )
    except ValueError as e:
        raise EvalConfigError(name_data_flags(e)) from None


def _check_workdir(workdir: str | Path | None, root: str = "") -> Path:
    """`--workdir` as a Path, refused (nothing created) if results could not be written there,
    or if it is the data `root` or inside it."""
    if workdir is None or not str(workdir).strip():
        raise EvalConfigError(
            "--workdir is empty; name the folder for results.json and predictions.jsonl "
            "(created if needed)."
        )
    path = Path(workdir)
    problem = unwritable(path, into=True)
    if problem:
        raise EvalConfigError(f"cannot write --workdir={path}: {problem}; name another folder.")
    if checkpoints.is_checkpoint_dir(path):  # the results would make it unreplaceable by --force
        raise EvalConfigError(
            f"--workdir={path} is a stam-jax checkpoint; write the results to a folder of their "
            f"own, e.g. --workdir={path.parent / (path.name + '_eval')}."
        )
    problem = within_data(path, root, "--config.data.root")
    if problem:
        raise EvalConfigError(f"--workdir={path} {problem}.")
    return path


def _config_model(config: Any) -> STAM:
    """The model the run config names (variant + overrides), refused with the flag to fix."""
    try:
        return model_from_run_config(config)
    except ValueError as e:
        raise EvalConfigError(str(e)) from None


def _frame_count_fix(config: Any, t: int, image_size: int) -> str:
    """What to pass so that the config samples `t` frames: config files for it, or an override."""
    files = config_files_for(t, image_size)
    fixes = [f"--config {' or '.join(files)}"] if files else []
    if config.model_overrides.num_frames is not None or not files:
        fixes.append(f"--config.model_overrides.num_frames={t}")
    rate = config.data.frame_rate
    return (
        f"use {' or '.join(fixes)}. --config.data.frame_rate sets how many seconds the T frames "
        f"cover (now {t} frames at {rate} fps = {t / rate:g} s; the official protocol samples "
        f"the first 10 s: frame_rate={t / 10:g})."
    )


# Fields that may differ between the processes of one run (paths are compared by content).
_PER_PROCESS = (
    "distributed.process_id",
    "distributed.join_timeout",  # read before the processes compare anything
    "data.workers",
    "data.prefetch",
    "progress",
    "compilation_cache_dir",
    "checkpoint",
    "data.root",
    "data.class_list",
    "train",  # not read by evaluation
)


# Fields that do not change a video's results either: an interrupted run may be finished with
# other values (`stam_jax.partial`).
_NOT_IN_RESULTS = (
    *_PER_PROCESS,
    "distributed",
    "batch_size",
    "frame_chunk",
    "remat",
    "triton_gemm",  # which GEMM kernels: the same results to float rounding
    "seed",
    # Training only: evaluation has no augmentation and no dropout.
    "data.train_flip",
    "data.train_min_area",
    # Whether accuracy is computed at the end; the videos' results are the same.
    "eval.accuracy",
    "model_overrides.dropout_rate",
    "model_overrides.drop_path_rate",
    "model_overrides.temporal_dropout_rate",
)


def _settings(
    config: Any,
    folder: VideoFolder,
    prepared: PreparedDataset | None,
    checksum: str,
    architecture: dict[str, Any],
    leave_out: tuple[str, ...] = _PER_PROCESS,
) -> dict[str, Any]:
    """The config but `leave_out`, the listing of the data (classes, videos, labels), how its
    frames are stored (a prepared dataset's JPEG frames are not the videos'), the params'
    `checksum` and the checkpoint's `architecture` (the same params under other head counts or
    another LayerNorm epsilon give other results): what every process of a multi-process
    evaluation must have the same (`_PER_PROCESS` left out), or what decides each video's
    results (`_NOT_IN_RESULTS`)."""
    settings = {f"--config.{k}": v for k, v in flat_fields(config, leave_out).items()}
    settings["--config.data.root's frames"] = prepared.frames if prepared else "raw"
    # Compared by content: the paths may differ between hosts, and between runs.
    digest = folder.listing_digest()[:12]
    listing = f"{len(folder.classes)} classes, {len(folder.items)} videos, digest {digest}"
    shown = f"{config.data.root} ({listing})"
    if config.data.class_list:
        shown += f" with {config.data.class_list}"
    settings["--config.data.root's listing"] = sharding.by_content(shown, listing)
    settings["--config.checkpoint's params"] = sharding.by_content(
        f"{config.checkpoint} (checksum {checksum})", checksum
    )
    settings["--config.checkpoint's architecture"] = json.loads(
        json.dumps(architecture, sort_keys=True)  # as a journal's JSON gives it back
    )
    return settings


def _load_model(config: Any, config_model: STAM) -> tuple[STAM, dict[str, Any]]:
    """The checkpoint's model at the run's dtypes, and its stored config, refused where it does
    not fit `config_model` (what the config samples clips for)."""
    if not config.checkpoint:
        raise EvalConfigError(
            "no checkpoint: pass --config.checkpoint=CKPT_DIR (convert an official .pth with "
            "python -m convert stam_16.pth CKPT_DIR)."
        )
    try:
        stored = checkpoints.read_config(config.checkpoint)
        model = model_from_config(
            stored["model"],
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            attention_impl=config.attention_impl,
            frame_chunk=config.frame_chunk,
        )
    except checkpoints.CheckpointError as e:
        raise EvalConfigError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:  # a config.json this version cannot build
        raise EvalConfigError(f"--config.checkpoint={config.checkpoint}: {e}") from None
    for name in ("num_classes", "aggregate"):  # the checkpoint defines the architecture
        wanted = config.model_overrides[name]
        if wanted is not None and wanted != getattr(model, name):
            raise EvalConfigError(
                f"--config.model_overrides.{name}={wanted!r}, but checkpoint "
                f"{config.checkpoint} holds {name}={getattr(model, name)!r}: evaluation runs "
                "the checkpoint's architecture; drop the override."
            )
    expected_t = config_model.num_frames
    if model.num_frames != expected_t:
        override = config.model_overrides.num_frames
        how = f" with --config.model_overrides.num_frames={override}" if override else ""
        raise EvalConfigError(
            f"checkpoint {config.checkpoint} is a T={model.num_frames} model, but the config "
            f"samples clips for {config.model}{how} (T={expected_t}); "
            + _frame_count_fix(config, model.num_frames, model.image_size)
        )
    if model.image_size != config.data.crop:
        raise EvalConfigError(
            f"checkpoint {config.checkpoint} takes {model.image_size}px frames but "
            f"--config.data.crop={config.data.crop}; set it to {model.image_size}."
        )
    if model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise EvalConfigError(
            f"--config.attention_impl=cudnn needs an NVIDIA GPU, but JAX's backend is "
            f"{jax.default_backend()!r}; use auto, xla or heads_first."
        )
    return model, stored


def _list_data(
    config: Any, model: STAM, spec: ClipSpec, flag: str = "--config.data.root"
) -> tuple[VideoFolder, Any]:
    """The listing of `config.data.root`, and the opened dataset when it is a prepared one.

    A root that cannot be listed or opened is refused with `flag` first (the flag to fix; ''
    for a caller that names it itself); a bad class list names its own flag.
    """
    root = config.data.root
    if not root:
        raise EvalConfigError(
            "no data: pass --config.data.root=VIDEO_ROOT (root/<class>/<video>) or a dataset "
            "made by python -m stam_jax.data.prepare."
        )
    try:
        folder, prepared = list_root(root, "eval", spec, config.data.class_list or None)
    except ClassListError as e:  # names its own flag
        raise EvalConfigError(str(e)) from None
    except (PreparedError, DatasetError) as e:
        raise EvalConfigError(f"{flag}: {e}" if flag else str(e)) from None
    if config.eval.accuracy and len(folder.classes) != model.num_classes:
        raise EvalConfigError(
            _class_count_message(config, folder, model, prepared is not None)
            + " For features or predictions of another dataset, whose classes are not the "
            "model's, add --config.eval.accuracy=False."
        )
    return folder, prepared


SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "eval"})


def _class_count_message(config: Any, folder: VideoFolder, model: STAM, prepared: bool) -> str:
    """Why the classes found do not fit the checkpoint's outputs, and what to change."""
    root, class_list, n = config.data.root, config.data.class_list, len(folder.classes)
    head = f"the checkpoint has {model.num_classes} outputs; labels would not line up."
    if class_list:
        return (
            f"--config.data.class_list={class_list} names {n} classes but {head} Give a class "
            f"list with the checkpoint's {model.num_classes} names, one per line, in label order"
            + (" (when preparing the dataset)." if prepared else ".")
        )
    names = ", ".join(folder.classes[:10]) + (" ..." if n > 10 else "")
    kind = "classes" if prepared else "class folders"
    message = f"{root} has {n} classes but {head} Its {kind}: {names}."
    hidden = [i.path for i in folder.ignored if i.reason == HIDDEN and "/" not in i.path]
    if hidden:
        message += f" (Hidden and system folders are not classes: {', '.join(hidden[:5])}.)"
    splits = [c for c in folder.classes if c.lower() in SPLIT_NAMES]
    if splits and not prepared:
        return (
            f"{message} {', '.join(splits)} look{'s' if len(splits) == 1 else ''} like dataset "
            f"splits, not classes: point --config.data.root at one of them (e.g. "
            f"{Path(root) / splits[-1]})."
        )
    return (
        f"{message} Give the full class list with --config.data.class_list=FILE (one name per "
        "line, in label order)" + (" when preparing the dataset." if prepared else ".")
    )


FEATURES = ("", "video", "frames")  # eval.features: none, the video feature, and per frame


def feature_width(model: STAM, views: int, features: str) -> int:
    """How many float32 values `features` (`eval.features`) gives per video: the video feature
    (the head's input, its views averaged), then for 'frames' each view's per-frame features
    (views x T x the ViT's width)."""
    if not features:
        return 0
    temporal = model.temporal_hidden_size or model.hidden_size
    width = temporal if model.aggregate == "transformer" else model.hidden_size
    if features == "frames":
        width += views * model.num_frames * model.hidden_size
    return width


def _forward_fn(
    model: STAM, average: str, features: str = ""
) -> Callable[[Any, jax.Array], tuple[jax.Array, ...]]:
    """The forward over `(batch, views, frames, H, W, 3)` videos, views averaged per video.

    It returns the mean logits and the ranking scores: the mean logits again for `average`
    'logits', the mean of the views' softmax for 'softmax'. With `features` ('video' or
    'frames') a third output holds each video's features, float32 `(batch, width)` (see
    `feature_width`).
    """

    def forward(params: Any, videos: jax.Array) -> tuple[jax.Array, ...]:
        b, v = videos.shape[:2]
        flat = videos.reshape((b * v, *videos.shape[2:]))
        if features:
            logits, state = model.apply({"params": params}, flat, mutable=["intermediates"])
        else:
            logits, state = model.apply({"params": params}, flat), {}
        logits = logits.reshape(b, v, -1)
        mean_logits = logits.mean(axis=1)
        scores = mean_logits
        if average == "softmax":
            scores = jax.nn.softmax(logits, axis=-1).mean(axis=1)
        if not features:
            return mean_logits, scores
        found = state["intermediates"]
        video = found["video_features"][0].astype(jnp.float32).reshape(b, v, -1).mean(axis=1)
        values = [video]
        if features == "frames":
            values.append(found["frame_features"][0].astype(jnp.float32).reshape(b, -1))
        return mean_logits, scores, jnp.concatenate(values, axis=1)

    return forward


def _at_positions(
    decoded: Generator[Decoded, None, None], positions: list[int], folder: VideoFolder
) -> Iterator[Decoded]:
    """`decoded` with each video's position in the whole folder, and its path there in a
    failure's reason (`with_listed_path`); closing this closes `decoded`.

    So closing the evaluation's input stops the decoding processes at once, rather than
    whenever the decoder is garbage collected.
    """
    try:
        for d in decoded:
            position = positions[d.position]
            listed = folder.items[position].path
            yield dataclasses.replace(
                with_listed_path(d, folder.root / listed, listed), position=position
            )
    finally:
        decoded.close()


def _allgather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows (equal shapes) in process order."""
    if jax.process_count() == 1:
        return array
    return multihost_utils.process_allgather(array).reshape(-1, *array.shape[1:])


def _metrics(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> dict[str, float]:
    if labels.size == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_class_accuracy": float("nan")}
    k = min(5, num_classes)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top1 = ranked[:, 0] == labels
    top5 = (ranked == labels[:, None]).any(axis=1)
    per_class = [top1[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "mean_class_accuracy": float(np.mean(per_class)),
    }


# The reason given for a video whose logits hold NaN or Inf (left out of the metrics).
NON_FINITE_REASON = "the model gave non-finite logits (NaN/Inf)"


def evaluate(
    config: Any,
    workdir: str | Path,
    *,
    report: bool = True,
    resumable: bool = True,
    claim: bool = True,
) -> dict[str, Any]:
    """Evaluates `config.checkpoint` on `config.data.root`; writes results to `workdir`.

    Args:
      config: a run config (`configs/stam_16.py` and friends).
      workdir: output folder for `results.json` and `predictions.jsonl`.
      report: print the summary (metrics, speed, skipped videos, a NaN/Inf logits warning) on
        process 0; the periodic evaluation of training prints its own, shorter one.
      resumable: keep each finished batch's results in `workdir/partial` until the end, and
        carry those an interrupted run with the same settings kept there (`stam_jax.partial`).
      claim: create and claim `workdir` as the run starts (`stam_jax.paths.made_and_claimed`).
        False (with `resumable=False` only) where it lies in a folder the caller holds (the
        periodic evaluation of training): nothing is created until process 0 writes the
        results, and the folder it then makes is removed again if that write fails. A run
        interrupted or failed on any process, including one whose process was ended at once
        because another failed (`stam_jax.sharding.stop_together`: nothing of it is cleaned up
        then), so leaves no folder.

    Returns:
      The results dict (also written as `results.json`). When no video was evaluated its
      metrics are NaN (null in `results.json`, which is always valid JSON).

    Raises:
      EvalConfigError: before `workdir` is created and before any compute, for a bad config
        value (variant, dtypes, attention, frames, distributed settings), a missing or
        mismatched checkpoint, data root, class list or class count, batch size, data option,
        or a `workdir` that cannot be created, one holding the kept results of an
        interrupted evaluation with other settings, or one another run is using (each process
        claims it for the run: `stam_jax.paths.claimed`).
    """
    if resumable and not claim:
        raise ValueError("evaluate: resumable=True keeps results in the workdir: it needs claim")
    with contextlib.ExitStack() as held:
        return _evaluate(config, workdir, report, resumable, claim, held)


def check_eval_settings(config: Any) -> None:
    """Refuses an `eval.average` or `eval.features` that evaluation cannot use (`EvalConfigError`,
    naming the flag and the values it takes); training checks its periodic evaluation's with it
    before its first step."""
    if config.eval.average not in ("logits", "softmax"):
        raise EvalConfigError(
            f"--config.eval.average={config.eval.average!r}; use 'logits' (the official "
            "average of the clips' logits) or 'softmax' (of their probabilities)."
        )
    features = config.eval.get("features", "")
    if features not in FEATURES:
        raise EvalConfigError(
            f"--config.eval.features={features!r}; use 'video' (each video's feature, the "
            "head's input), 'frames' (that and every frame's ViT feature) or '' (none)."
        )


def _evaluate(
    config: Any,
    workdir: str | Path,
    report: bool,
    resumable: bool,
    claim: bool,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    """`evaluate`; the workdir's claim, once made, is held by `held`."""
    start = time.perf_counter()
    # Config values first: nothing is created and nothing joins or computes before they pass.
    workdir = _check_workdir(workdir, config.data.root)
    dist = config.distributed
    try:
        sharding.check_distributed(*sharding.distributed_settings(dist))
    except ValueError as e:
        raise EvalConfigError(str(e)) from None
    config_model = _config_model(config)
    check_eval_settings(config)
    features = config.eval.get("features", "")
    # Found before the processes join: whichever creates the workdir, each then knows it new.
    missing = missing_folders(workdir)
    try:
        # SIGTERM stays a Ctrl-C (`keep_interrupts`): an evaluation has no step to save.
        sharding.initialize_distributed(*sharding.distributed_settings(dist), preemption=False)
    except ValueError as e:  # no cluster to discover
        raise EvalConfigError(str(e)) from None
    # A refusal in one process is one in all (each would otherwise wait for the others' data),
    # and processes started with different settings are refused.
    with sharding.shared_refusals(EvalConfigError) as agree:
        try:  # first: everything compiled after it is cached
            sharding.enable_compilation_cache(config.compilation_cache_dir)
        except ValueError as e:
            raise EvalConfigError(str(e)) from None
        model, stored = _load_model(config, config_model)
        spec = _clip_spec(config, model)
        width = feature_width(model, spec.num_views, features)
        try:
            model.frames_per_step(config.batch_size * spec.num_views * model.num_frames)
        except ValueError as e:
            raise EvalConfigError(f"--config.frame_chunk: {e}") from None
        folder, prepared = _list_data(config, model, spec)
        mesh = sharding.data_mesh()
        try:
            local_batch = sharding.local_batch_size(config.batch_size, mesh, "--config.batch_size")
        except ValueError as e:
            raise EvalConfigError(str(e)) from None

        pid, nproc = jax.process_index(), jax.process_count()

        # Refused here, before any decoding, if the checkpoint does not fit the model.
        try:
            params = checkpoints.read_params(config.checkpoint, model, config=stored)
        except checkpoints.CheckpointError as e:
            raise EvalConfigError(str(e)) from None
        bad = checkpoints.non_finite_params(params)
        if bad:  # every logit would be NaN: refused before any video is decoded
            found = checkpoints.non_finite_message(config.checkpoint, bad)
            raise EvalConfigError(
                f"--config.checkpoint: {found}, so "
                f"every prediction would be NaN; evaluate a checkpoint with finite params "
                f"({checkpoints.EARLIER_STEP})."
            )
        # float16 params, or float16 compute (which casts the params to it), would make params
        # beyond its range Inf, and every prediction NaN.
        flags = [f for f in ("dtype", "param_dtype") if jnp.dtype(getattr(model, f)) == jnp.float16]
        over = checkpoints.out_of_range_params(params, jnp.float16) if flags else []
        if over:
            found = checkpoints.out_of_range_message(config.checkpoint, over, jnp.float16)
            raise EvalConfigError(
                f"{' '.join(f'--config.{f}=float16' for f in flags)}: {found}; use bfloat16 "
                f"(float32's range) or float32 for {' and '.join(f'--config.{f}' for f in flags)}."
            )
        # The params' checksum, computed while the run starts: it is needed with several
        # processes, when resuming, and once the first results are kept.
        digest = (
            _in_background(sharding.tree_digest, params)
            if resumable or nproc > 1
            else lambda: sharding.tree_digest(params)  # one process, nothing kept: not called
        )
        # The workdir is claimed before any kept result is read (two runs in one workdir
        # would each evaluate the videos left, and each remove the other's kept results); it
        # is created now, and removed again if the run is refused.
        if claim:
            made_and_claimed(held, workdir, pid, f"--workdir={workdir}", EvalConfigError, missing)
        # Results kept by an interrupted run with the same settings are carried, not redone.
        partial_dir = workdir / partial.PARTIAL

        def results_settings() -> dict[str, Any]:
            """The settings that decide each video's results (what a resume must share)."""
            return _settings(config, folder, prepared, digest(), stored["model"], _NOT_IN_RESULTS)

        try:
            kept = partial.read_kept(
                partial_dir if resumable else None,
                pid,
                nproc,
                model.num_classes,
                results_settings,
                f"--workdir={workdir}",
                len(folder.items),
                width,
            )
        except partial.PartialError as e:
            raise EvalConfigError(str(e)) from None
        agree(lambda: _settings(config, folder, prepared, digest(), stored["model"]))
    # The videos every process's kept results hold, then this process's share of the others,
    # and a step count every process agrees on. A video kept in the files of two processes
    # (per-host folders resumed with another process count, then the first one again) is
    # carried by the first of them only: it counts once.
    kept_by = sharding.allgather_json([*kept.positions.tolist(), *kept.skipped])
    done = set().union(*kept_by)
    earlier = set().union(*kept_by[:pid])
    if earlier:
        kept = kept.without(earlier)
    if prepared:
        records = np.flatnonzero(~np.isin(prepared.record_positions(), list(done)))
        total = records.size
    else:
        remaining = [p for p in range(len(folder.items)) if p not in done]
        total = len(remaining)
    per_process = math.ceil(total / nproc)
    steps = math.ceil(per_process / local_batch)
    # The input starts now: its workers start and decode the first videos while the forward is
    # traced and compiled.
    workers, prefetch = worker_count(config.data.workers), config.data.prefetch or 2 * local_batch
    if prepared:
        from stam_jax.data.reading import eval_items

        items = eval_items(prepared, workers, prefetch, pid, nproc, records)
        skipped = prepared.outcomes if pid == 0 else {}
    else:
        positions = remaining[pid::nproc]
        raw = decode_in_order(
            [folder.root / folder.items[p].path for p in positions], spec, workers, prefetch
        )
        items = _at_positions(raw, positions, folder)
        skipped = {}
    decoded = Started(items)
    journal = None
    if resumable:
        journal = partial.Journal(
            partial_dir,
            pid,
            model.num_classes,
            results_settings,
            width,
        )
    try:
        params = sharding.put_replicated(
            jax.tree.map(lambda x: x.astype(model.param_dtype, copy=False), params), mesh
        )
        batch_shape = (config.batch_size, spec.num_views, spec.num_frames, spec.crop, spec.crop, 3)
        batch_sharding = sharding.batch_sharded(mesh)
        forward = jax.jit(
            _forward_fn(model, config.eval.average, features),
            in_shardings=(sharding.replicated(mesh), batch_sharding),
            out_shardings=(batch_sharding,) * (3 if features else 2),
        )
        compile_start = time.perf_counter()
        abstract = jax.ShapeDtypeStruct(batch_shape, np.uint8, sharding=batch_sharding)
        # Nothing to compile when an interrupted run kept every video's results.
        options = sharding.compiler_options(config.triton_gemm)
        compiled = (
            forward.lower(params, abstract).compile(compiler_options=options) if steps else None
        )
        compile_s = time.perf_counter() - compile_start
    except BaseException:
        decoded.close()
        raise
    progress = progress_bar(steps, "eval", "batch", config.progress and pid == 0)
    eval_start = time.perf_counter()
    try:
        local, first_batch_at, input_wait_s = _run_loop(
            compiled, params, decoded, steps, batch_shape, mesh, progress, journal
        )
    finally:
        progress.close()  # its line ends before anything else is printed (Ctrl-C's line too)
        decoded.close()  # stops the reading workers now (see stam_jax.data.reading.close)
    local[3].update(skipped)
    eval_s = time.perf_counter() - eval_start
    evaluated_here = len(local[0])
    local = (
        [*kept.positions.tolist(), *local[0]],
        [kept.logits, *local[1]],
        [kept.scores, *local[2]],
        {**kept.skipped, **local[3]},
        [kept.features, *local[4]],
    )
    sizes = sharding.allgather_json([len(local[0]), evaluated_here])
    all_pos, all_logits, all_scores, all_outcomes, all_features = _gather(
        *local, max(size for size, _ in sizes), model.num_classes
    )
    evaluated_here = sum(here for _, here in sizes)
    first_batch_after_s = (first_batch_at or time.perf_counter()) - start

    keep = all_pos >= 0
    order = np.argsort(all_pos[keep], kind="stable")
    done_pos = all_pos[keep][order]
    logits, scores = all_logits[keep][order], all_scores[keep][order]
    values = all_features[keep][order]
    # NaN/Inf logits (non-finite weights, a float16 overflow) are no prediction: such videos
    # are listed apart and left out, where an argmax would have called them class 0.
    finite = np.isfinite(logits).all(axis=1)
    non_finite = [
        {
            "path": folder.items[p].path,
            "label": folder.items[p].label,
            "reason": NON_FINITE_REASON,
        }
        for p in done_pos[~finite].tolist()
    ]
    done_pos, logits, scores = done_pos[finite], logits[finite], scores[finite]
    values = values[finite]
    labels = np.array([folder.items[p].label for p in done_pos], np.int64)
    if config.eval.accuracy:
        metrics = _metrics(labels, scores, model.num_classes)
    else:  # the labels are the root's classes, not the model's
        metrics = dict.fromkeys(("top1", "top5", "mean_class_accuracy"))

    def listed(status: str) -> list[dict[str, Any]]:
        return [
            {"path": folder.items[p].path, "label": folder.items[p].label, "reason": o["reason"]}
            for p, o in sorted(all_outcomes.items())
            if o["status"] == status
        ]

    dropped, failed = listed("too_short"), listed("failed")
    results = {
        "metrics": metrics,
        "counts": {
            "listed": len(folder.items),
            "evaluated": int(done_pos.size),
            "dropped_too_short": len(dropped),
            "failed": len(failed),
            "non_finite": len(non_finite),
            # Videos whose results an interrupted earlier run kept (`stam_jax.partial`).
            "resumed": len(done),
        },
        "dropped": dropped,
        "failed": failed,
        "non_finite": non_finite,
        "empty_classes": list(folder.empty_classes),
        # Entries under the root that are neither classes nor videos, by reason (a few paths).
        "ignored": ignored_summary(folder.ignored),
        # How the official loader's listing of the root would differ (other containers, hidden
        # names), with a few paths each.
        "official_listing": official_differences(folder.items, folder.ignored),
        "classes": list(folder.classes),
        "timing": {
            "compile_s": round(compile_s, 3),
            "eval_s": round(eval_s, 3),
            # Of the videos evaluated by this run (not those resumed).
            "videos_per_s": (
                round(evaluated_here / eval_s, 3) if eval_s > 0 and evaluated_here else None
            ),
            "first_batch_after_s": round(first_batch_after_s, 3),
            # Time the loop waited for this process's input (0: the device never waited).
            "input_wait_s": round(input_wait_s, 3),
            "total_s": round(time.perf_counter() - start, 3),
        },
        "devices": jax.device_count(),
        "processes": nproc,
        "checkpoint": {"path": str(config.checkpoint), **stored},
        "config": config.to_dict(),
    }
    if pid == 0:
        with new_folders_removed_on_failure(workdir):  # made now when not claimed at the start
            workdir.mkdir(parents=True, exist_ok=True)
            _write(workdir, results, folder, done_pos, labels, logits, scores)
            if features:
                _write_features(workdir, folder, done_pos, labels, values, model, spec, features)
            else:
                _remove_earlier_features(workdir, report)
    if nproc > 1:  # the kept results go once process 0 has written (a failure there keeps them)
        sharding.allgather_json(None)
    if resumable:
        partial.remove(partial_dir, pid, nproc)
    if pid == 0 and report:
        _summary(results, workdir)
        if non_finite:
            warning = _non_finite_warning(len(non_finite), len(finite), model)
            print(warning, file=sys.stderr)
    return results


def _in_background(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Starts `fn(*args)` in a thread; the function returned waits for its result (or raises
    its exception)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # raised where the result is asked for
            out["error"] = e

    thread = threading.Thread(target=run, name="stam-eval-checksum", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["result"]

    return result


def _non_finite_warning(bad: int, total: int, model: STAM) -> str:
    """Why `bad` of `total` videos had NaN/Inf logits (the params are finite: checked when
    read), and what to do."""
    if jnp.dtype(model.dtype) == jnp.float16:
        why = "float16 overflowed: evaluate with --config.dtype=bfloat16 or float32"
    else:
        why = (
            f"the params are finite, so a value overflowed {jnp.dtype(model.dtype).name}: check "
            "the checkpoint's magnitudes"
        )
    return (
        f"warning: {bad} of {total} videos gave non-finite logits (NaN/Inf) and are left out of "
        f"the metrics (listed under non_finite in results.json): {why}."
    )


def _run_loop(
    compiled: jax.stages.Compiled | None,
    params: Any,
    decoded: Iterator[Decoded],
    steps: int,
    batch_shape: tuple[int, ...],
    mesh: Mesh,
    progress: Any,
    journal: partial.Journal | None = None,
) -> tuple[
    tuple[
        list[int], list[np.ndarray], list[np.ndarray], dict[int, dict[str, Any]], list[np.ndarray]
    ],
    float | None,
    float,
]:
    """Feeds `steps` global batches of the `Decoded` items (positions: listing indices).

    Returns this process's (positions, logits, scores, outcomes, features), when the first
    batch was dispatched, and the seconds spent waiting for input after it.

    Rows of a batch that hold no video (the end of the list, or a video that failed) are zeros
    and are ignored when results are collected, so every video counts exactly once. Each
    batch's results, and the videos skipped, are appended to `journal` as they come.
    """
    local_batch = batch_shape[0] // jax.process_count()
    batch_sharding = sharding.batch_sharded(mesh)
    outcomes: dict[int, dict[str, Any]] = {}
    done: list[int] = []
    logits: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    features: list[np.ndarray] = []
    pending, first_batch_at, waited = None, None, 0.0
    skipped: dict[int, dict[str, Any]] = {}  # since the last append to the journal
    for _ in range(steps):
        local = np.zeros((local_batch, *batch_shape[1:]), np.uint8)
        filled = np.full(local_batch, -1, np.int64)
        for row in range(local_batch):
            asked = time.perf_counter()
            item = next(decoded, None)
            if first_batch_at is not None:
                waited += time.perf_counter() - asked
            if item is None:
                break
            position = item.position
            if item.status == "ok":
                local[row], filled[row] = item.views, position
            else:
                outcomes[position] = {"status": item.status, "reason": item.reason}
                skipped[position] = outcomes[position]
        outputs = compiled(params, sharding.to_global(local, batch_sharding))
        first_batch_at = first_batch_at or time.perf_counter()
        if pending is not None:  # fetch the previous step while this one runs
            _collect(pending, done, logits, scores, features, journal, skipped)
            skipped = {}
        pending = (filled, outputs)
        progress.update(1)
    if pending is not None:
        _collect(pending, done, logits, scores, features, journal, skipped)
    return (done, logits, scores, outcomes, features), first_batch_at, waited


def _gather(
    done: list[int],
    logits: list[np.ndarray],
    scores: list[np.ndarray],
    outcomes: dict[int, dict[str, Any]],
    features: list[np.ndarray],
    size: int,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, dict[str, Any]], np.ndarray]:
    """Every process's results, padded to `size` rows (the most any process has), gathered."""
    pad = size - len(done)
    width = features[0].shape[1]  # the kept ones' (rows, width), maybe no rows
    if width:
        padded = np.concatenate([*features, np.zeros((pad, width), np.float32)])
        all_features = _allgather_rows(padded)
    else:  # none to gather where no features are exported
        all_features = np.zeros((size * jax.process_count(), 0), np.float32)
    all_pos = _allgather_rows(np.array(done + [-1] * pad, np.int64))
    all_logits = _allgather_rows(
        np.concatenate([*logits, np.zeros((pad, num_classes), np.float32)])
    )
    all_scores = _allgather_rows(
        np.concatenate([*scores, np.zeros((pad, num_classes), np.float32)])
    )
    all_outcomes: dict[int, dict[str, Any]] = {}
    for part in sharding.allgather_json({str(k): v for k, v in outcomes.items()}):
        all_outcomes.update({int(k): v for k, v in part.items()})
    return all_pos, all_logits, all_scores, all_outcomes, all_features


def _collect(
    pending: tuple[np.ndarray, tuple[jax.Array, ...]],
    positions: list[int],
    logits: list[np.ndarray],
    scores: list[np.ndarray],
    features: list[np.ndarray],
    journal: partial.Journal | None = None,
    skipped: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Appends a step's kept rows (`filled` >= 0) of its outputs (logits, scores, and the
    features when there are any) to the lists, as float32, and to `journal` with the videos
    `skipped` since its last append."""
    filled, outputs = pending
    mean_logits, ranked = sharding.local_rows(outputs[0]), sharding.local_rows(outputs[1])
    keep = filled >= 0
    positions += filled[keep].tolist()
    logits.append(mean_logits[keep].astype(np.float32))
    scores.append(ranked[keep].astype(np.float32))
    if len(outputs) > 2:
        features.append(sharding.local_rows(outputs[2])[keep].astype(np.float32))
    else:
        features.append(np.zeros((int(keep.sum()), 0), np.float32))
    if journal is not None:
        journal.add(filled[keep], logits[-1], scores[-1], skipped or {}, features[-1])


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write(
    workdir: Path,
    results: dict[str, Any],
    folder: VideoFolder,
    positions: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Writes `results.json` and one `predictions.jsonl` line (top 5, logits) per video."""
    text = json.dumps(_finite(results), indent=1, default=str, allow_nan=False)
    (workdir / "results.json").write_text(text + "\n")
    k = min(5, logits.shape[1] if logits.size else 5)
    with open(workdir / "predictions.jsonl", "w") as f:
        for p, label, row, score in zip(positions, labels, logits, scores, strict=True):
            top = np.argsort(-score, kind="stable")[:k]
            line = {
                "path": folder.items[int(p)].path,
                "label": int(label),
                "top5": [int(c) for c in top],
                "logits": [float(x) for x in row],
            }
            f.write(json.dumps(_finite(line), allow_nan=False) + "\n")


def _write_features(
    workdir: Path,
    folder: VideoFolder,
    positions: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    model: STAM,
    spec: ClipSpec,
    features: str,
) -> None:
    """Writes `features.npz`: the videos of `predictions.jsonl`, in its order (`path`, relative
    to the root, and `label`), their video features `video` (views averaged) and, for
    'frames', `frames` (videos, views, T, the ViT's width). Written beside and renamed, so the
    file is either whole or not there."""
    width = feature_width(model, spec.num_views, "video")
    arrays = {
        "path": np.array([folder.items[int(p)].path for p in positions], dtype=str),
        "label": labels,
        "video": values[:, :width],
    }
    if features == "frames":
        shape = (len(positions), spec.num_views, model.num_frames, model.hidden_size)
        arrays["frames"] = values[:, width:].reshape(shape)
    target = workdir / "features.npz"
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, target)


def _remove_earlier_features(workdir: Path, report: bool) -> None:
    """Removes the `features.npz` an earlier run left in `workdir`: it held that run's videos,
    not those of the `predictions.jsonl` this run wrote beside it (nothing said so)."""
    earlier = workdir / "features.npz"
    if earlier.is_file() and not earlier.is_symlink():
        earlier.unlink()
        if report:
            print(
                f"removed {earlier}: an earlier run's features, not this run's videos (this run "
                "exports none; --config.eval.features=video or frames exports them).",
                file=sys.stderr,
            )


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _summary(results: dict[str, Any], workdir: Path) -> None:
    m, c, t = results["metrics"], results["counts"], results["timing"]
    accuracy = (
        f"top-1 {_percent(m['top1'])}  top-5 {_percent(m['top5'])}  mean class accuracy "
        f"{_percent(m['mean_class_accuracy'])}"
    )
    if not accuracy_computed(results):
        accuracy = "no accuracy (--config.eval.accuracy=False)"
    print(
        f"{accuracy}  on {c['evaluated']} of {c['listed']} videos "
        f"({c['dropped_too_short']} dropped as too short, {c['failed']} failed to decode"
        + (f", {c['non_finite']} with NaN/Inf logits" if c.get("non_finite") else "")
        + ")"
    )
    speed = "no video evaluated by this run"
    if t["videos_per_s"] is not None:
        speed = f"{t['videos_per_s']} videos/s over {t['eval_s']:.1f}s"
    print(
        f"{speed} (compile {t['compile_s']:.1f}s excluded), {results['devices']} device(s); "
        f"results in {workdir / 'results.json'}"
        + (
            f" ({c['resumed']} videos' results were kept by the interrupted run and not redone)"
            if c.get("resumed")
            else ""
        )
    )
    for line in listing_report(results["classes"], results["empty_classes"], results["ignored"]):
        print(line)
    for line in official_report(results.get("official_listing") or {}):
        print(line)
    for entry in results["dropped"][:5] + results["failed"][:5]:
        print(f"  skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    unshown = max(len(results["dropped"]) - 5, 0) + max(len(results["failed"]) - 5, 0)
    if unshown:
        print(f"  ... and {unshown} more, each with its reason in {workdir / 'results.json'}")
