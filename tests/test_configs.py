"""Run configs build the models they name, with overrides from the command line."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from stam_jax.cli import config_file_problem, parse_flags
from stam_jax.configs import (
    config_files_for,
    flat_fields,
    model_from_run_config,
    name_data_flags,
)
from stam_jax.data.video import ClipSpec
from stam_jax.evaluate import _clip_spec
from stam_jax.variants import create_model, variant_name

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"stam_16": 16, "stam_32": 32, "stam_64": 64, "tiny": 4}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_builds_its_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = model_from_run_config(config)
    assert model.num_frames == CONFIGS[name]
    assert variant_name(model) == config.model
    # The run-time defaults are the model's own: float32, 'auto' attention, no remat, automatic
    # frame steps.
    assert model == create_model(config.model)
    # T frames at frame_rate cover the first 10 s of a video, as in the official protocol.
    if name != "tiny":
        assert config.data.frame_rate * 10 == pytest.approx(model.num_frames)
        # The rest of the official protocol: Resize(256), CenterCrop(224), the first clip only,
        # one crop, videos shorter than T left out; batches of 6 videos (6 * T frames).
        assert _clip_spec(config, model) == ClipSpec(
            num_frames=model.num_frames, frame_rate=config.data.frame_rate
        )
        assert (ClipSpec().resize, ClipSpec().crop, model.image_size) == (256, 224, 224)
        assert (ClipSpec().num_clips, ClipSpec().num_crops) == (1, 1)
        assert ClipSpec().short_videos == "official" and config.batch_size == 6
        # Training: the official rates (dropout 0.1 in the temporal layers, none in the ViT).
        rates = (model.temporal_dropout_rate, model.dropout_rate, model.drop_path_rate)
        assert rates == (0.1, 0.0, 0.0)


def test_overrides_reach_the_model():
    config = importlib.import_module("configs.stam_16").get_config()
    config.dtype = "bfloat16"
    config.model_overrides.num_classes = 600
    model = model_from_run_config(config)
    assert model.num_classes == 600 and model.dtype.__name__ == "bfloat16"
    # Every run-time field too, and each architecture override.
    config.param_dtype, config.attention_impl = "float16", "xla"
    config.remat, config.frame_chunk = True, 12
    overrides = dict(
        num_frames=8,
        aggregate="mean",
        dropout_rate=0.2,
        drop_path_rate=0.3,
        temporal_dropout_rate=0.4,
    )
    config.model_overrides.update(overrides)
    model = model_from_run_config(config)
    assert model.param_dtype.__name__ == "float16" and model.attention_impl == "xla"
    assert (model.remat, model.frame_chunk) == (True, 12)
    assert {k: getattr(model, k) for k in overrides} == overrides


@pytest.mark.parametrize(
    "xdg_cache_home,want",
    [
        ("/scratch/me/cache", "/scratch/me/cache/stam_jax/xla"),
        (None, "~/.cache/stam_jax/xla"),
        ("", "~/.cache/stam_jax/xla"),
        ("relative/cache", "~/.cache/stam_jax/xla"),  # ignored, as the XDG rules ask
    ],
)
def test_compilation_cache_is_in_the_users_cache_folder(monkeypatch, xdg_cache_home, want):
    if xdg_cache_home is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg_cache_home)
    for name in ("stam_16", "stam_64", "tiny"):
        config = importlib.import_module(f"configs.{name}").get_config()
        assert config.compilation_cache_dir == want
    # The demo keeps no cache.
    assert importlib.import_module("configs.demo").get_config("stam").compilation_cache_dir == ""


def test_demo_runs_build_the_models_the_demo_needs():
    demo = importlib.import_module("configs.demo")
    models = {run: model_from_run_config(demo.get_config(run)) for run in demo.RUNS}
    # The frame model: one still frame, 4 size classes, no temporal transformer.
    frames = models["frames"]
    assert (frames.num_frames, frames.num_classes, frames.aggregate) == (1, 4, "mean")
    # STAM and its baseline: the same ViT over 8 frames, 2 classes; they differ in aggregate.
    for run, aggregate in [("stam", "transformer"), ("mean", "mean")]:
        model = models[run]
        assert (model.num_frames, model.num_classes, model.aggregate) == (8, 2, aggregate)
    assert variant_name(models["stam"]) == "stam_demo"
    assert models["mean"].clone(aggregate="transformer") == models["stam"]
    assert frames.clone(num_frames=8, num_classes=2) == models["mean"]  # the same ViT
    with pytest.raises(
        ValueError, match=r"^configs/demo\.py:frame: use one of frames, stam, mean\.$"
    ):
        demo.get_config("frame")


def test_run_train_without_data_is_refused():
    result = subprocess.run(
        [sys.executable, "run_train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/unused"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "no training data: pass --config.train.root=VIDEO_ROOT" in result.stderr


def test_bad_run_config_values_name_the_flag():
    def refused(message, **values):
        config = importlib.import_module("configs.tiny").get_config()
        for key, value in values.items():
            node, *path = key.split("__")
            target = config if not path else config[node]
            target[path[0] if path else node] = value
        with pytest.raises(ValueError, match=message):
            model_from_run_config(config)

    refused(r"--config.dtype='fp16' is not supported; use float32, bfloat16", dtype="fp16")
    refused(r"--config.param_dtype='bf16' is not supported", param_dtype="bf16")
    refused(r"--config.model='stam_99' is not a registered variant; use one of", model="stam_99")
    refused(
        r"--config.attention_impl='flash' .* auto, xla, cudnn, heads_first", attention_impl="flash"
    )
    refused(
        r"--config.model_overrides.num_frames=0; it must be >= 1", model_overrides__num_frames=0
    )
    refused(
        r"--config.model_overrides.num_classes=0; it must be >= 1", model_overrides__num_classes=0
    )
    refused(
        r"overrides.temporal_dropout_rate=1.0; use a probability",
        model_overrides__temporal_dropout_rate=1.0,
    )
    refused(
        r"--config.model_overrides.aggregate='max'; use one of transformer, mean",
        model_overrides__aggregate="max",
    )
    # Trained silently: 1.5 zeroed every dropped activation, -0.1 rescaled the residuals.
    refused(
        r"overrides.dropout_rate=1.5; use a probability in \[0, 1\)",
        model_overrides__dropout_rate=1.5,
    )
    refused(
        r"overrides.drop_path_rate=-0.1; use a probability", model_overrides__drop_path_rate=-0.1
    )
    refused(r"--config.data.workers=-5; use -1 \(one decoding process per core\)", data__workers=-5)
    refused(r"--config.data.prefetch=-3; use the number of videos", data__prefetch=-3)
    assert config_files_for(16, 224) == ["configs/stam_16.py"]
    assert config_files_for(8, 224) == []


def test_flat_fields_leave_out_whole_fields_and_what_is_under_them():
    import ml_collections

    config = ml_collections.ConfigDict(
        {"train": {"steps": 1}, "train_note": "x", "data": {"crop": 2, "cropped": 3}, "a": 0}
    )
    assert list(flat_fields(config).items()) == [
        ("a", 0),
        ("data.crop", 2),
        ("data.cropped", 3),
        ("train.steps", 1),
        ("train_note", "x"),
    ]
    # 'train' leaves out 'train.steps', not 'train_note'; 'data.crop' not 'data.cropped'.
    assert flat_fields(config, ("train", "data.crop")) == {
        "a": 0,
        "data.cropped": 3,
        "train_note": "x",
    }


def test_data_errors_name_their_fields_as_flags():
    error = ValueError("crop=300 is larger than resize=256; train_min_area=0.1, num_clips=0")
    assert name_data_flags(error) == (
        "--config.data.crop=300 is larger than --config.data.resize=256; "
        "--config.data.train_min_area=0.1, --config.data.num_clips=0"
    )
    # A flag already written out, and a longer name that ends like a field, are left alone.
    error = ValueError("--config.data.crop=48; min_crop=3")
    assert name_data_flags(error) == "--config.data.crop=48; min_crop=3"


def test_flag_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    def error(*args, workdir="--workdir=w"):
        argv = ["run_eval.py", "--config=configs/tiny.py", *args, *([workdir] if workdir else [])]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags finds overrides in sys.argv
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
        flags.DEFINE_string("workdir", None, "where results are written", flag_values=values)
        flags.mark_flags_as_required(["config", "workdir"], flag_values=values)
        with pytest.raises(SystemExit) as exit_:
            parse_flags(argv, values)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        return err

    assert error("--config.data.rot=/x") == (
        "error: unknown config field 'rot' (--config.data.rot). "
        'Did you mean "root" instead of "rot"?\n'
    )
    assert "--config.batch_size=abc: invalid literal" in error("--config.batch_size=abc")
    assert "unexpected arguments ['stray']" in error("stray")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise ValueError('no such run')\n")
    assert error(f"--config={bad}").endswith("ValueError: no such run\n")
    # A config file that does not compile, or raises, was a traceback (exit 1); one without
    # get_config() was "unknown config field"; one lacking fields failed at its first use
    # with AttributeError: "'data'".
    form = "(configs/stam_16.py shows the form)"
    for text, says in [
        ("def get_config(:\n", "does not compile: invalid syntax (line 1); fix it"),
        ("def get_config():\n    return nothing\n", "raised NameError: name 'nothing' is not "),
        ("\nimport no_such_module\n", "raised ModuleNotFoundError: No module named 'no_such_m"),
        ("x = 1\n", "defines no get_config(); a run config file defines get_config() returning"),
        ("def get_config():\n    pass\n", "its get_config() returned None, not a run config"),
    ]:
        bad.write_text(text)
        got = error(f"--config={bad}")
        assert got.startswith(f"error: --config={bad} {says}") or got.startswith(
            f"error: --config={bad}: {says}"
        ), got
        assert form in got, got
    bad.write_text(
        "import ml_collections\n\ndef get_config():\n    config = ml_collections.ConfigDict()\n"
        "    config.model = 'stam_tiny'\n    config.data = ml_collections.ConfigDict()\n"
        "    config.data.root = ''\n    return config\n"
    )
    got = error(f"--config={bad}")
    assert re.fullmatch(
        rf"error: --config={re.escape(str(bad))}: the run config lacks fields every stam-jax "
        r"run config has: attention_impl, batch_size, checkpoint, compilation_cache_dir, "
        r"data\.class_list, data\.crop, data\.frame_rate, data\.num_clips, data\.num_crops, "
        r"data\.prefetch, data\.resize, data\.short_videos and \d+ more; build it on "
        r"configs\.common\.base_config\(MODEL\), which sets each to its default, and change "
        r"only what differs \(as configs/stam_16\.py does\)\.\n",
        got,
    ), got
    # The configs given with stam-jax have every field (they are built on base_config).
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name not in ("__init__.py", "common.py"):
            assert config_file_problem(["run_eval.py", f"--config={path}"]) is None, path
    # A required flag left out is named with what it is for (was absl's "Flag --workdir must
    # have a value other than None").
    assert error(workdir="") == (
        "error: --workdir is required: where results are written (--workdir=...).\n"
    )
    missing = tmp_path / "nope.py"  # was a 40-line traceback with exit 1
    assert error(f"--config={missing}") == (
        f"error: cannot load the --config file: [Errno 2] No such file or directory: '{missing}'\n"
    )


CTRL_C = """
import importlib, sys, types
import {module} as cli
def interrupted(*args):
    raise KeyboardInterrupt
