"""Run pictures: training curves and evaluation breakdowns."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
from PIL import Image

from stam_jax import plot
from stam_jax.plot import main


def write_eval(workdir, rows, classes):
    (workdir / "results.json").write_text(
        json.dumps({"metrics": {"top1": 0.5}, "classes": classes})
    )
    with open(workdir / "predictions.jsonl", "w") as f:
        for label, top in rows:
            f.write(json.dumps({"path": "x.mp4", "label": label, "top5": top, "logits": []}) + "\n")


def nonblank_png(path, size):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        return np.asarray(image.convert("RGB"), dtype=np.float32).std() > 10


def test_training_and_evaluation_pictures(tmp_path, capsys, monkeypatch):
    # Drawn outside pyplot: a notebook's backend is not switched, no figure is left open.
    import matplotlib
    import matplotlib.pyplot as plt

    def switch(*args, **kwargs):
        raise AssertionError("the matplotlib backend was switched")

    monkeypatch.setattr(matplotlib, "use", switch)
    open_figures = plt.get_fignums()
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 100, 10):
            f.write(
                json.dumps({"step": step, "loss": 2.0 / (1 + step), "learning_rate": 1e-3}) + "\n"
            )
        f.write("\n")
    write_eval(
        tmp_path, [(0, [0, 1]), (0, [1, 0]), (1, [1, 0]), (2, [0, 2]), (2, [0, 1])], ["a", "b", "c"]
    )
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'train.png'}" in out and f"wrote {tmp_path / 'eval.png'}" in out
    assert nonblank_png(tmp_path / "train.png", (800, 320))  # two quantities, one panel each
    assert nonblank_png(tmp_path / "eval.png", (1300, 260))
    assert plt.get_fignums() == open_figures


def test_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "has neither metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{oops\n{"step": 2}\n')
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2 is not JSON" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--outt", "x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --outt x\n"


def test_periodic_evaluation_accuracy_is_drawn(tmp_path, capsys):
    # As train.py writes metrics.jsonl: training rows, and {"step", "top1", "ema_top1"} rows
    # from the periodic evaluation.
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(10, 101, 10):
            f.write(json.dumps({"step": step, "loss": 1 / step, "learning_rate": 1e-3}) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"step": step, "top1": step / 200, "ema_top1": step / 250}))
                f.write("\n")
    assert main([str(tmp_path)]) == 0
    # loss, learning rate and one panel for both evaluation accuracies.
    assert nonblank_png(tmp_path / "train.png", (1200, 320))


def test_a_cut_last_line_is_skipped_and_bad_json_is_named(tmp_path, capsys):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipped {tmp_path / 'metrics.jsonl'}:4, the last line" in captured.err
    assert "wrote" in captured.out and nonblank_png(tmp_path / "train.png", (400, 320))
    (tmp_path / "metrics.jsonl").unlink()

    write_eval(tmp_path, [(0, [0, 1])], ["a", "b"])
    (tmp_path / "results.json").write_text('{"metrics": {"top1": 0.5}, "classes": ["a"')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'results.json'} is not JSON (Expecting" in err and "line 1 column" in err
    write_eval(tmp_path, [(0, [0, 1])], ["a", "b"])
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('\n{"path": "y.mp4", "label": 1\n')  # line 3, after a blank line 2
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'predictions.jsonl'}:3 is not JSON" in capsys.readouterr().err


def test_nothing_evaluated_and_where_pictures_go(tmp_path, capsys, monkeypatch):
    counts = {"listed": 6, "evaluated": 0, "dropped_too_short": 5, "failed": 1}
    (tmp_path / "results.json").write_text(
        json.dumps({"metrics": {"top1": None}, "counts": counts, "classes": ["a"]})
    )
    (tmp_path / "predictions.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "0 of 6 videos were evaluated (5 dropped as too short, 1 failed to decode)" in err
    assert f"{tmp_path / 'results.json'} lists each video's reason" in err

    write_eval(tmp_path, [(0, [0, 1]), (1, [0, 1])], ["a", "b"])
    assert main([str(tmp_path), "--out", str(tmp_path / "new" / "pictures")]) == 0
    assert nonblank_png(tmp_path / "new" / "pictures" / "eval.png", (1300, 260))
    assert not (tmp_path / "eval.png").exists()
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    want = f"error: cannot write --out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file"
    assert err.startswith(want)
    assert "pass --out DIR" in err and len(err.splitlines()) == 1
    assert main([str(tmp_path), "--out", str(tmp_path / "file")]) == 2  # said 'File exists'
    want = f"error: cannot write --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file,"
    assert capsys.readouterr().err.startswith(want)

    def read_only(*args, **kwargs):  # what savefig meets in a folder it may not write to
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'eval.png'} (Permission denied)" in err
    assert "pass --out DIR" in err and len(err.splitlines()) == 1


def test_a_refused_evaluation_writes_no_training_picture_either(tmp_path, capsys):
    # A workdir of a training run holding a run_eval.py output too: every file is read before
    # any picture is written, so a refusal (exit 2) leaves no train.png behind.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    write_eval(tmp_path, [(0, [0, 1])], ["a", "b"])
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"label": 0}) + "\n")
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: {tmp_path / 'predictions.jsonl'}:1 lacks a class index (an integer >= 0) as "
        "'label' or a non-empty list of them as 'top5'; is it a run_eval.py predictions file?\n"
    )
    assert captured.out == "" and not (tmp_path / "train.png").exists()


@pytest.mark.parametrize(
    "row",
    [
        {"label": 0, "top5": ["b"]},  # class names: was a TypeError traceback
        {"label": 0, "top5": "b"},
        {"label": 0, "top5": {"b": 1}},  # was a KeyError traceback
        {"label": 0, "top5": [1.0]},
        {"label": -1, "top5": [0]},  # was drawn as the last class, 'b'
        {"label": True, "top5": [0]},
        {"label": 0, "top5": []},  # was an IndexError traceback
    ],
)
def test_prediction_rows_that_are_not_class_indices_are_refused(tmp_path, capsys, row):
    write_eval(tmp_path, [(0, [0, 1])], ["a", "b"])
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'predictions.jsonl'}:2 lacks a class index")
    assert len(err.splitlines()) == 1 and not (tmp_path / "eval.png").exists()


@pytest.mark.parametrize(
    "results, what",
    [
        ({"classes": {"0": "a"}}, "'classes' is not a list of class names"),  # was a KeyError
        ({"classes": "ab"}, "'classes' is not a list of class names"),  # was drawn as 'a', 'b'
        ({"classes": ["a", 3]}, "'classes' is not a list of class names"),
        ({"metrics": [0.5]}, "'metrics' is not an object whose 'top1' is a number or null"),
        (
            {"metrics": {"top1": "50%"}},
            "'metrics' is not an object whose 'top1' is a number or null",
        ),
    ],
)
def test_a_results_file_not_from_an_evaluation_is_refused(tmp_path, capsys, results, what):
    write_eval(tmp_path, [(0, [0, 1])], ["a", "b"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'results.json'}: {what}; is it a run_eval.py results.json?\n"
    )
    assert not (tmp_path / "eval.png").exists()


@pytest.mark.parametrize(
    "row, what",
    [
        ({"step": 2, "loss": "0.5"}, "'loss' is \"0.5\""),  # was drawn as a category
        ({"step": 2, "loss": [0.5]}, "'loss' is [0.5]"),  # was numpy's 'inhomogeneous shape'
        ({"step": 2, "top1": True}, "'top1' is true"),
        ({"step": None, "loss": 0.5}, "'step' is null"),
        ({"step": "2", "loss": 0.5}, "'step' is \"2\""),
        ({"step": float("nan"), "loss": 0.5}, "'step' is NaN"),
    ],
)
def test_metrics_that_are_not_numbers_are_refused(tmp_path, capsys, row, what):
    rows = [{"step": 1, "loss": 1.0}, row, {"step": 3, "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'metrics.jsonl'}:2: {what}, not a number; is it a training run's "
        "metrics.jsonl?\n"
    )
    assert not (tmp_path / "train.png").exists()


def test_nan_or_inf_metrics_are_named_not_hidden(tmp_path, capsys, monkeypatch):
    # A NaN or Inf loss is a gap in the curve (all NaN: an empty panel); it is said in a
    # warning and in the panel's title, not only left out.
    rows = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3} for s in range(1, 9)]
    rows[2]["loss"], rows[5]["loss"] = float("nan"), float("inf")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = []
    save = plot._save

    def titled(fig, out):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, out)

    monkeypatch.setattr(plot, "_save", titled)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().err == (
        f"warning: {tmp_path / 'metrics.jsonl'}: loss is NaN or Inf at 2 of 8 steps (3, 6); "
        "those points are not drawn.\n"
    )
    assert titles == ["loss (2 NaN/Inf not drawn)", "learning rate"]


def test_a_failed_write_leaves_no_half_written_picture(tmp_path, capsys, monkeypatch):
    write_eval(tmp_path, [(0, [0, 1]), (1, [0, 1])], ["a", "b"])
    (tmp_path / "eval.png").write_bytes(b"the picture of the last evaluation")

    def disk_full(fig, path, **kwargs):  # savefig stopped midway
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: cannot write {tmp_path / 'eval.png'} (No space left on device)"
    )
    assert (tmp_path / "eval.png").read_bytes() == b"the picture of the last evaluation"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval.png",
        "predictions.jsonl",
        "results.json",
    ]
    # Nor the --out folders made for it (they stayed behind, empty).
    assert main([str(tmp_path), "--out", str(tmp_path / "new" / "pictures")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()


def test_ctrl_c_is_one_line_and_exit_130_with_no_half_written_picture(
    tmp_path, capsys, monkeypatch
):
    # Was Python's KeyboardInterrupt traceback.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    write_eval(tmp_path, [(0, [0, 1]), (1, [1, 0])], ["a", "b"])
    (tmp_path / "eval.png").write_bytes(b"an earlier picture")
    savefig = matplotlib.figure.Figure.savefig

    def ctrl_c_at_the_second(fig, path, **kwargs):
        if "eval" in Path(path).name:  # train.png is drawn first, eval.png is cut midway
            Path(path).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        savefig(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", ctrl_c_at_the_second)
    assert main([str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert captured.err == (
        "interrupted: no picture is half-written (any drawn before the interrupt is whole).\n"
    )
    assert nonblank_png(tmp_path / "train.png", (400, 320))  # one quantity: one panel
    assert (tmp_path / "eval.png").read_bytes() == b"an earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval.png",
        "metrics.jsonl",
        "predictions.jsonl",
        "results.json",
        "train.png",
    ]


def _drawn_figures(monkeypatch):
    """The figures `plot` writes, captured as they are saved (the files are written too)."""
    figures = {}
    save = plot._save

    def keep(fig, out):
        figures[Path(out).name] = fig
        return save(fig, out)

    monkeypatch.setattr(plot, "_save", keep)
    return figures


def test_eval_picture_lists_the_worst_classes_first_and_only_wrong_predictions(
    tmp_path, monkeypatch
):
    # a: 2 of 2 right; b: 1 of 2 (once taken for a); label 2, past the class list: 0 of 1.
    write_eval(tmp_path, [(0, [0, 1]), (0, [0, 1]), (1, [1, 0]), (1, [0, 1]), (2, [1])], ["a", "b"])
    figures = _drawn_figures(monkeypatch)
    assert main([str(tmp_path)]) == 0
    left, right = figures["eval.png"].axes
    assert [t.get_text() for t in left.get_yticklabels()] == ["class 2", "b", "a"]
    assert [bar.get_width() for bar in left.patches] == [0.0, 0.5, 1.0]
    assert left.get_title() == "top-1 per class, worst 3 of 3"
    # Right predictions are no confusion: only b -> a and class 2 -> b, once each.
    assert sorted(t.get_text() for t in right.get_yticklabels()) == ["b -> a", "class 2 -> b"]
    assert [bar.get_width() for bar in right.patches] == [1, 1]


def test_rows_without_a_drawn_number_are_skipped_not_refused(tmp_path, capsys, monkeypatch):
    # A row of other facts (a step that is no number, a null loss) is not part of a curve.
    rows = [
        {"step": 1, "loss": 1.0},
        {"step": "final", "checkpoint": "ckpt/final"},
        {"step": 2, "loss": None, "learning_rate": 1e-3},
        {"step": 3, "loss": 0.5, "learning_rate": 1e-4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = _drawn_figures(monkeypatch)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    loss, rate = figures["train.png"].axes
    assert list(loss.lines[0].get_xdata()) == [1, 3] and list(rate.lines[0].get_xdata()) == [2, 3]


def test_nan_steps_listed_are_the_first_five_then_an_ellipsis(tmp_path, capsys):
    for count, tail in ((5, "(1, 2, 3, 4, 5); those"), (6, "(1, 2, 3, 4, 5 ...); those")):
        rows = [{"step": s, "loss": float("nan")} for s in range(1, count + 1)]
        rows.append({"step": count + 1, "loss": 1.0})
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main([str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert f"loss is NaN or Inf at {count} of {count + 1} steps {tail}" in err, err


def test_a_training_run_with_only_a_results_file_draws_its_curves(tmp_path, capsys):
    # results.json without predictions.jsonl is no evaluation to draw: not an error.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"top1": 0.5}}))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'train.png'}\n"
    assert not (tmp_path / "eval.png").exists()


def test_files_that_are_not_utf8_or_hold_odd_results_are_named(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe')
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'metrics.jsonl'} is not UTF-8 text (byte 25); is it the right file?\n"
    )
    (tmp_path / "metrics.jsonl").unlink()
    # Counts without the number of videos listed: the predictions file is named instead.
    (tmp_path / "results.json").write_text(json.dumps({"counts": {"evaluated": 0}}))
    (tmp_path / "predictions.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'predictions.jsonl'} holds no predictions.\n"
    )
    # A JSON line that is not an object (was an AttributeError traceback).
    (tmp_path / "predictions.jsonl").write_text('{"label": 0, "top5": [0]}\n[0, [0]]\n')
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'predictions.jsonl'}:2 holds a list, not a JSON object.\n"
    )


def test_eval_picture_title_gives_a_top1_of_zero_and_none_without_one(tmp_path, monkeypatch):
    # A top-1 of 0 is a result to show; a null one (nothing evaluated) has no title.
    figures = _drawn_figures(monkeypatch)
    for top1, title in [(0.0, "top-1 0.0% over 2 videos"), (None, "")]:
        write_eval(tmp_path, [(0, [1, 0]), (1, [0, 1])], ["a", "b"])
        (tmp_path / "results.json").write_text(
            json.dumps({"metrics": {"top1": top1}, "classes": ["a", "b"]})
        )
        assert main([str(tmp_path)]) == 0
        assert figures["eval.png"].get_suptitle() == title, top1
