"""`make demo`: the main job end to end on generated videos, showing what the temporal model adds.

    python -m stam_jax.demo [--workdir demo] [--fast]

Steps, each printed with the exact command it runs:
1. generate real mp4 videos of a task no single frame can solve (`stam_jax.data.demo`:
   is the object approaching or receding?) and still frames labelled by object size;
2. pre-train the frame model (the ViT) on the still frames (`run_train.py`);
3. train STAM (that ViT + the temporal transformer) on the videos (`run_train.py`) and evaluate
   it on the validation videos (`run_eval.py`);
4. train and evaluate the same ViT with frame averaging instead of the temporal transformer;
5. convert the trained STAM to the official PyTorch format and back, checking every tensor;
6. draw the attention pictures of two validation videos (also with the checkpoint converted back
   from the official format) and the plots of the runs;
7. print a report (also in WORKDIR/report.txt and report.json).

`--fast` shrinks every step (for the test suite); its accuracies mean little.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax.cli import ArgumentParser
from stam_jax.paths import unwritable

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/demo.py"


def _run(command: list[str], log: list[dict[str, Any]]) -> float:
    """Runs one step's command from the repository root, passing its output through."""
    shown = " ".join(shlex.quote(c) for c in command).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    seconds = time.perf_counter() - start
    log.append({"command": shown, "seconds": round(seconds, 1), "status": result.returncode})
    if result.returncode:
        raise SystemExit(f"demo: the step above failed with exit status {result.returncode}.")
    return seconds


def _header(number: int, text: str) -> None:
    print(f"\n=== [{number}/7] {text}", flush=True)


def _train(run: str, root: Path, workdir: Path, overrides: list[str], log: list) -> None:
    command = [sys.executable, "run_train.py", f"--config={CONFIG}:{run}", f"--workdir={workdir}"]
    _run([*command, f"--config.train.root={root}", *overrides], log)


def _evaluate(run: str, checkpoint: Path, root: Path, workdir: Path, log: list) -> dict:
    command = [sys.executable, "run_eval.py", f"--config={CONFIG}:{run}", f"--workdir={workdir}"]
    command += [f"--config.checkpoint={checkpoint}", f"--config.data.root={root}"]
    _run(command, log)
    return json.loads((workdir / "results.json").read_text())


def _last_metrics(workdir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1] if rows else {}


def _round_trip(checkpoint: Path, workdir: Path, log: list) -> dict[str, Any]:
    """stam-jax -> official .pth -> stam-jax, then every tensor compared bit for bit."""
    from stam_jax import checkpoints

    pth, back = workdir / "stam_demo.pth", workdir / "roundtrip"
    _run([sys.executable, "-m", "convert.to_torch", str(checkpoint), str(pth), "--force"], log)
    model, _ = checkpoints.load(checkpoint)
    heads = [f"--num-heads={model.num_heads}", f"--temporal-heads={model.temporal_heads}"]
    _run([sys.executable, "-m", "convert", str(pth), str(back), "--force", *heads], log)
    import flax

    first = flax.traverse_util.flatten_dict(checkpoints.load(checkpoint)[1], sep="/")
    second = flax.traverse_util.flatten_dict(checkpoints.load(back)[1], sep="/")
    same = [
        k
        for k in first
        if k in second
        and first[k].dtype == second[k].dtype
        and np.array_equal(np.asarray(first[k]), np.asarray(second[k]))
    ]
    return {
        "pth": str(pth),
        "tensors": len(first),
        "bit_identical": len(same),
        "exact": len(same) == len(first) == len(second),
    }


def _pictures(stam_dir: Path, mean_dir: Path, val_root: Path, out: Path, log: list) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    classes = out / "classes.txt"
    classes.write_text("approaching\nreceding\n")
    # The trained checkpoint, and the one converted back from the official-format .pth.
    for name, checkpoint, suffix in (
        ("approaching", stam_dir / "final", ""),
        ("receding", stam_dir / "final", ""),
        ("approaching", stam_dir / "roundtrip", "_from_pth"),
    ):
        video = sorted((val_root / name).glob("*.mp4"))[0]
        png = out / f"explain_{name}{suffix}.png"
        command = [sys.executable, "-m", "stam_jax.explain", str(video)]
        command += [f"--checkpoint={checkpoint}", f"--out={png}"]
        _run([*command, f"--classes={classes}", "--frame-rate=4"], log)
        written.append(str(png))
    for run_dir in (stam_dir, stam_dir / "eval", mean_dir / "eval"):
        _run([sys.executable, "-m", "stam_jax.plot", str(run_dir)], log)
    written += [str(stam_dir / "train.png"), str(stam_dir / "eval" / "eval.png")]
    written.append(str(mean_dir / "eval" / "eval.png"))
    return written


