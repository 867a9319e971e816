"""Pictures of a run directory: training curves and evaluation breakdowns, as PNGs.

    python -m stam_jax.plot WORKDIR [--out DIR]

- `WORKDIR/metrics.jsonl` (a training run: one JSON object per line with `step` and any of
  `loss`, `accuracy`, `learning_rate`, `videos_per_s`; the periodic evaluation's rows hold
  `top1` and `ema_top1`) -> `train.png`: one panel per quantity against the step, the two
  evaluation accuracies in one panel. A last line cut off by a run stopped mid-write is skipped
  with a warning; a NaN or Inf value is not drawn, and is named in a warning and the panel's
  title.
- `WORKDIR/results.json` + `WORKDIR/predictions.jsonl` (a `run_eval.py` output) ->
  `eval.png`: per-class top-1 accuracy, worst classes first, and the most confused
  (true, predicted) class pairs.

The pictures go to `--out DIR` (created if missing; default: WORKDIR), replacing a `train.png`
or `eval.png` there. Every file is read before a picture is written: a refused one (one
`error:` line, exit 2) writes neither picture.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser
from stam_jax.paths import new_folders_removed_on_failure, staged, unwritable

# Panels of train.png: a title and the metrics.jsonl keys drawn in it. train.py writes the
# periodic evaluation as {"step": N, "top1": x, "ema_top1": y} rows.
TRAIN_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("accuracy", ("accuracy",)),
    ("learning rate", ("learning_rate",)),
    ("videos per s", ("videos_per_s",)),
    ("evaluation top-1", ("top1", "ema_top1")),
)
TRAIN_KEYS = tuple(key for _, keys in TRAIN_PANELS for key in keys)


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib `Figure` of its own, outside pyplot (imported on first use).

    No backend is chosen and pyplot keeps no reference to it: drawing from a notebook or a
    program of one's own leaves its matplotlib backend and its open figures as they were, and
    the figure is freed with its last reference.
    """
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _not_json(path: Path, error: json.JSONDecodeError, line: int | None = None) -> str:
    """`path[:line] is not JSON (why, column)`, the line being the file's when given."""
    if line is None:
        return f"{path} is not JSON ({error.msg}: line {error.lineno} column {error.colno})."
    return f"{path}:{line} is not JSON ({error.msg}: column {error.colno})."


def _text(path: Path) -> str:
    """The file's text; one that is not UTF-8 is refused by name."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}); is it the right file?"
        ) from None


def read_json_lines(path: Path, *, skip_cut_last: bool = False) -> list[tuple[int, dict]]:
    """The objects of a JSON-lines file with their line numbers (blank lines are skipped).

    Args:
      path: the file.
      skip_cut_last: a last line that is not JSON (a writer killed mid-line) is skipped with a
        warning on stderr instead of refused.

    Raises:
      ValueError: a line that is not a JSON object, named by file and line number.
    """
    lines = [(n, line) for n, line in enumerate(_text(path).splitlines(), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_cut_last and i == len(lines) - 1:
                print(
                    f"warning: skipped {path}:{number}, the last line, which is not JSON "
                    f"({e.msg}): a run stopped while writing it.",
                    file=sys.stderr,
                )
                continue
            raise ValueError(_not_json(path, e, number)) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} holds a {type(row).__name__}, not a JSON object.")
        rows.append((number, row))
    return rows


def _save(fig: Any, out: Path) -> Path:
    """Writes `fig` to `out`; a file-system error names the path and the `--out` option (and
    leaves no half-written file, an existing `out` unchanged)."""
    try:
        with staged(out) as temp:
            fig.savefig(temp)
    except OSError as e:
        raise ValueError(
            f"cannot write {out} ({e.strerror or e}); pass --out DIR to write the pictures "
            "to a folder you can write to."
        ) from None
    return out


def _training_series(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) pairs per drawn key of a metrics JSON-lines file; refused if none."""
    series: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for number, row in read_json_lines(metrics_file, skip_cut_last=True):
        drawn = [key for key in TRAIN_KEYS if row.get(key) is not None]
        if "step" not in row or not drawn:
            continue
        step = row["step"]
        bad = [(key, row[key]) for key in drawn if not _is_number(row[key])]
        if not (_is_number(step) and math.isfinite(step)):
            bad.insert(0, ("step", step))
        if bad:
            key, value = bad[0]
            raise ValueError(
                f"{metrics_file}:{number}: {key!r} is {json.dumps(value)}, not a number; is it "
                "a training run's metrics.jsonl?"
            )
        for key in drawn:
            series[key].append((step, row[key]))
    if not series:
        raise ValueError(f"{metrics_file} has no 'step' rows with any of {TRAIN_KEYS}.")
    for key, points in series.items():
        steps = [step for step, value in points if not math.isfinite(value)]
        if steps:
            where = ", ".join(f"{s:g}" for s in steps[:5]) + (" ..." if len(steps) > 5 else "")
            print(
                f"warning: {metrics_file}: {key} is NaN or Inf at {len(steps)} of "
                f"{len(points)} steps ({where}); those points are not drawn.",
                file=sys.stderr,
            )
    return series