setattr(importlib.import_module("{library}"), "{target}", interrupted)
cli._CONFIG = cli._WORKDIR = types.SimpleNamespace(value="w")
cli.main([])
"""


def test_ctrl_c_is_one_line_and_exit_130():
    # Was Python's KeyboardInterrupt traceback; the decoding processes end with the run.
    for module, library, target, says in [
        ("run_eval", "stam_jax.evaluate", "evaluate", "no results were kept yet; the same command"),
        (
            "run_train",
            "stam_jax.train",
            "train_and_evaluate",
            "no checkpoint was saved yet (none in w/checkpoints); the same command "
            "starts the run again.",
        ),
    ]:
        code = CTRL_C.format(module=module, library=library, target=target)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 130, result.stderr[-2000:]
        assert result.stderr.startswith("interrupted: ") and result.stderr.count("\n") == 1
        assert says in result.stderr


@pytest.mark.parametrize(
    "path",
    [
        "run_eval.py",
        "run_train.py",
        "stam_jax/data/prepare.py",
        "configs/stam_16.py",
        "configs/stam_32.py",
        "configs/stam_64.py",
        "configs/tiny.py",
        "benchmarks/forward_bench.py",
    ],
)
def test_docstring_commands_keep_their_line_continuations(path):
    # The docstrings are the --help texts: a `\` at a line's end inside a plain """...""" joins
    # the lines, and --help showed one line with a run of spaces in the middle of the command.
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text(encoding="utf-8")), clean=False)
    assert "\\\n" in doc
    assert not re.search(r"\S {4,}--", doc), doc


def test_a_file_named_like_a_flag_is_named_with_how_to_write_it(tmp_path, capsys, monkeypatch):
    # Kinetics ids often start with '-'; argparse reads such a file as an unknown flag.
    from stam_jax.cli import ArgumentParser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "-abc_000010_000020.mp4").write_bytes(b"")

    def error(*argv):
        parser = ArgumentParser(prog="explain")
        parser.add_argument("video")
        parser.add_argument("--out", default="x.png")
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(list(argv))
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert error("-abc_000010_000020.mp4") == (
        "error: the following arguments are required: video; -abc_000010_000020.mp4 was read as "
        "a flag, as its name starts with '-': write it as ./-abc_000010_000020.mp4 (or put -- "
        "before it)\n"
    )
    # A mistyped flag that names no file gets no such hint,
    assert error("v.mp4", "--ot=y.png") == "error: unrecognized arguments: --ot=y.png\n"
    # nor does a file after '--', which is read as a file.
    assert error("--ot", "--", "-abc_000010_000020.mp4") == (
        "error: unrecognized arguments: --ot\n"
    )
