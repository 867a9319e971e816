"""Evaluation with the official Kinetics protocol: one jit-compiled, data-parallel forward.

`evaluate(config, workdir)` lists the video folder, checks the checkpoint against the data and the
config (before any compute), compiles the forward once for a fixed global batch, and streams the
videos through it: decoding runs in worker processes ahead of the device, the last partial batch
is padded and its padding ignored, so every video counts exactly once. Each process of a
multi-host run decodes its own share of the files; the results are gathered to every process and
written by process 0: `results.json` and `predictions.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from stam_jax import checkpoints, sharding
from stam_jax.data.folder import DatasetError, VideoFolder
from stam_jax.data.loader import Decoded, Started, decode_in_order, worker_count
from stam_jax.data.prepared import PreparedError, list_root
from stam_jax.data.video import ClipSpec
from stam_jax.model import STAM
from stam_jax.progress import progress_bar
from stam_jax.variants import create_model, model_from_config

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
        raise EvalConfigError(f"data config: {e}") from None


def _load_model(config: Any) -> tuple[STAM, dict[str, Any]]:
    if not config.checkpoint:
        raise EvalConfigError(
            "no checkpoint: pass --config.checkpoint=CKPT_DIR (convert an official .pth with "
            "python -m convert stam_16.pth CKPT_DIR)."
        )
    try:
        stored = checkpoints.read_config(config.checkpoint)
    except checkpoints.CheckpointError as e:
        raise EvalConfigError(str(e)) from None
    model = model_from_config(
        stored["model"],
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        frame_chunk=config.frame_chunk,
    )
    expected_t = create_model(config.model).num_frames
    if model.num_frames != expected_t:
        raise EvalConfigError(
            f"checkpoint {config.checkpoint} is a T={model.num_frames} model, but the config "
            f"samples clips for {config.model} (T={expected_t}); use configs/stam_"
            f"{model.num_frames}.py or --config.model=stam_{model.num_frames}."
        )
    if model.image_size != config.data.crop:
        raise EvalConfigError(
            f"checkpoint {config.checkpoint} takes {model.image_size}px frames but "
            f"--config.data.crop={config.data.crop}; set it to {model.image_size}."
        )
    return model, stored


def _list_data(config: Any, model: STAM, spec: ClipSpec) -> tuple[VideoFolder, Any]:
    """The listing of `config.data.root`, and the opened dataset when it is a prepared one."""
    root = config.data.root
    if not root:
        raise EvalConfigError(
            "no data: pass --config.data.root=VIDEO_ROOT (root/<class>/<video>) or a dataset "
            "made by python -m stam_jax.data.prepare."
        )
    try:
        folder, prepared = list_root(root, "eval", spec, config.data.class_list or None)
    except (PreparedError, DatasetError) as e:
        raise EvalConfigError(str(e)) from None
    if len(folder.classes) != model.num_classes:
        raise EvalConfigError(
            f"{root} has {len(folder.classes)} classes but the checkpoint has "
            f"{model.num_classes} outputs; labels would not line up. Give the full class list "
            "with --config.data.class_list=FILE (one name per line, in label order)"
            + (" when preparing the dataset." if prepared else ".")
        )
    return folder, prepared


def _forward_fn(model: STAM, average: str):
    def forward(params, videos):
        b, v = videos.shape[:2]
        logits = model.apply({"params": params}, videos.reshape((b * v, *videos.shape[2:])))
        logits = logits.reshape(b, v, -1)
        mean_logits = logits.mean(axis=1)
        if average == "softmax":
            return mean_logits, jax.nn.softmax(logits, axis=-1).mean(axis=1)
        return mean_logits, mean_logits

    return forward


def _at_positions(
    decoded: Generator[Decoded, None, None], positions: list[int]
) -> Iterator[Decoded]:
    """`decoded` with each video's position in the whole folder; closing this closes `decoded`.

    So closing the evaluation's input stops the decoding processes at once, rather than
    whenever the decoder is garbage collected.
    """
    try:
        for d in decoded:
            yield dataclasses.replace(d, position=positions[d.position])
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


def evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Evaluates `config.checkpoint` on `config.data.root`; writes results to `workdir`.

    Args:
      config: a run config (`configs/stam_16.py` and friends).
      workdir: output folder for `results.json` and `predictions.jsonl`.

    Returns:
      The results dict (also written as `results.json`).

    Raises:
      EvalConfigError: before any compute, for a missing or mismatched checkpoint, data root,
        class count, batch size or data option.
    """
    start = time.perf_counter()
    dist = config.distributed
    sharding.initialize_distributed(dist.coordinator, dist.num_processes, dist.process_id)
    sharding.enable_compilation_cache(config.compilation_cache_dir)
    model, stored = _load_model(config)
    spec = _clip_spec(config, model)
    try:
        model.frames_per_step(config.batch_size * spec.num_views * model.num_frames)
    except ValueError as e:
        raise EvalConfigError(f"--config.frame_chunk: {e}") from None
    if config.eval.average not in ("logits", "softmax"):
        raise EvalConfigError(f"eval.average={config.eval.average!r}; use 'logits' or 'softmax'.")
    folder, prepared = _list_data(config, model, spec)
    mesh = sharding.data_mesh()
    try:
        local_batch = sharding.local_batch_size(config.batch_size, mesh)
    except ValueError as e:
        raise EvalConfigError(str(e)) from None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # This process's share of the videos, and a step count every process agrees on.
    pid, nproc = jax.process_index(), jax.process_count()
    total = prepared.num_records if prepared else len(folder.items)
    per_process = math.ceil(total / nproc)
    steps = math.ceil(per_process / local_batch)

    # Refused here, before any decoding, if the checkpoint does not fit the model.
    params = checkpoints.read_params(config.checkpoint, model)
    # The input starts now: its workers start and decode the first videos while the forward is
    # traced and compiled.
    workers, prefetch = worker_count(config.data.workers), config.data.prefetch or 2 * local_batch
    if prepared:
        from stam_jax.data.reading import eval_items

        items = eval_items(prepared, workers, prefetch, pid, nproc)
        skipped = prepared.outcomes if pid == 0 else {}
    else:
        positions = list(range(pid, len(folder.items), nproc))
        raw = decode_in_order(
            [folder.root / folder.items[p].path for p in positions], spec, workers, prefetch
        )
        items = _at_positions(raw, positions)
        skipped = {}
    decoded = Started(items)
    try:
        params = sharding.put_replicated(
            jax.tree.map(lambda x: x.astype(model.param_dtype, copy=False), params), mesh
        )
        batch_shape = (config.batch_size, spec.num_views, spec.num_frames, spec.crop, spec.crop, 3)
        batch_sharding = sharding.batch_sharded(mesh)
        forward = jax.jit(
            _forward_fn(model, config.eval.average),
            in_shardings=(sharding.replicated(mesh), batch_sharding),
            out_shardings=(batch_sharding, batch_sharding),
        )
        compile_start = time.perf_counter()
        abstract = jax.ShapeDtypeStruct(batch_shape, np.uint8, sharding=batch_sharding)
        compiled = forward.lower(params, abstract).compile()
        compile_s = time.perf_counter() - compile_start
    except BaseException:
        decoded.close()
        raise
    progress = progress_bar(steps, "eval", "batch", config.progress and pid == 0)
    eval_start = time.perf_counter()
    try:
        local, first_batch_at, input_wait_s = _run_loop(
            compiled, params, decoded, steps, batch_shape, mesh, progress
        )
    finally:
        decoded.close()  # stops the reading workers now (see stam_jax.data.reading.close)
    local[3].update(skipped)
    progress.close()
    eval_s = time.perf_counter() - eval_start
    all_pos, all_logits, all_scores, all_outcomes = _gather(*local, per_process, model.num_classes)
    first_batch_after_s = (first_batch_at or time.perf_counter()) - start

    keep = all_pos >= 0
    order = np.argsort(all_pos[keep], kind="stable")
    done_pos = all_pos[keep][order]
    logits, scores = all_logits[keep][order], all_scores[keep][order]
    labels = np.array([folder.items[p].label for p in done_pos], np.int64)
    metrics = _metrics(labels, scores, model.num_classes)

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
        },
        "dropped": dropped,
        "failed": failed,
        "empty_classes": list(folder.empty_classes),
        "classes": list(folder.classes),
        "timing": {
            "compile_s": round(compile_s, 3),
            "eval_s": round(eval_s, 3),
            "videos_per_s": round(done_pos.size / eval_s, 3) if eval_s > 0 else None,
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
        _write(workdir, results, folder, done_pos, labels, logits, scores)
        _summary(results, workdir)
    return results


def _run_loop(compiled, params, decoded, steps, batch_shape, mesh, progress):
    """Feeds `steps` global batches of the `Decoded` items (positions: listing indices).

    Returns this process's (positions, logits, scores, outcomes), when the first batch was
    dispatched, and the seconds spent waiting for input after it.

    Rows of a batch that hold no video (the end of the list, or a video that failed) are zeros
    and are ignored when results are collected, so every video counts exactly once.
    """
    local_batch = batch_shape[0] // jax.process_count()
    batch_sharding = sharding.batch_sharded(mesh)
    outcomes: dict[int, dict[str, Any]] = {}
    done: list[int] = []
    logits: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    pending, first_batch_at, waited = None, None, 0.0
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
        outputs = compiled(params, sharding.to_global(local, batch_sharding))
        first_batch_at = first_batch_at or time.perf_counter()
        if pending is not None:  # fetch the previous step while this one runs
            _collect(pending, done, logits, scores)
        pending = (filled, outputs)
        progress.update(1)
    if pending is not None:
        _collect(pending, done, logits, scores)
    return (done, logits, scores, outcomes), first_batch_at, waited


def _gather(done, logits, scores, outcomes, per_process: int, num_classes: int):
    """Every process's results, padded to equal sizes, gathered and sorted by position."""
    pad = per_process - len(done)
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
    return all_pos, all_logits, all_scores, all_outcomes


def _collect(pending, positions: list, logits: list, scores: list) -> None:
    filled, (mean_logits, ranked) = pending
    mean_logits, ranked = sharding.local_rows(mean_logits), sharding.local_rows(ranked)
    keep = filled >= 0
    positions += filled[keep].tolist()
    logits.append(mean_logits[keep].astype(np.float32))
    scores.append(ranked[keep].astype(np.float32))


def _write(workdir, results, folder, positions, labels, logits, scores) -> None:
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
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
            f.write(json.dumps(line) + "\n")


def _summary(results: dict[str, Any], workdir: Path) -> None:
    m, c, t = results["metrics"], results["counts"], results["timing"]
    print(
        f"top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  mean class accuracy "
        f"{100 * m['mean_class_accuracy']:.2f}%  on {c['evaluated']} of {c['listed']} videos "
        f"({c['dropped_too_short']} dropped as too short, {c['failed']} failed to decode)"
    )
    print(
        f"{t['videos_per_s']} videos/s over {t['eval_s']:.1f}s (compile {t['compile_s']:.1f}s "
        f"excluded), {results['devices']} device(s); results in {workdir / 'results.json'}"
    )
    for entry in results["dropped"][:5] + results["failed"][:5]:
        print(f"  skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