def plot_training(metrics_file: Path, out: Path) -> Path:
    """Training curves and periodic-evaluation accuracy from a metrics JSON-lines file."""
    return _draw_training(_training_series(metrics_file), out)


def _draw_training(series: dict[str, list[tuple[float, float]]], out: Path) -> Path:
    """Writes `_training_series`' curves to `out`, one panel per quantity."""
    panels = [(title, keys) for title, keys in TRAIN_PANELS if any(k in series for k in keys)]
    fig = new_figure(figsize=(4.0 * len(panels), 3.2), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in (k for k in keys if k in series):
            steps, values = zip(*series[key], strict=True)
            few = len(steps) <= 20  # periodic evaluations: a handful of points
            ax.plot(steps, values, linewidth=1.2, marker="o" if few else None, ms=3, label=key)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        gaps = sum(not math.isfinite(v) for key in keys for _, v in series.get(key, ()))
        ax.set_title(f"{title} ({gaps} NaN/Inf not drawn)" if gaps else title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def _read_results(results_file: Path) -> dict[str, Any]:
    """results.json as a dict; a file that is not JSON is named with the position."""
    try:
        results = json.loads(_text(results_file))
    except json.JSONDecodeError as e:
        raise ValueError(_not_json(results_file, e)) from None
    if not isinstance(results, dict):
        raise ValueError(f"{results_file} holds a {type(results).__name__}, not a JSON object.")
    return results


def _nothing_evaluated(results_file: Path, predictions_file: Path, results: dict) -> str:
    """Why there is no picture of an evaluation whose predictions file is empty."""
    counts = results.get("counts")
    if not isinstance(counts, dict) or "listed" not in counts:
        return f"{predictions_file} holds no predictions."
    return (
        f"{counts.get('evaluated', 0)} of {counts['listed']} videos were evaluated "
        f"({counts.get('dropped_too_short', 0)} dropped as too short, "
        f"{counts.get('failed', 0)} failed to decode), so there is nothing to plot; "
        f"{results_file} lists each video's reason under 'dropped' and 'failed'."
    )


def plot_evaluation(results_file: Path, predictions_file: Path, out: Path, worst: int = 30) -> Path:
    """Per-class accuracy (worst first) and the most confused class pairs of an evaluation."""
    return _draw_evaluation(_evaluation(results_file, predictions_file), out, worst)


def _is_number(value: Any) -> bool:
    """Whether `value` is a JSON number (an int or a float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_class(value: Any) -> bool:
    """Whether `value` is a class index: an integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def accuracy_computed(results: dict[str, Any]) -> bool:
    """Whether the run that wrote `results` (a `results.json`, read as JSON) computed accuracy:
    False only where its recorded config says `eval.accuracy` False (older runs have no such
    field, and always did)."""
    run_config = results.get("config")
    settings = run_config.get("eval") if isinstance(run_config, dict) else None
    return not (isinstance(settings, dict) and settings.get("accuracy") is False)


def _evaluation(results_file: Path, predictions_file: Path) -> dict[str, Any]:
    """What `eval.png` shows, read from an evaluation's files; refused if they do not hold it."""
    results = _read_results(results_file)
    classes = results.get("classes") or []
    metrics = results.get("metrics") or {}
    top1 = metrics.get("top1") if isinstance(metrics, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(
            f"{results_file}: 'classes' is not a list of class names; is it a run_eval.py "
            "results.json?"
        )
    if not isinstance(metrics, dict) or not (top1 is None or _is_number(top1)):
        raise ValueError(
            f"{results_file}: 'metrics' is not an object whose 'top1' is a number or null; is it "
            "a run_eval.py results.json?"
        )
    if not accuracy_computed(results):
        raise ValueError(
            f"{results_file}: evaluated with --config.eval.accuracy=False, so its labels are the "
            "folder's classes, not the model's: there is no accuracy to draw."
        )
    rows = read_json_lines(predictions_file)
    if not rows:
        raise ValueError(_nothing_evaluated(results_file, predictions_file, results))
    correct: dict[int, list[bool]] = collections.defaultdict(list)
    confusions: collections.Counter = collections.Counter()
    for number, row in rows:
        top5 = row.get("top5")
        if not (
            _is_class(row.get("label"))
            and isinstance(top5, list)
            and top5
            and all(_is_class(c) for c in top5)
        ):
            raise ValueError(
                f"{predictions_file}:{number} lacks a class index (an integer >= 0) as 'label' "
                "or a non-empty list of them as 'top5'; is it a run_eval.py predictions file?"
            )
        predicted = row["top5"][0]
        correct[row["label"]].append(predicted == row["label"])
        if predicted != row["label"]:
            confusions[(row["label"], predicted)] += 1
    return {
        "classes": classes,
        "correct": correct,
        "confusions": confusions,
        "videos": len(rows),
        "top1": top1,
    }


def _draw_evaluation(evaluation: dict[str, Any], out: Path, worst: int) -> Path:
    """Writes `_evaluation`'s per-class accuracy and confused pairs to `out`."""
    classes, correct = evaluation["classes"], evaluation["correct"]

    def name(c: int) -> str:
        return classes[c] if c < len(classes) else f"class {c}"

    accuracy = sorted((np.mean(v), name(c)) for c, v in correct.items())[:worst]
    pairs = evaluation["confusions"].most_common(15)
    height = max(len(accuracy), len(pairs), 5) * 0.28 + 1.2
    fig = new_figure(figsize=(13, height), dpi=100)
    left, right = fig.subplots(1, 2)
    left.barh(range(len(accuracy))[::-1], [a for a, _ in accuracy], color="#c44e52")
    left.set_yticks(range(len(accuracy))[::-1], [n for _, n in accuracy], fontsize=7)
    left.set_xlim(0, 1)
    left.set_title(f"top-1 per class, worst {len(accuracy)} of {len(correct)}")
    if pairs:
        labels = [f"{name(t)} -> {name(p)}" for (t, p), _ in pairs]
        right.barh(range(len(pairs))[::-1], [n for _, n in pairs], color="#8172b2")
        right.set_yticks(range(len(pairs))[::-1], labels, fontsize=7)
    right.set_title("most confused pairs (true -> predicted), videos")
    if evaluation["top1"] is not None:
        fig.suptitle(
            f"top-1 {evaluation['top1']:.1%} over {evaluation['videos']} videos", fontsize=10
        )
    fig.tight_layout()
    return _save(fig, out)


def _output_dir(out: str | Path) -> Path:
    """`--out`, created if missing; refused (nothing created) when it cannot be made or written."""
    out = Path(out)
    problem = unwritable(out, into=True)
    if problem:
        raise ValueError(f"cannot write --out {out}: {problem}; pass --out DIR, another folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the output folder {out} ({e.strerror or e}); pass --out DIR, a "
            "folder you can write to."
        ) from None
    return out


def plot_workdir(workdir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Writes every picture the run directory has data for; returns their paths.

    Args:
      workdir: a training or evaluation output directory.
      out: the folder the pictures go to (created if missing); default `workdir`.

    Raises:
      ValueError: `workdir` is not a directory or holds neither a training run's
        `metrics.jsonl` nor an evaluation's `results.json` and `predictions.jsonl`, one of
        them is not valid JSON (lines) or holds nothing to draw, or `out` cannot be written; nothing
        is written then.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir} is not a directory.")
    metrics = workdir / "metrics.jsonl"
    results, predictions = workdir / "results.json", workdir / "predictions.jsonl"
    training = metrics.is_file()
    evaluation = results.is_file() and predictions.is_file()
    if not training and not evaluation:
        raise ValueError(
            f"{workdir} has neither metrics.jsonl (a training run) nor results.json with "
            "predictions.jsonl (a run_eval.py output)."
        )
    # Every file read before any picture is written: one refused writes none.
    series = _training_series(metrics) if training else None
    evaluated = _evaluation(results, predictions) if evaluation else None
    target = Path(workdir if out is None else out)
    written = []
    with new_folders_removed_on_failure(target):  # kept once it holds a picture
        folder = _output_dir(target)
        if series is not None:
            written.append(_draw_training(series, folder / "train.png"))
        if evaluated is not None:
            written.append(_draw_evaluation(evaluated, folder / "eval.png", worst=30))
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = ArgumentParser(
        prog="python -m stam_jax.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workdir", help="a training or evaluation output directory")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the pictures (created if missing; default: WORKDIR)",
    )
    args = parser.parse_args(argv)
    from stam_jax.interrupts import keep_interrupts

    keep_interrupts()
    try:
        for path in plot_workdir(args.workdir, args.out):
            print(f"wrote {path}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:  # each picture is written whole or not at all (paths.staged)
        print(
            "interrupted: no picture is half-written (any drawn before the interrupt is whole).",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
