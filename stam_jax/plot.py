"""Pictures of a run directory: training curves and evaluation breakdowns, as PNGs.

    python -m stam_jax.plot WORKDIR

- `WORKDIR/metrics.jsonl` (a training run: one JSON object per line with `step` and any of
  `loss`, `accuracy`, `learning_rate`, `videos_per_s`, and `eval_top1`) -> `WORKDIR/train.png`:
  one panel per quantity against the step.
- `WORKDIR/results.json` + `WORKDIR/predictions.jsonl` (a `run_eval.py` output) ->
  `WORKDIR/eval.png`: per-class top-1 accuracy, worst classes first, and the most confused
  (true, predicted) class pairs.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

TRAIN_KEYS = ("loss", "accuracy", "learning_rate", "videos_per_s", "eval_top1")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics_file: Path, out: Path) -> Path:
    """Training curves from a metrics JSON-lines file."""
    series: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics_file}:{number} is not JSON ({e.msg}).") from None
        for key in TRAIN_KEYS:
            if key in row and "step" in row:
                series[key].append((row["step"], row[key]))
    if not series:
        raise ValueError(f"{metrics_file} has no 'step' rows with any of {TRAIN_KEYS}.")
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(series), figsize=(4.0 * len(series), 3.2), dpi=100, squeeze=False
    )
    for ax, (key, points) in zip(axes[0], series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_evaluation(results_file: Path, predictions_file: Path, out: Path, worst: int = 30) -> Path:
    """Per-class accuracy (worst first) and the most confused class pairs of an evaluation."""
    results = json.loads(results_file.read_text())
    classes = results.get("classes") or []
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{predictions_file} holds no predictions.")
    correct: dict[int, list[bool]] = collections.defaultdict(list)
    confusions: collections.Counter = collections.Counter()
    for row in rows:
        predicted = row["top5"][0]
        correct[row["label"]].append(predicted == row["label"])
        if predicted != row["label"]:
            confusions[(row["label"], predicted)] += 1

    def name(c: int) -> str:
        return classes[c] if c < len(classes) else f"class {c}"

    accuracy = sorted((np.mean(v), name(c)) for c, v in correct.items())[:worst]
    pairs = confusions.most_common(15)
    plt = _pyplot()
    height = max(len(accuracy), len(pairs), 5) * 0.28 + 1.2
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height), dpi=100)
    left.barh(range(len(accuracy))[::-1], [a for a, _ in accuracy], color="#c44e52")
    left.set_yticks(range(len(accuracy))[::-1], [n for _, n in accuracy], fontsize=7)
    left.set_xlim(0, 1)
    left.set_title(f"top-1 per class, worst {len(accuracy)} of {len(correct)}")
    if pairs:
        labels = [f"{name(t)} -> {name(p)}" for (t, p), _ in pairs]
        right.barh(range(len(pairs))[::-1], [n for _, n in pairs], color="#8172b2")
        right.set_yticks(range(len(pairs))[::-1], labels, fontsize=7)
    right.set_title("most confused pairs (true -> predicted), videos")
    top1 = results.get("metrics", {}).get("top1")
    if top1 is not None:
        fig.suptitle(f"top-1 {top1:.1%} over {len(rows)} videos", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_workdir(workdir: str | Path) -> list[Path]:
    """Writes every picture the run directory has data for; returns their paths."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir} is not a directory.")
    written = []
    if (workdir / "metrics.jsonl").is_file():
        written.append(plot_training(workdir / "metrics.jsonl", workdir / "train.png"))
    if (workdir / "results.json").is_file() and (workdir / "predictions.jsonl").is_file():
        written.append(
            plot_evaluation(
                workdir / "results.json", workdir / "predictions.jsonl", workdir / "eval.png"
            )
        )
    if not written:
        raise ValueError(
            f"{workdir} has neither metrics.jsonl (a training run) nor results.json with "
            "predictions.jsonl (a run_eval.py output)."
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m stam_jax.plot", description=__doc__)
    parser.add_argument("workdir", help="a training or evaluation output directory")
    args = parser.parse_args(argv)
    try:
        for path in plot_workdir(args.workdir):
            print(f"wrote {path}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
