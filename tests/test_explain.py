"""Attention pictures: rollout arithmetic, the explain command's PNG, its errors."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import jax
import matplotlib.figure
import numpy as np
import pytest
from conftest import TINY_CONFIGS, random_params
from PIL import Image

from stam_jax import checkpoints, create_model, model_config
from stam_jax import explain as explain_module
from stam_jax.data.synthetic import index_frame, write_video
from stam_jax.explain import draw, explain_video, figure, main, rollout


def test_rollout_on_a_hand_built_case():
    # One head; layer 1 sends everything to token 1, layer 2 is uniform over two tokens.
    first = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    second = np.array([[[0.5, 0.5], [0.5, 0.5]]])
    # With the residual: layer 1 -> [[.5, .5], [0, 1]], layer 2 -> [[.75, .25], [.25, .75]].
    expected = np.array([[0.75, 0.25], [0.25, 0.75]]) @ np.array([[0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(rollout([first, second]), expected)
    np.testing.assert_allclose(rollout([first, second]).sum(-1), 1.0)
    # Heads are averaged first.
    two_heads = np.stack([first[0], second[0]])
    np.testing.assert_allclose(
        rollout([two_heads]), 0.5 * (first[0] + second[0]) * 0.5 + 0.5 * np.eye(2)
    )
    with pytest.raises(ValueError, match="at least one layer"):
        rollout([])


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    config = TINY_CONFIGS["tiny"]
    checkpoints.save(root / "ckpt", create_model("stam_tiny"), random_params(config, seed=2))
    video = write_video(root / "clip.mp4", (index_frame(i, 48, 64) for i in range(40)), 10)
    return root, video


def test_explain_outputs(explained):
    root, video = explained
    result = explain_video(root / "ckpt", video, frame_rate=4.0)
    assert result["frames"].shape == (4, 32, 32, 3)
    assert result["probabilities"].shape == (10,)
    np.testing.assert_allclose(result["probabilities"].sum(), 1.0, rtol=1e-5)
    layers = result["temporal_layers"]
    assert layers.shape == (2, 4) and (layers >= 0).all() and (layers.sum(-1) <= 1 + 1e-6).all()
    assert result["temporal_rollout"].shape == (4,) and result["temporal_rollout"].sum() <= 1 + 1e-6
    assert result["spatial_rollout"].shape == (4, 4, 4)  # 32 px frames, 8 px patches


def test_explain_cli_writes_a_readable_png(explained, tmp_path, capsys):
    root, video = explained
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"action {c}" for c in range(10)) + "\n")
    out = tmp_path / "new" / "picture"  # a missing folder, no suffix: PNG, named .png
    args = [str(video), "--checkpoint", str(root / "ckpt"), "--frame-rate", "4"]
    assert main([*args, "--out", str(out), "--classes", str(names)]) == 0
    out = tmp_path / "new" / "picture.png"
    assert capsys.readouterr().out == f"wrote {out}\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 630)  # 4 frames in one row
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # not blank


def test_explain_cli_errors(explained, tmp_path, capsys):
    root, video = explained
    assert main([str(tmp_path / "none.mp4"), "--checkpoint", str(root / "ckpt")]) == 2
    assert f"error: video {tmp_path / 'none.mp4'} does not exist" in capsys.readouterr().err
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    args = [
        str(video),
        "--checkpoint",
        str(root / "ckpt"),
        "--frame-rate",
        "4",
        "--classes",
        str(names),
    ]
    assert main(args) == 2
    assert "names 2 classes; the model has 10" in capsys.readouterr().err
    assert main([str(video), "--checkpoint", str(tmp_path)]) == 2
    assert "is not a stam-jax checkpoint" in capsys.readouterr().err


def test_explain_refuses_bad_input_before_loading_the_model(
    explained, tmp_path, capsys, monkeypatch
):
    root, video = explained

    def not_now(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the input was checked")

    monkeypatch.setattr(checkpoints, "read_params", not_now)
    ckpt = ["--checkpoint", str(root / "ckpt")]

    def refused(*args: str) -> str:
        assert main([*args, *ckpt]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        return err

    assert f"video {tmp_path} is a directory" in refused(str(tmp_path))
    dashed = tmp_path / "-abc_000010_000020.mp4"  # a Kinetics id may start with '-'
    dashed.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="2"):
        main([dashed.name, *ckpt])
    assert capsys.readouterr().err == (
        "error: the following arguments are required: video; -abc_000010_000020.mp4 was read "
        "as a flag, as its name starts with '-': write it as ./-abc_000010_000020.mp4 (or put "
        "-- before it)\n"
    )
    assert main([*ckpt, "--", dashed.name]) == 2  # after --: taken as the video
    assert f"error: cannot read {dashed.name} as a video" in capsys.readouterr().err
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    assert f"error: cannot read {junk} as a video: " in refused(str(junk))
    for rate in ("0", "nan", "-1", "1e+09"):
        err = refused(str(video), "--frame-rate", rate)
        assert f"--frame-rate {rate}: use a number of frames per second in (0, 1000]" in err
        assert "T / 10 s" in err
    # 40 frames at 10 fps: the default T / 10 s = 0.4 fps keeps 2 of the 4 frames a clip needs.
    err = refused(str(video))
    assert f"{video} gives only 2 frames at 0.4 fps (the default: T / 10 s, T = 4)" in err
    assert "a clip needs 4" in err and "pass --frame-rate 1 (or more) or use a longer video" in err
    assert "gives only 1 frame at 0.3 fps (--frame-rate)" in refused(
        str(video), "--frame-rate", ".3"
    )
    one = write_video(tmp_path / "one.mp4", [index_frame(0, 32, 32)], fps=10)
    assert refused(str(one)) == (
        f"error: {one} gives only 1 frame at 0.4 fps (the default: T / 10 s, T = 4); a clip "
        "needs 4 (it has 1 frame at 10 fps, 0.1 s): use a longer video.\n"
    )
    assert "'.txt'; end it with .png, .pdf" in refused(str(video), "--out", str(tmp_path / "a.txt"))
    assert f"--out {tmp_path} is a directory" in refused(str(video), "--out", str(tmp_path))
    only_suffix = refused(str(video), "--out", str(tmp_path / ".PNG"))
    assert f"is only a suffix, with no name before it; name the picture, e.g. {tmp_path}/" in (
        only_suffix
    )
    assert f"{junk} is a file, not a folder" in refused(str(video), "--out", str(junk / "p.png"))
    # A video of exactly T frames fits at its own frame rate, the rate advised (not "use a
    # longer video").
    four = write_video(tmp_path / "four.mp4", [index_frame(i, 32, 32) for i in range(4)], fps=10)
    assert refused(str(four)) == (
        f"error: {four} gives only 1 frame at 0.4 fps (the default: T / 10 s, T = 4); a clip "
        "needs 4 (it has 4 frames at 10 fps, 0.4 s): pass --frame-rate 10 (or more) or use a "
        "longer video.\n"
    )
    assert explain_module._sampling(four, 4, 10.0) == 10.0
    # At an NTSC rate the 0.01 grid passes the video's own rate (29.98 > 29.97...): it was
    # "use a longer video"; the rate to pass is the video's, written out in full.
    ntsc = write_video(
        tmp_path / "ntsc.mp4", [index_frame(i, 32, 32) for i in range(4)], fps=Fraction(30000, 1001)
    )
    fps = 30000 / 1001
    assert refused(str(ntsc)).endswith(
        f"(it has 4 frames at 29.97 fps, 0.1 s): pass --frame-rate {fps!r} (the video's own "
        "rate) or use a longer video.\n"
    )
    assert explain_module._sampling(ntsc, 4, fps) == fps
    assert refused(str(video), "--classes", str(tmp_path)) == (
        f"error: --classes {tmp_path} is a folder; give a text file with one class name per "
        "line, in label order.\n"
    )
    # The class list is named by explain's flag, not by run_eval's --config.data.class_list.
    missing, empty = tmp_path / "missing.txt", tmp_path / "empty.txt"
    empty.write_text("\n")
    assert refused(str(video), "--classes", str(missing)) == (
        f"error: --classes {missing}: no such file; give a text file with one class name per "
        "line.\n"
    )
    assert refused(str(video), "--classes", str(empty)) == f"error: --classes {empty} is empty.\n"
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    assert refused(str(video), "--classes", str(two)) == (
        f"error: --classes {two} names 2 classes; the model has 10: give one class name per "
        "line for each of them, in label order.\n"
    )
    assert not list(tmp_path.glob("*.png"))


def test_a_frame_averaging_model_is_not_drawn_as_attention(explained):
    root, video = explained
    model = create_model("stam_tiny", aggregate="mean")
    checkpoints.save(root / "mean", model, random_params(model_config(model), seed=3))
    result = explain_video(root / "mean", video, frame_rate=4.0)
    assert result["aggregate"] == "mean" and result["temporal_layers"].shape == (0, 4)
    np.testing.assert_allclose(result["temporal_rollout"], 0.25)
    fig = figure(result)
    texts = [ax.get_title() + ax.get_ylabel() for ax in fig.axes]
    assert any(
        "frame averaging (no temporal transformer): every frame weighs 1/T" in t for t in texts
    )
    assert not any("temporal cls token" in t for t in texts)
    assert all(ax.get_legend() is None for ax in fig.axes)  # no "layer 0", no "rollout"


def test_non_finite_params_or_outputs_are_refused_not_drawn(explained, tmp_path, capsys):
    root, video = explained
    _, model, params = checkpoints.read(root / "ckpt")
    args = [str(video), "--frame-rate", "4", "--out", str(tmp_path / "p.png"), "--checkpoint"]
    # NaN in the params (a diverged run): refused naming them, before the model runs.
    nan = jax.tree.map(np.copy, params)
    nan["head"]["kernel"][0, 0] = np.nan
    nan["blocks_1"]["attn"]["qkv"]["bias"][:] = np.inf
    checkpoints.save(tmp_path / "nan", model, nan)
    assert main([*args, str(tmp_path / "nan")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'nan'} holds NaN or Inf values in 2 param(s) "
        "(blocks_1/attn/qkv/bias, head/kernel), so the model's probabilities and attention "
        "would be NaN and nothing was drawn; explain a checkpoint with finite params (a run "
        "that diverged: export an earlier step with python -m stam_jax.export RUN_DIR OUT_DIR "
        "--step N).\n"
    )
    # Finite params whose logits overflow float32: the probabilities come out NaN.
    huge = jax.tree.map(np.copy, params)
    huge["head"]["kernel"][:] = 3e38
    checkpoints.save(tmp_path / "huge", model, huge)
    assert main([*args, str(tmp_path / "huge")]) == 2
    assert capsys.readouterr().err == (
        f"error: the model of {tmp_path / 'huge'} gave NaN or Inf class probabilities for "
        f"{video} (its params are finite: a value overflowed float32), so nothing was drawn; "
        "explain a checkpoint whose params are of sound magnitude.\n"
    )
    assert not (tmp_path / "p.png").exists()


def test_a_failed_write_leaves_no_half_written_picture(explained, tmp_path, capsys, monkeypatch):
    root, video = explained
    out = tmp_path / "p.png"
    out.write_bytes(b"an earlier picture")

    def disk_full(fig, path, **kwargs):  # savefig stopped midway
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    args = [str(video), "--checkpoint", str(root / "ckpt"), "--frame-rate", "4", "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: cannot write {out} (No space left on device); choose another --out.\n"
    )
    assert out.read_bytes() == b"an earlier picture" and [p.name for p in tmp_path.iterdir()] == [
        "p.png"
    ]
    # Nor the folders made for a picture that could not be written.
    deeper = tmp_path / "new" / "deeper" / "p.png"
    assert main([*args[:-1], str(deeper)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write {deeper} (No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_ctrl_c_is_one_line_and_exit_130(explained, tmp_path, capsys, monkeypatch):
    # Was Python's KeyboardInterrupt traceback.
    root, video = explained
    out = tmp_path / "p.png"
    out.write_bytes(b"an earlier picture")

    def ctrl_c(fig, path, **kwargs):  # interrupted while the picture is being written
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", ctrl_c)
    args = [str(video), "--checkpoint", str(root / "ckpt"), "--frame-rate", "4", "--out", str(out)]
    assert main(args) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written.\n"
    assert out.read_bytes() == b"an earlier picture"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


class _Ended(Exception):
    """Raised by the stand-in for os._exit."""


def test_ctrl_c_while_compiling_ends_python_m_without_the_interpreter_shutdown(
    explained, tmp_path, capsys, monkeypatch
):
    # `python -m stam_jax.explain` interrupted while XLA compiled died of a segmentation fault
    # in the interpreter's shutdown (as run_eval.py did), not with exit status 130.
    import os

    import jax._src.compiler as compiler

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    def ended(status):
        raise _Ended(status)

    monkeypatch.setattr(compiler, "backend_compile_and_load", ctrl_c)  # as XLA raises it
    monkeypatch.setattr(os, "_exit", ended)
    root, video = explained
    args = [str(video), "--checkpoint", str(root / "ckpt"), "--out", str(tmp_path / "p.png")]
    with pytest.raises(_Ended) as end:
        main([*args, "--frame-rate", "4"], ends_process=True)
    assert end.value.args == (130,)
    assert capsys.readouterr().err == "interrupted: nothing was written.\n"
    # From Python, the status is returned, as before.
    assert main([*args, "--frame-rate", "2"]) == 130
    assert not (tmp_path / "p.png").exists()


def mean_result() -> dict:
    """An `explain_video` result of a 2-frame, 10-class mean-aggregate model, made by hand."""
    return {
        "frames": np.zeros((2, 8, 8, 3), np.uint8),
        "probabilities": np.full(10, 0.1, np.float32),
        "aggregate": "mean",
        "temporal_layers": np.zeros((0, 2)),
        "temporal_rollout": np.full(2, 0.5),
        "spatial_rollout": np.ones((2, 2, 2), np.float32),
    }


def test_figure_refuses_class_names_that_do_not_fit():
    # Too few names failed with an IndexError; too many labelled the bars silently.
    result = mean_result()
    for names in (["a", "b"], [f"c{i}" for i in range(400)]):
        with pytest.raises(ValueError, match=rf"classes names {len(names)} classes; the model ha"):
            figure(result, names)
    # A figure of its own, outside pyplot: a notebook's backend is left as it was (it was
    # switched to Agg), and pyplot holds no reference to it (it was kept until closed).
    import matplotlib
    import matplotlib.pyplot as plt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("backend switched"))
        before = plt.get_fignums()
        fig = figure(result)
        assert plt.get_fignums() == before and isinstance(fig, matplotlib.figure.Figure)


def test_draw_refuses_a_path_without_a_picture_suffix(tmp_path):
    # Failed in matplotlib with "Format 'partial' is not supported" (the staging file's name).
    for name in ("picture", "picture.txt"):
        with pytest.raises(ValueError, match=rf"cannot write {tmp_path / name}: pictures are wr"):
            draw({}, tmp_path / name)  # refused before the result is read
    assert not list(tmp_path.iterdir())
    # A suffix in capitals is written as that format all the same.
    result = mean_result()
    assert draw(result, tmp_path / "p.JPG") == tmp_path / "p.JPG"
    with Image.open(tmp_path / "p.JPG") as image:
        assert image.format == "JPEG"


def test_explain_ends_a_ctrl_c_that_c_code_wrapped_as_interrupted(
    explained, tmp_path, capsys, monkeypatch
):
    # A KeyboardInterrupt that C code hands on as "SystemError: ... returned a result with an
    # exception set" (while the model is traced) is a Ctrl-C all the same.
    root, video = explained

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("<function f> returned a result with an exception set") from e

    monkeypatch.setattr(explain_module, "explain_video", interrupted)
    out = tmp_path / "picture.png"
    assert main([str(video), "--checkpoint", str(root / "ckpt"), "--out", str(out)]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written.\n"
    assert not out.exists()


def test_explained_attention_is_the_cls_rows_of_the_model_and_the_rates_are_checked(explained):
    # The picture's numbers are the cls token's rows (its draw on each frame or patch), not a
    # column, and not the cls token's weight on itself.
    import jax.numpy as jnp

    from stam_jax.data.video import ClipSpec, load_views

    root, video = explained
    result = explain_video(root / "ckpt", video, frame_rate=1.0)  # exactly T = 4 frames
    stored = checkpoints.read_config(root / "ckpt")
    _, model, params = checkpoints.read(root / "ckpt")
    model = model.clone(spatial_attention_layers=tuple(range(model.depth)), temporal_attention=True)
    spec = ClipSpec(num_frames=4, frame_rate=1.0, resize=int(32 / 0.875), crop=32)
    views = load_views(video, spec)
    np.testing.assert_array_equal(result["frames"], views[0])
    params = jax.tree.map(jnp.asarray, params)
    _, state = model.apply({"params": params}, views, mutable="intermediates")
    found = state["intermediates"]
    encoder = found["aggregate"]["transformer_enc"]
    temporal = [
        np.asarray(encoder[f"layers_{i}"]["self_attn"]["attention_weights"][0][0])
        for i in range(stored["model"]["temporal_depth"])
    ]
    spatial = [
        np.asarray(found[f"blocks_{i}"]["attn"]["attention_weights"][0]) for i in range(model.depth)
    ]
    atol = 1e-5
    for layer, weights in enumerate(temporal):
        np.testing.assert_allclose(
            result["temporal_layers"][layer], weights.mean(0)[0, 1:], atol=atol
        )
    np.testing.assert_allclose(result["temporal_rollout"], rollout(temporal)[0, 1:], atol=atol)
    np.testing.assert_allclose(
        result["spatial_rollout"], rollout(spatial)[:, 0, 1:].reshape(4, 4, 4), atol=atol
    )
    for rate in (float("inf"), 1e9):
        with pytest.raises(
            ValueError,
            match=re.escape(f"frame_rate {rate:g}: use a number of frames per second in (0, 1000]"),
        ):
            explain_video(root / "ckpt", video, frame_rate=rate)
    # A suffix in capitals is a picture suffix all the same.
    assert explain_module.output_path(root / "p.PNG", video) == root / "p.PNG"
    (root / "d.png").mkdir()  # "--out d" is d.png: a folder
    with pytest.raises(ValueError, match=r"--out .*d\.png is a directory; name the picture"):
        explain_module.output_path(root / "d", video)
    # The top-5 panel names the most probable class first.
    labels = [t.get_text() for t in figure(result).axes[-1].get_yticklabels()]
    best = int(np.argmax(result["probabilities"]))
    assert len(labels) == 5 and labels[0].startswith(f"class {best} (")
