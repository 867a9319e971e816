"""Run pictures: training curves and evaluation breakdowns."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

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


def test_training_and_evaluation_pictures(tmp_path, capsys):
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


def test_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "has neither metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{oops\n')
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2 is not JSON" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