def run_demo(workdir: str | Path, fast: bool = False) -> dict[str, Any]:
    """Runs every step; returns the report (also written to WORKDIR/report.json)."""
    from stam_jax.data import demo as demo_data

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log: list[dict[str, Any]] = []
    start = time.perf_counter()
    sizes = dict(train=400, val=200, frames_train=800, frames_val=40)
    steps = {"frames": [], "stam": [], "mean": []}
    if fast:
        sizes = dict(train=32, val=16, frames_train=32, frames_val=8)
        short = ["--config.train.steps=6", "--config.train.warmup_steps=2"]
        steps = {k: [*short, "--config.train.save_every=3"] for k in steps}

    _header(1, "generate the videos (approaching / receding) and the still frames (sizes)")
    data = workdir / "data"
    print(f"writing {data}", flush=True)
    generate_s = time.perf_counter()
    demo_data.write_dataset(data, **sizes)
    generate_s = time.perf_counter() - generate_s

    runs = {name: workdir / name for name in ("frames", "stam", "mean")}
    _header(2, "pre-train the frame model (ViT) on still frames: 4 object sizes")
    _train("frames", data / "frames" / "train", runs["frames"], steps["frames"], log)

    _header(3, "train STAM (ViT + temporal transformer) on the videos, then evaluate it")
    init = [f"--config.checkpoint={runs['frames'] / 'final'}"]
    _train("stam", data / "videos" / "train", runs["stam"], init + steps["stam"], log)
    stam_eval = _evaluate(
        "stam", runs["stam"] / "final", data / "videos" / "val", runs["stam"] / "eval", log
    )

    _header(4, "train the same ViT with frame averaging (the baseline), then evaluate it")
    _train("mean", data / "videos" / "train", runs["mean"], init + steps["mean"], log)
    mean_eval = _evaluate(
        "mean", runs["mean"] / "final", data / "videos" / "val", runs["mean"] / "eval", log
    )

    _header(5, "convert the trained STAM to the official PyTorch format and back")
    round_trip = _round_trip(runs["stam"] / "final", runs["stam"], log)

    _header(6, "pictures: attention on two validation videos, plots of the runs")
    pictures = _pictures(
        runs["stam"], runs["mean"], data / "videos" / "val", workdir / "pictures", log
    )

    report = {
        "classes": ["approaching", "receding"],
        "chance_top1": 0.5,
        "validation_videos": stam_eval["counts"]["evaluated"],
        "stam": _summary(stam_eval, runs["stam"]),
        "frame_average": _summary(mean_eval, runs["mean"]),
        "round_trip": round_trip,
        "pictures": pictures,
        "generate_s": round(generate_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "steps": log,
        "fast": fast,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = format_report(report, workdir)
    (workdir / "report.txt").write_text(text + "\n")
    _header(7, "report")
    print(text, flush=True)
    return report


def _summary(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    train = _last_metrics(run_dir)
    return {
        "top1": results["metrics"]["top1"],
        "eval_videos_per_s": results["timing"]["videos_per_s"],
        "train_videos_per_s": round(train.get("videos_per_s", 0.0), 1),
        "train_steps": train.get("step"),
        "checkpoint": str(run_dir / "final"),
        "metrics": str(run_dir / "metrics.jsonl"),
        "predictions": str(run_dir / "eval" / "predictions.jsonl"),
    }


def format_report(report: dict[str, Any], workdir: Path) -> str:
    """The report as the demo prints it."""
    stam, mean = report["stam"], report["frame_average"]
    chance = report["chance_top1"]
    rows = [
        f"Task: is the object approaching or receding? {report['validation_videos']} validation "
        f"videos, 2 classes, chance {chance:.0%}. The frames of a receding video are those of "
        "an approaching one in reverse order: as a set they tell nothing, their order tells all.",
        "",
        f"{'model':<40} {'top-1':>7} {'train videos/s':>15} {'eval videos/s':>14}",
        f"{'STAM (ViT + temporal transformer)':<40} {stam['top1']:>7.1%} "
        f"{stam['train_videos_per_s']:>15} {stam['eval_videos_per_s']:>14}",
        f"{'frame averaging (same ViT, mean)':<40} {mean['top1']:>7.1%} "
        f"{mean['train_videos_per_s']:>15} {mean['eval_videos_per_s']:>14}",
        "",
    ]
    gap = stam["top1"] - mean["top1"]
    rows.append(
        f"STAM is {gap:+.1%} over frame averaging; frame averaging is "
        f"{mean['top1'] - chance:+.1%} from chance."
    )
    rt = report["round_trip"]
    verdict = "exact" if rt["exact"] else "NOT exact"
    rows.append(
        f"Round trip stam-jax -> official .pth -> stam-jax: {rt['bit_identical']}/{rt['tensors']} "
        f"tensors bit-identical ({verdict}); the .pth: {rt['pth']}"
    )
    rows += [
        "",
        f"Checkpoints: {stam['checkpoint']} (STAM), {mean['checkpoint']} (frame averaging)",
        f"Training metrics: {stam['metrics']}, {mean['metrics']}",
        f"Predictions: {stam['predictions']}, {mean['predictions']}",
        "Pictures:",
        *[f"  {p}" for p in report["pictures"]],
        f"Report: {workdir / 'report.txt'}; whole demo {report['total_s']:.0f} s.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = ArgumentParser(
        prog="python -m stam_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default="demo", help="where everything is written")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (tests)")
    args = parser.parse_args(argv)
    if not args.workdir.strip():  # it would be the current folder
        parser.error("--workdir is empty: name the folder to write everything in (default demo)")
    problem = unwritable(args.workdir, into=True)
    if problem:
        parser.error(f"--workdir={args.workdir}: {problem}; name a folder (created if missing)")
    run_demo(args.workdir, fast=args.fast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
