"""Training's periodic evaluation: the params (and their EMA) evaluated on `train.eval_root`
with `stam_jax.evaluate`, the best kept in `WORKDIR/best` with `WORKDIR/best.json`.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stam_jax import checkpoints
from stam_jax.data.folder import VideoFolder
from stam_jax.model import STAM
from stam_jax.train_step import TrainConfigError, TrainState


def eval_run_config(config: Any) -> ml_collections.ConfigDict:
    """The run config of the periodic evaluation: `train.eval_root` as the data, no progress bar."""
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.data.root = config.train.eval_root
    eval_config.progress = False
    eval_config.eval.accuracy = True  # top-1 is what it is for
    return eval_config


def check_eval_root(config: Any, model: STAM, classes: Sequence[str]) -> VideoFolder:
    """Refuses, before training, an eval root that the periodic evaluation would refuse, or
    whose classes are not the training data's `classes` (labels are indices into both).
    Returns its listing."""
    from stam_jax.evaluate import EvalConfigError, _clip_spec, _list_data, check_eval_settings

    eval_config = eval_run_config(config)
    try:  # as the periodic evaluation would refuse them, after training to its first evaluation
        check_eval_settings(eval_config)
    except EvalConfigError as e:
        raise TrainConfigError(str(e)) from None
    try:
        folder, _ = _list_data(eval_config, model, _clip_spec(eval_config, model), flag="")
    except EvalConfigError as e:
        raise TrainConfigError(f"--config.train.eval_root: {e}") from None
    if tuple(folder.classes) != tuple(classes):
        label, train_name, eval_name = next(
            (i, a, b)
            for i, (a, b) in enumerate(zip(classes, folder.classes, strict=True))
            if a != b
        )
        raise TrainConfigError(
            f"--config.train.eval_root={config.train.eval_root}: its classes are not the "
            f"training data's (label {label} is {eval_name!r} there, {train_name!r} in "
            f"{config.train.root}), so its labels would not line up with the model's outputs; "
            "give both the same class folders, or name them all in label order with "
            "--config.data.class_list."
        )
    return folder


def periodic_eval(
    config: Any, workdir: Path, model: STAM, state: TrainState, step: int, named: set[str]
) -> dict[str, float]:
    """Evaluates the params (and their EMA) on `train.eval_root` with `stam_jax.evaluate`.

    Each evaluated set is saved as a stam-jax checkpoint in `workdir/eval/step_N/{params,ema}`
    and evaluated from there (results.json, predictions.jsonl in `{params,ema}_results`); the
    best by top-1 so far then becomes `workdir/best`, with `workdir/best.json` (step, which
    params, top-1), which survive a resume, and any other is deleted (a STAM-16 set is 0.45 GB).
    Prints one line for the step, and names a skipped video the first time only (`named`
    holds those already named).
    """
    from stam_jax.evaluate import evaluate

    host = jax.device_get(state)
    sets = {"params": host.params}
    if config.train.ema_decay > 0:
        sets["ema"] = host.ema_params
    here = workdir / "eval" / f"step_{step}"
    best_file = workdir / "best.json"
    protocol = _eval_protocol(config)
    best = _read_best(best_file, protocol)
    scores, counts, new_best = {}, {}, None
    skipped: dict[str, list[dict[str, Any]]] = {}  # per set: the videos left out of its top-1
    for name, params in sets.items():
        if jax.process_index() == 0:
            checkpoints.save(here / name, model, params, overwrite=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"eval checkpoint {step} {name}")
        eval_config = eval_run_config(config)
        eval_config.checkpoint = str(here / name)
        # Not created before its results are written (the workdir is the run's claim): an
        # evaluation interrupted or failed on any process leaves no empty folder.
        results = evaluate(
            eval_config, here / f"{name}_results", report=False, resumable=False, claim=False
        )
        counts[name] = results["counts"]
        skipped[name] = results["dropped"] + results["failed"] + results["non_finite"]
        top1 = float(results["metrics"]["top1"])
        scores["top1" if name == "params" else "ema_top1"] = top1
        if jax.process_index() == 0:  # every process has read it: evaluate gathers at its end
            if top1 > best["top1"]:
                old = workdir / "best.old"
                shutil.rmtree(old, ignore_errors=True)
                if (workdir / "best").exists():
                    (workdir / "best").rename(old)
                (here / name).rename(workdir / "best")
                shutil.rmtree(old, ignore_errors=True)
                best = {"step": step, "params": name, "top1": top1, "eval": protocol}
                best_file.write_text(json.dumps(best) + "\n")
                new_best = name
            else:
                shutil.rmtree(here / name)
    if jax.process_index() == 0:
        _eval_report(step, scores, counts, skipped, named, here, new_best, workdir / "best")
    return scores


def _eval_protocol(config: Any) -> dict[str, Any]:
    """What the periodic evaluation's top-1 is measured on: the eval root and the settings that
    only it uses (a resume may change them, and `best.json` records them)."""
    return {
        "eval_root": str(Path(config.train.eval_root).absolute()),
        **{f"data.{k}": config.data[k] for k in ("num_clips", "num_crops", "short_videos")},
        "eval.average": config.eval.average,
    }


def _read_best(best_file: Path, protocol: dict[str, Any]) -> dict[str, Any]:
    """The best evaluation so far from `best.json`; none if it was measured otherwise (another
    eval root or views, see `_eval_protocol`), as its top-1 is not comparable."""
    if not best_file.exists():
        return {"top1": -1.0}
    best = json.loads(best_file.read_text())
    was = best.get("eval", protocol)  # a best.json from before the record: compared as is
    changed = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in protocol.items() if was.get(k) != v]
    if not changed:
        return best
    if jax.process_index() == 0:
        from stam_jax.evaluate import _percent

        print(
            f"note: the best top-1 so far ({_percent(best['top1'])} at step {best['step']}) was "
            f"measured otherwise ({'; '.join(changed)}), so this run's next evaluation becomes "
            f"the best (replacing {best_file.parent / 'best'}).",
            file=sys.stderr,
            flush=True,
        )
    return {"top1": -1.0}


def _eval_report(
    step: int,
    scores: dict[str, float],
    counts: dict[str, dict[str, int]],
    skipped: dict[str, list[dict[str, Any]]],
    named: set[str],
    here: Path,
    new_best: str | None,
    best: Path,
) -> None:
    """The periodic evaluation's line, and (to stderr) the videos a set left out that were not
    named before: a video that fails to decode once, one with NaN/Inf logits once per set."""
    from stam_jax.evaluate import NON_FINITE_REASON, _percent

    c = counts["params"]
    top1 = f"top-1 {_percent(scores['top1'])}"
    if "ema_top1" in scores:
        top1 = f"{top1} (EMA {_percent(scores['ema_top1'])})"
    left_out = c["listed"] - c["evaluated"]
    line = f"eval at step {step}: {top1} on {c['evaluated']} of {c['listed']} videos"
    if "ema" in counts and counts["ema"]["evaluated"] != c["evaluated"]:
        line += f" (EMA on {counts['ema']['evaluated']})"
    if left_out:
        line += f", {left_out} left out (reasons in {here}/params_results/results.json)"
    if new_best:
        line += f"; new best ({new_best}) in {best}"
    print(line)
    for name, entries in skipped.items():
        for entry in entries:
            non_finite = entry["reason"] == NON_FINITE_REASON
            key = f"{name}:{entry['path']}" if non_finite else entry["path"]
            if key not in named:
                named.add(key)
                whose = f" ({'EMA' if name == 'ema' else name})" if non_finite else ""
                print(f"  eval skipped {entry['path']}{whose}: {entry['reason']}", file=sys.stderr)
