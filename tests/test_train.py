"""Training: a real loop on real videos, exact resume after SIGKILL, refusals, NaN stop."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import (
    NO_DECODING_PROCESSES,
    child_pids,
    files_in,
    free_port,
    held_here,
    pools_refusing_after,
    run_processes,
    xla_flags,
)
from test_eval import make_folder

from stam_jax import checkpoints, create_model, sharding
from stam_jax.train import FAIL_HOOK, KILL_HOOK

ROOT = Path(__file__).resolve().parent.parent
TWO_DEVICES = {"XLA_FLAGS": xla_flags(2)}


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("train"), per_class=1, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")  # later runs reuse the compiled step


@pytest.fixture(scope="module", autouse=True)
def in_process_cache(cache):
    """This module's in-process compiles go through `cache` too, as its commands' do.

    Every `train_and_evaluate` here compiled the tiny model's init afresh (about 8 s of CPU
    each; its jit is made anew per call). Off again after the module: test files share the
    worker processes. No test here checks in-process compilation.
    """
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()  # JAX decides once per process whether it caches
    sharding.enable_compilation_cache(str(cache))
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


# One jitted init of the tiny model for the tests' own params (a teacher, the initial params):
# its compile is one of the longest of this file.
tiny_init = jax.jit(create_model("stam_tiny").init)


def init_params(seed: int):
    return tiny_init(jax.random.key(seed), np.zeros((1, 4, 32, 32, 3), np.uint8))["params"]


def command(root: Path, workdir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run_train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        f"--config.train.root={root}",
        f"--workdir={workdir}",
        "--config.batch_size=4",
        "--config.train.steps=8",
        "--config.train.save_every=3",
        "--config.train.log_every=2",
        "--config.train.learning_rate=1e-3",
        "--config.train.warmup_steps=2",
        "--config.data.workers=0",
        "--config.progress=False",
        f"--config.compilation_cache_dir={cache}",
        *extra,
    ]


def run(cmd, env=None, timeout=600, cwd=ROOT):
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def uninterrupted(train_root, cache, tmp_path_factory):
    """8 steps in one process with two devices: the reference for the resumed and 2-process runs."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run(command(train_root, workdir, cache), env={"JAX_LOG_COMPILES": "1", **TWO_DEVICES})
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "stderr.log").write_text(result.stderr)
    return workdir


def final_params(workdir: Path):
    return checkpoints.load(workdir / "final")[1], checkpoints.load(workdir / "final_ema")[1]


def test_training_writes_metrics_checkpoints_and_final_params(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8]
    assert all(np.isfinite(row["loss"]) and row["learning_rate"] > 0 for row in rows)
    assert rows[-1]["failed_videos"] == 0 and rows[-1]["videos_per_s"] > 0
    steps = sorted(
        int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps == [3, 6, 8]  # every save_every steps, and the last
    # The train step compiled once for all 8 steps (JAX_LOG_COMPILES logs every compilation).
    # Counted in absl's format: older jax logs each line a second time through its own handler.
    log = (uninterrupted / "stderr.log").read_text()
    compiles = re.findall(r"^W\d{4} [^\n]*\] Compiling jit\(step_fn\)", log, re.MULTILINE)
    assert len(compiles) == 1, log[-3000:]
    # TensorBoard events hold the same numbers as metrics.jsonl.
    from tensorboardX.proto.event_pb2 import Event

    events = {}
    for path in (uninterrupted / "tensorboard").iterdir():
        data = path.read_bytes()
        at = 0
        while at < len(data):  # TFRecord: length, crc, payload, crc
            length = int.from_bytes(data[at : at + 8], "little")
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                events[(value.tag, event.step)] = value.simple_value
    for row in rows:
        assert events[("train/loss", row["step"])] == pytest.approx(row["loss"], rel=1e-6)
        assert events[("train/learning_rate", row["step"])] == pytest.approx(row["learning_rate"])
    model, params = checkpoints.load(uninterrupted / "final")
    assert model.num_classes == 10
    ema = checkpoints.load(uninterrupted / "final_ema")[1]
    # The EMA trails the params (decay 0.999 over 8 steps), so they differ.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema), strict=True)
    )
    # The trained params are not the initial ones: the optimizer moved them.
    assert not np.array_equal(params["head"]["kernel"], init_params(0)["head"]["kernel"])


def test_tensorboard_is_written_without_importing_torch(tmp_path):
    # tensorboardX imports PyTorch if it is installed (seconds of each start), only to accept
    # torch tensors; training imports it without, and torch still imports afterwards.
    code = (
        "import sys; from pathlib import Path; from stam_jax.train import _summary_writer; "
        "w = _summary_writer(Path(sys.argv[1]), None); w.add_scalar('loss', 0.5, 3); w.close(); "
        "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())"
    )
    result = run([sys.executable, "-c", code, str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "2.0"]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_sigkill_during_a_save_and_at_any_moment_then_resume_is_bit_exact(
    train_root, cache, uninterrupted, tmp_path
):
    # One run killed twice, then resumed to its end: first by the test hook while the
    # checkpoint of step 6 is being written; then, resumed, at a moment of no choosing (0.3 s
    # after it finished a checkpoint of its own). (Two tests of two starts each were one start
    # more.)
    from stam_jax.export import saved_steps

    killed = run(command(train_root, tmp_path, cache), env={KILL_HOOK: "6", **TWO_DEVICES})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final").exists()
    saved = tmp_path / "checkpoints"
    last = max(saved_steps(saved)[0])  # step 3, or 6 if its save got through
    proc = subprocess.Popen(
        command(train_root, tmp_path, cache),
        cwd=ROOT,
        env={**os.environ, **TWO_DEVICES},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while max(saved_steps(saved)[0]) <= last and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(command(train_root, tmp_path, cache), env=TWO_DEVICES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, want_ema = final_params(uninterrupted)
    got, got_ema = final_params(tmp_path)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(got_ema, want_ema)


def test_refusals_and_non_finite_stop(train_root, cache, uninterrupted, tmp_path):
    # (Through the command line a refusal is one `error:` line and exit status 2:
    # test_configs.py::test_run_train_without_data_is_refused.)
    from stam_jax.train import TrainConfigError, train_and_evaluate

    config = tiny_config(train_root)
    config.model_overrides.num_classes = 7
    with pytest.raises(TrainConfigError, match="has 10 classes but the model has 7 outputs"):
        train_and_evaluate(config, tmp_path / "a")
    missing = tmp_path / "vit_b16.npz"
    config = tiny_config(train_root)
    config.checkpoint = str(missing)
    with pytest.raises(TrainConfigError, match=re.escape(f"--config.checkpoint={missing}")):
        train_and_evaluate(config, tmp_path / "i")
    config = tiny_config(train_root)
    config.batch_size = 0
    with pytest.raises(TrainConfigError, match="batch_size=0: must be at least 1"):
        train_and_evaluate(config, tmp_path / "b")
    config = tiny_config(train_root)
    config.data.crop = 300
    with pytest.raises(TrainConfigError, match=r"--config.data.crop=300 is larger than --config"):
        train_and_evaluate(config, tmp_path / "c")
    config = tiny_config(train_root)
    config.train.freeze = "vit,block_0"  # refused before the data is listed or the workdir made
    with pytest.raises(TrainConfigError, match="'block_0' matches no param of this model; use "):
        train_and_evaluate(config, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    config = tiny_config(train_root)
    config.frame_chunk = 3
    chunk = "--config.frame_chunk: frame_chunk=3 does not divide the batch's 16 frames"
    with pytest.raises(TrainConfigError, match=re.escape(chunk)):
        train_and_evaluate(config, tmp_path / "d")
    # A loss that overflows stops the run with exit status 4, before it saves anything. The
    # run is `uninterrupted`'s (its compiled step is in the cache) from params whose logits
    # overflow float32: the head sees ones (its LayerNorm's scale 0, bias 1) through 3e38s.
    model, params = checkpoints.load(uninterrupted / "final")
    params = jax.tree.map(np.array, params)
    norm = params["aggregate"]["transformer_enc"]["norm"]
    norm["scale"][:], norm["bias"][:], params["head"]["kernel"][:] = 0.0, 1.0, 3e38
    checkpoints.save(tmp_path / "overflowing", model, params)
    result = run(
        command(
            train_root, tmp_path / "c", cache, f"--config.checkpoint={tmp_path / 'overflowing'}"
        ),
        env=TWO_DEVICES,
    )
    assert result.returncode == 4, result.stderr[-2000:]
    assert result.stderr.endswith(
        "error: step 1: loss nan, gradient norm nan; stopped before saving, no checkpoint saved "
        "yet. Lower --config.train.learning_rate.\n"
    ), result.stderr[-2000:]


def test_periodic_evaluation_keeps_the_best_and_distils(train_root, cache, uninterrupted, tmp_path):
    teacher, params = create_model("stam_tiny"), init_params(5)
    checkpoints.save(tmp_path / "teacher", teacher, params)
    eval_root = tmp_path / "eval_videos"  # the training videos and one that does not decode
    shutil.copytree(train_root, eval_root)
    (eval_root / "class_0" / "broken.mp4").write_text("not a video")
    extra = [
        "--config.train.eval_every=4",
        f"--config.train.eval_root={eval_root}",
        f"--config.train.teacher={tmp_path / 'teacher'}",
        "--config.train.mixup_alpha=0.2",
        "--config.train.cutmix_alpha=1.0",
        "--config.frame_chunk=8",  # the ViT in 2 steps of 8 frames, training and evaluation
        "--config.eval.accuracy=False",  # run_eval's switch: periodic evaluation computes top-1
    ]
    # Two devices and 8 steps, as `uninterrupted`: the init compiled there is read back.
    result = run(command(train_root, tmp_path / "run", cache, *extra), env=TWO_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "top1" in row]
    assert [row["step"] for row in evals] == [4, 8]
    assert all(0 <= row["top1"] <= 1 and 0 <= row["ema_top1"] <= 1 for row in evals)
    for step in (4, 8):
        for name in ("params", "ema"):
            results = json.loads(
                (run_dir / f"eval/step_{step}/{name}_results/results.json").read_text()
            )
            assert results["counts"]["evaluated"] == 10
    best = json.loads((run_dir / "best.json").read_text())
    top = max(max(row["top1"], row["ema_top1"]) for row in evals)
    assert best["top1"] == top and best["step"] in (4, 8) and best["params"] in ("params", "ema")
    assert best["eval"]["eval_root"] == str(eval_root)
    # One line per evaluation, both sets on it (not evaluate's whole summary once per set).
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval at step")]
    assert [line.split(":")[0] for line in lines] == ["eval at step 4", "eval at step 8"]
    assert all(" on 10 of 11 videos, 1 left out" in line and "(EMA " in line for line in lines)
    assert "videos/s" not in result.stdout
    # Named once in the whole run, though both sets skipped it at both evaluations.
    assert result.stderr.count("eval skipped class_0/broken.mp4") == 1, result.stderr[-3000:]
    # Only the best params are kept, and they are the ones that scored it.
    for step in (4, 8):
        names = sorted(p.name for p in (run_dir / f"eval/step_{step}").iterdir())
        assert names == ["ema_results", "params_results"]
    from stam_jax.evaluate import evaluate

    config = tiny_config(train_root)
    config.checkpoint, config.data.root = str(run_dir / "best"), str(train_root)
    config.frame_chunk = 8  # as in the run
    again = evaluate(config, tmp_path / "again")
    assert again["metrics"]["top1"] == best["top1"]
    # Refused before any compute: evaluation without a folder, a teacher of another size.
    from stam_jax.train import TrainConfigError, train_and_evaluate

    with pytest.raises(TrainConfigError, match=r"needs --config\.train\.eval_root"):
        train_and_evaluate(tiny_config(train_root, eval_every=2), tmp_path / "x")
    # Evaluation settings that the first evaluation would refuse, after training up to it.
    for field, value, message in [
        ("average", "max", r"--config\.eval\.average='max'; use 'logits'"),
        ("features", "all", r"--config\.eval\.features='all'; use 'video'"),
    ]:
        bad = tiny_config(train_root, eval_every=2, eval_root=str(eval_root))
        bad.eval[field] = value
        with pytest.raises(TrainConfigError, match=message):
            train_and_evaluate(bad, tmp_path / f"bad_{field}")
        assert not (tmp_path / f"bad_{field}").exists()
    renamed = tmp_path / "renamed"  # the same count of classes, one of another name
    shutil.copytree(train_root, renamed)
    (renamed / "class_9").rename(renamed / "zzz_other")
    with pytest.raises(TrainConfigError, match=r"label 9 is 'zzz_other' there, 'class_9' in "):
        train_and_evaluate(
            tiny_config(train_root, eval_every=2, eval_root=str(renamed)), tmp_path / "z"
        )
    other = create_model("stam_tiny", num_classes=7)
    shapes = jax.eval_shape(other.init, jax.random.key(0), np.zeros((1, 4, 32, 32, 3), np.uint8))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes["params"])
    checkpoints.save(tmp_path / "t7", other, zeros)  # refused on its config: values unused
    with pytest.raises(TrainConfigError, match="has num_classes=7, the student 10"):
        train_and_evaluate(tiny_config(train_root, teacher=str(tmp_path / "t7")), tmp_path / "y")
    diverged = jax.tree.map(np.array, params)
    diverged["head"]["bias"][2] = np.inf
    checkpoints.save(tmp_path / "t_inf", teacher, diverged)
    with pytest.raises(TrainConfigError) as refused:  # its every distillation loss: NaN
        train_and_evaluate(tiny_config(train_root, teacher=str(tmp_path / "t_inf")), tmp_path / "w")
    assert str(refused.value).startswith(
        f"--config.train.teacher: {tmp_path / 't_inf'} holds NaN or Inf values in 1 param(s) "
        "(head/bias); distil from a teacher with finite params (a run that diverged: export"
    )
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_videos_that_cannot_be_used_stop_the_run_and_are_named(cache, uninterrupted, tmp_path):
    # Files that are not videos: each named once (they recur every epoch) and listed; the run
    # stops once more than half of 32 videos seen failed (at step 8, the 8th batch of 4), instead
    # of "training" on. `uninterrupted`'s command, so its compiled program is in the cache.
    root = tmp_path / "bad"
    for c in range(10):  # the tiny model's 10 classes
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(2):
            (root / f"class_{c}" / f"v{i}.mp4").write_text("not a video")
    # A relative workdir, as in the README (orbax needs absolute).
    cmd = command(root, Path("runs/bad"), cache, "--config.train.save_every=100")
    result = run(cmd, env=TWO_DEVICES, cwd=tmp_path)
    log = tmp_path / "runs" / "bad" / "failed_videos.jsonl"
    assert result.returncode == 4, result.stderr[-3000:]  # stopped: a TrainStopped
    assert result.stderr.endswith(
        "error: step 8: 32 of the 32 training videos of steps 1-8 could not be used (they failed "
        f"to decode or are too short; each is named above and in {log}). Check "
        f"--config.train.root={root}; checkpoints saved so far are intact.\n"
    ), result.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    paths = sorted(str(p) for p in root.rglob("*.mp4"))
    assert sorted(row["path"] for row in rows) == paths and {r["status"] for r in rows} == {
        "failed"
    }
    assert all(row["path"] == str(root / row["video"]) for row in rows)
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 20 and all(line.startswith("warning: step ") for line in warnings)
    # metrics.jsonl counts the videos of every batch that could not be used (all processes').
    metrics = (tmp_path / "runs" / "bad" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["failed_videos"] for row in metrics] == [8, 16, 24]


def test_each_process_lists_the_videos_it_could_not_use(tmp_path, monkeypatch):
    # Multi-host: every process decodes its own rows, so each lists its own failures (only
    # process 0's used to be written anywhere but its stderr).
    from types import SimpleNamespace

    from stam_jax.train import _Unusable

    failure = SimpleNamespace(status="failed", reason="InvalidDataError")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)
        unusable = _Unusable(tmp_path, start=0)
        unusable.add(3, f"/videos/{rank}.mp4", failure)
        unusable.add(5, f"/videos/{rank}.mp4", failure)  # named once
    for rank in (0, 1):
        rows = (tmp_path / f"failed_videos.process_{rank}.jsonl").read_text().splitlines()
        assert [json.loads(row) for row in rows] == [
            {
                "step": 3,
                "path": f"/videos/{rank}.mp4",
                "status": "failed",
                "reason": "InvalidDataError",
            }
        ]
    assert not (tmp_path / "failed_videos.jsonl").exists()


def test_a_resume_lists_each_video_it_could_not_use_once(tmp_path):
    # A resume used to name again every video the run had listed (it fails in every epoch).
    from types import SimpleNamespace

    from stam_jax.train import _Unusable

    failure = SimpleNamespace(status="failed", reason="InvalidDataError")
    unusable = _Unusable(tmp_path, start=0)
    unusable.add(3, "/videos/a.mp4", failure)
    unusable.add(7, "/videos/b.mp4", failure)  # after the checkpoint of step 5: redone
    resumed = _Unusable(tmp_path, start=5)
    resumed.add(6, "/videos/a.mp4", failure)
    resumed.add(7, "/videos/b.mp4", failure)
    rows = (tmp_path / "failed_videos.jsonl").read_text().splitlines()
    assert [(json.loads(row)["step"], json.loads(row)["path"]) for row in rows] == [
        (3, "/videos/a.mp4"),
        (7, "/videos/b.mp4"),
    ]
    # Known by its path in the data root: a resume from the data moved elsewhere (the same
    # listing) named every such video again, at its new place.
    moved = tmp_path / "moved"
    moved.mkdir()
    first = _Unusable(moved, start=0)
    first.add(3, "/old/k400/c/a.mp4", failure, "c/a.mp4")
    again = _Unusable(moved, start=5)
    again.add(6, "/new/k400/c/a.mp4", failure, "c/a.mp4")
    again.add(6, "/new/k400/c/b.mp4", failure, "c/b.mp4")
    rows = [json.loads(row) for row in (moved / "failed_videos.jsonl").read_text().splitlines()]
    assert [(row["step"], row["path"], row["video"]) for row in rows] == [
        (3, "/old/k400/c/a.mp4", "c/a.mp4"),
        (6, "/new/k400/c/b.mp4", "c/b.mp4"),
    ]


def train_two_processes(
    base: list[str], workdir: Path, kill_at: int | None = None, term_at: int | None = None
) -> None:
    """`base`, a run_train.py command for 8 steps into `workdir`, as 2 processes of 1 device each
    (jax.distributed on localhost).

    With `kill_at`, both processes are first SIGKILLed while the checkpoint of that step is
    being written, then the run is started again and resumes. With `term_at`, process 1 is
    first sent SIGTERM as it starts that step: both save the step they agree on and end, then
    the run is started again and resumes.
    """

    def commands() -> list[list[str]]:
        flags = [
            f"--config.distributed.coordinator=localhost:{free_port()}",
            "--config.distributed.num_processes=2",
        ]
        return [[*base, *flags, f"--config.distributed.process_id={rank}"] for rank in range(2)]

    if kill_at is not None:
        killed = run_processes(commands(), devices_each=1, env={KILL_HOOK: str(kill_at)})
        assert [returncode for returncode, _, _ in killed] == [-signal.SIGKILL] * 2, killed
        assert not (workdir / "final").exists()
        saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
        assert 1 <= max(saved) <= kill_at, saved  # a complete checkpoint to resume from
    if term_at is not None:
        ended = run_processes(commands(), devices_each=1, env={FAIL_HOOK: f"1:{term_at}:term"})
        lines = [err.splitlines()[-1] if err else "" for _, _, err in ended]
        assert [returncode for returncode, _, _ in ended] == [128 + signal.SIGTERM] * 2, lines
        saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
        # Both end at the step they agreed on, the last saved, with the same line.
        assert term_at <= max(saved) < 8, saved
        assert (
            lines
            == [
                f"terminated (SIGTERM to a process of the run) at step {max(saved)}: its "
                f"checkpoint is saved in {workdir}/checkpoints; run the same command again to "
                "resume from it."
            ]
            * 2
        ), lines
        assert not (workdir / "final").exists()
    results = run_processes(commands(), devices_each=1)
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    resumed = "" if kill_at is term_at is None else f" (resumed from step {max(saved)})"
    assert f"trained to step 8{resumed}; final params in" in results[0][1]
    assert "final params in None" in results[1][1]  # only process 0 writes the params


def test_sigterm_saves_the_step_it_comes_in_and_the_same_command_resumes(
    train_root, cache, tmp_path, uninterrupted
):
    # SIGTERM (a scheduler's preemption, `kill`) used to end a single-process run at once,
    # losing the steps since the last save. Once training steps have begun, the step it comes
    # in is now logged and saved, and the run ends (143) saying how to resume; the same command
    # then ends where an uninterrupted run does, bit for bit.
    workdir = tmp_path / "run"
    cmd = command(train_root, workdir, cache)
    ended = run(cmd, env={FAIL_HOOK: "0:5:term", **TWO_DEVICES})
    assert ended.returncode == 128 + signal.SIGTERM, ended.stderr[-3000:]
    assert ended.stderr.endswith(
        f"terminated (SIGTERM) at step 5: its checkpoint is saved in {workdir}/checkpoints; "
        "run the same command again to resume from it.\n"
    ), ended.stderr[-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 3, 5] and not (workdir / "final").exists()
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [2, 4, 5]
    resumed = run(cmd, env=TWO_DEVICES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained to step 8 (resumed from step 5)" in resumed.stdout
    for got, want in zip(final_params(workdir), final_params(uninterrupted), strict=True):
        chex.assert_trees_all_equal(got, want)
    # Before the steps begin (here: as the initial params are read), there is no step to save:
    # SIGTERM is a Ctrl-C, which ends the run at once.
    early = run(
        command(train_root, tmp_path / "early", cache), env={FAIL_HOOK: "0:0:term", **TWO_DEVICES}
    )
    assert early.returncode == 130, early.stderr[-3000:]
    assert early.stderr.endswith(
        f"interrupted: no checkpoint was saved yet (none in {tmp_path / 'early'}/checkpoints); "
        "the same command starts the run again.\n"
    ), early.stderr[-3000:]


@pytest.mark.parametrize(
    "how, line",
    [
        ("raise", r"error: process 1 failed: RuntimeError: test hook .*; process 1's own output"),
        ("kill", r"error: process 1 stopped answering without reporting an error \(killed, "),
    ],
)
def test_a_process_that_fails_or_is_killed_stops_the_other_saying_why(
    train_root, cache, tmp_path, how, line
):
    # Process 1 fails (or is SIGKILLed) before the processes compare their initial params
    # (nothing is compiled for the step: the test stays short). Process 0 used to wait in its
    # collective, then in jax's shutdown barrier (300 s after a raise, 100 s after a kill), and
    # end in pages of coordination-service errors naming no process; now it ends at once,
    # naming process 1 and its error.
    base = command(
        train_root, tmp_path, cache, f"--config.distributed.coordinator=localhost:{free_port()}"
    )
    commands = [
        [*base, "--config.distributed.num_processes=2", f"--config.distributed.process_id={rank}"]
        for rank in range(2)
    ]
    (status0, _, err0), (status1, _, err1) = run_processes(
        commands, devices_each=1, timeout=200, env={FAIL_HOOK: f"1:0:{how}"}
    )
    assert status0 == 5, err0[-3000:]
    assert re.search(line, err0), err0[-3000:]
    assert "Terminating process" not in err0  # jax's fatal end, which names no one
    if how == "raise":
        assert status1 == 1 and f"RuntimeError: test hook {FAIL_HOOK}" in err1, err1[-3000:]
    else:
        assert status1 == -signal.SIGKILL


def test_each_process_decodes_its_rows_of_every_global_batch(train_root, monkeypatch):
    # With several processes, each decodes its rows of every global batch: together, the
    # single process's jobs (the same videos, labels and random keys, so the same clips). Two
    # processes training as one, end to end and bit for bit, are tested on a prepared
    # dataset (test_prepare), whose loop is this one but for where the rows come from.
    from stam_jax.data.folder import list_videos
    from stam_jax.data.video import ClipSpec
    from stam_jax.train import _Jobs

    folder, spec = list_videos(train_root), ClipSpec(4, 4.0, 36, 32)
    steps, batch = 6, 4  # 10 videos: 2 batches an epoch, 3 epochs

    def jobs(processes: int, rank: int, start: int = 0) -> list[list[tuple]]:
        monkeypatch.setattr(jax, "process_count", lambda: processes)
        monkeypatch.setattr(jax, "process_index", lambda: rank)
        jobs = _Jobs(folder, spec, 7, batch, start, steps)
        rows = [(*jobs[i][1:], jobs.label(i)) for i in range(len(jobs))]
        local = batch // processes
        return [rows[i : i + local] for i in range(0, len(rows), local)]  # per step

    one, first, second = jobs(1, 0), jobs(2, 0), jobs(2, 1)
    assert len(one) == steps and all(len(rows) == batch for rows in one)
    assert [a + b for a, b in zip(first, second, strict=True)] == one
    assert len({row[0] for rows in one[:2] for row in rows}) == 8  # an epoch: no repeats
    assert jobs(2, 1, start=4) == second[4:]  # a resume picks up the same rows


def test_decoding_processes_end_when_training_fails(train_root, tmp_path, monkeypatch):
    """However the loop ends, the decoding workers stop then, not when Python collects them."""
    import stam_jax.train as train_module
    from configs.tiny import get_config

    config = get_config()
    config.train.root, config.batch_size = str(train_root), 4
    config.train.steps, config.train.warmup_steps = 4, 1
    config.data.workers, config.progress, config.compilation_cache_dir = 2, False, ""
    before = child_pids()

    def failing_step(*args):
        def step(*inputs):
            raise RuntimeError("step failed")

        return step

    monkeypatch.setattr(train_module, "make_train_step", failing_step)
    with pytest.raises(RuntimeError, match="step failed") as failed:
        train_module.train_and_evaluate(config, tmp_path)
    # `failed` holds the traceback, so the training frame and its decoder are still alive.
    assert "train_and_evaluate" in [entry.name for entry in failed.traceback]
    assert child_pids() == before


def test_the_train_step_is_compiled_with_the_configs_xla_options(train_root, tmp_path, monkeypatch):
    # As in evaluation: the options for config.triton_gemm reach the step's compile.
    import stam_jax.train as train_module

    asked = []

    def options(value):
        asked.append(value)
        return {"not_an_xla_option": value}

    monkeypatch.setattr(train_module.sharding, "compiler_options", options)
    config = tiny_config(train_root)
    config.triton_gemm = True
    with pytest.raises(Exception, match="No such compile option: 'not_an_xla_option'"):
        train_module.train_and_evaluate(config, tmp_path)
    assert asked == [True]


def test_a_nan_loss_at_the_first_step_says_nothing_was_saved(train_root, tmp_path, monkeypatch):
    import stam_jax.train as train_module

    def nan_step(*args):
        def step(state, videos, labels, weights, teacher_params=None):
            return state, {"loss": np.nan, "grad_norm": np.inf, "videos": weights.sum()}

        return step

    monkeypatch.setattr(train_module, "make_train_step", nan_step)
    with pytest.raises(train_module.NonFiniteError) as stopped:
        train_module.train_and_evaluate(tiny_config(train_root), tmp_path)
    assert str(stopped.value) == (
        "step 1: loss nan, gradient norm inf; stopped before saving, no checkpoint saved yet. "
        "Lower --config.train.learning_rate."
    )
    assert not any((tmp_path / "checkpoints").iterdir())
    # Nothing was logged or saved, so the run may start again here with other settings (not
    # refused as another run: it trains, and this step stops it again).
    with pytest.raises(train_module.NonFiniteError, match=r"^step 1: loss nan"):
        train_module.train_and_evaluate(tiny_config(train_root, learning_rate=1e-4), tmp_path)


def test_a_best_measured_otherwise_is_not_compared(train_root, tmp_path, capsys):
    # A resume may change the eval root and the views; a top-1 measured otherwise says nothing.
    from stam_jax.train_eval import _eval_protocol, _read_best

    config = tiny_config(train_root, eval_root=str(tmp_path / "val"))
    protocol = _eval_protocol(config)
    assert protocol == {
        "eval_root": str(tmp_path / "val"),
        "data.num_clips": 1,
        "data.num_crops": 1,
        "data.short_videos": "official",
        "eval.average": "logits",
    }
    best_file = tmp_path / "best.json"
    assert _read_best(best_file, protocol) == {"top1": -1.0}  # no evaluation yet
    saved = {"step": 4, "params": "ema", "top1": 0.75, "eval": protocol}
    best_file.write_text(json.dumps(saved))
    assert _read_best(best_file, protocol) == saved
    config.train.eval_root, config.data.num_crops = str(tmp_path / "val_full"), 3
    assert _read_best(best_file, _eval_protocol(config)) == {"top1": -1.0}
    assert capsys.readouterr().err == (
        "note: the best top-1 so far (75.00% at step 4) was measured otherwise (eval_root "
        f"'{tmp_path / 'val'}' -> '{tmp_path / 'val_full'}'; data.num_crops 1 -> 3), so this "
        f"run's next evaluation becomes the best (replacing {tmp_path / 'best'}).\n"
    )
    del saved["eval"]  # written before the settings were recorded: compared as before
    best_file.write_text(json.dumps(saved))
    assert _read_best(best_file, _eval_protocol(config)) == saved


def tiny_config(root: Path, **train):
    """configs/tiny.py as `command` sets it, for calling train_and_evaluate in this process."""
    from configs.tiny import get_config

    config = get_config()
    config.train.root, config.batch_size = str(root), 4
    config.train.update(steps=8, save_every=3, log_every=2, learning_rate=1e-3, warmup_steps=2)
    config.data.workers, config.progress, config.compilation_cache_dir = 0, False, ""
    config.train.update(train)
    return config


def test_bad_settings_are_refused_before_any_file(train_root, tmp_path):
    from stam_jax.train import TrainConfigError, train_and_evaluate

    cases = [
        (dict(keep=0), "train.keep=0: must be a whole number >= 1"),
        (dict(save_every=0), "train.save_every=0: must be a whole number >= 1"),
        (dict(log_every=0), "train.log_every=0: must be a whole number >= 1"),
        (dict(steps=0, warmup_steps=0), "train.steps=0: must be a whole number >= 1"),
        (dict(accumulate=0), "train.accumulate=0: must be a whole number >= 1"),
        (dict(accumulate=3), "train.steps=8: not a multiple of train.accumulate=3 .* use 6 or 9"),
        # "use 16 or 16" where train.accumulate exceeds train.steps.
        (
            dict(accumulate=16),
            r"train.steps=8: not a multiple of train.accumulate=16 .* use 16, or a "
            r"train.accumulate <= 8; ",
        ),
        # Above float32's range the scale was Inf from the start: every step skipped.
        (
            dict(loss_scale_initial=1e39),
            r"train.loss_scale_initial=1e\+39: must be in \[1, 2\^32\]",
        ),
        (dict(loss_scale_initial=2.0**33), r"train.loss_scale_initial=8589934592.0: must be in \["),
        (dict(learning_rate=-1e-3), r"train.learning_rate=-0.001: must be > 0"),
        (dict(mixup_alpha=-1.0), r"train.mixup_alpha=-1.0: must be >= 0"),
        (dict(grad_clip=-1.0), r"train.grad_clip=-1.0: must be >= 0"),
        (dict(ema_decay=1.5), r"train.ema_decay=1.5: must be in \[0, 1\)"),
        (dict(warmup_steps=8), r"train.warmup_steps=8: the warm-up must end before"),
        (dict(optimizer="lamb"), r"train.optimizer='lamb': use 'adamw' or 'sgd'"),
        # inf passed the range checks, then stopped the run at step 2 with a NaN loss.
        (dict(learning_rate=math.inf), r"train.learning_rate=inf: must be a finite number"),
        (dict(weight_decay=math.inf), r"train.weight_decay=inf: must be a finite number"),
    ]
    for settings, message in cases:
        with pytest.raises(TrainConfigError, match=message + r".*fix --config\.train\."):
            train_and_evaluate(tiny_config(train_root, **settings), tmp_path / "run")
    # A run's outputs in its data were listed as a class of videos by the next run.
    for root_flag, workdir in (
        ("train.root", train_root / "run"),
        ("train.eval_root", tmp_path / "val" / "run"),
    ):
        config = tiny_config(train_root, eval_root=str(tmp_path / "val"))
        with pytest.raises(
            TrainConfigError,
            match=rf"^--workdir={re.escape(str(workdir))} is inside --config\.{root_flag}=",
        ):
            train_and_evaluate(config, workdir)
        assert not workdir.exists()
    config = tiny_config(train_root)  # went to JAX's cluster discovery, which named no flag
    config.distributed.num_processes = 2
    with pytest.raises(TrainConfigError, match=r"num_processes=2 needs --config\.distributed\.coo"):
        train_and_evaluate(config, tmp_path / "run")
    config = tiny_config(train_root)
    for seed in (-1, 2**32):  # numpy's data order raised on -1 after the run had started
        config.seed = seed
        with pytest.raises(TrainConfigError, match=rf"--config.seed={seed}: use a whole number"):
            train_and_evaluate(config, tmp_path / "run")
    config.seed = 0
    config.data.class_list = str(tmp_path / "classes.txt")  # named as itself, not as train.root
    missing = f"--config.data.class_list={tmp_path / 'classes.txt'}: no such file; give a text"
    with pytest.raises(TrainConfigError, match="^" + re.escape(missing)):
        train_and_evaluate(config, tmp_path / "run")
    config.data.class_list = ""
    config.dtype = "bfloat61"
    with pytest.raises(TrainConfigError, match="dtype='bfloat61' is not supported"):
        train_and_evaluate(config, tmp_path / "run")
    # Half-precision params trained silently lost their small updates (LayerNorm scales never
    # moved) or, in float16, turned NaN at the first Adam step.
    config.dtype, config.param_dtype = "float32", "bfloat16"
    half = r"--config.param_dtype='bfloat16': training keeps float32 params.* --config.dtype="
    with pytest.raises(TrainConfigError, match=half):
        train_and_evaluate(config, tmp_path / "run")
    config.param_dtype = "float32"
    # An official STAM .pth is not an image ViT: refused rather than read without its
    # temporal transformer.
    from convert.torch_io import save_state_dict

    official = tmp_path / "stam_tiny.pth"
    save_state_dict({"aggregate.cls_token": np.zeros((1, 1, 32), np.float32)}, official)
    config.dtype, config.checkpoint = "float32", str(official)
    official_stam = r"is an official STAM checkpoint.*python -m convert"
    with pytest.raises(TrainConfigError, match=official_stam):
        train_and_evaluate(config, tmp_path / "run")
    # JAX alone warned at every compile and trained on without the cache.
    config = tiny_config(train_root)
    (tmp_path / "afile").write_text("")
    config.compilation_cache_dir = str(tmp_path / "afile" / "xla")
    unwritable_cache = (
        r"^--config.compilation_cache_dir=.*afile/xla cannot be written: .*afile is a file, not a "
        r"folder\. Give a folder this process can write to, or --config.compilation_cache_dir=''"
    )
    with pytest.raises(TrainConfigError, match=unwritable_cache):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainConfigError, match=r"--workdir=.*file: .*file is a file, not a"):
        train_and_evaluate(tiny_config(train_root), tmp_path / "file")
    (tmp_path / "locked").mkdir()
    locked = r"--workdir=.*locked/run: .*locked is not writable"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(TrainConfigError, match=locked):
        # Tests run as root, who may write anywhere.
        patch.setattr(os, "access", lambda path, mode: not str(path).endswith("locked"))
        train_and_evaluate(tiny_config(train_root), tmp_path / "locked" / "run")


def test_a_restart_with_other_settings_is_refused(train_root, uninterrupted, tmp_path, capsys):
    import shutil

    from stam_jax.train import TrainConfigError, train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    metrics = (workdir / "metrics.jsonl").read_text()
    report = (workdir / "init_report.txt").read_text()
    changes = [
        (dict(learning_rate=2e-3), "train.learning_rate: 0.001 -> 0.002"),
        (dict(steps=12), "train.steps: 8 -> 12"),
    ]
    for settings, change in changes:
        with pytest.raises(TrainConfigError, match="made with other settings") as refused:
            train_and_evaluate(tiny_config(train_root, **settings), workdir)
        assert change in str(refused.value)
        # A finished run asked for more steps: how to train longer, from its final params.
        longer = f"new --workdir (to train longer: --config.checkpoint={workdir / 'final'} there)."
        assert (longer in str(refused.value)) == ("steps" in settings)
    config = tiny_config(train_root)
    config.seed = 1
    with pytest.raises(TrainConfigError, match="seed: 0 -> 1"):
        train_and_evaluate(config, workdir)
    assert (workdir / "metrics.jsonl").read_text() == metrics
    # A field the record lacks (added to stam-jax after the run started) is not compared; an
    # unreadable record is refused naming it.
    record = json.loads((workdir / "run_config.json").read_text())
    del record["train.distill_weight"]
    (workdir / "run_config.json").write_text(json.dumps(record))
    config = tiny_config(train_root, distill_weight=0.25)
    assert train_and_evaluate(config, workdir)["resumed_from"] == 8
    (workdir / "run_config.json").write_text('{"batch_size": 4, "chec')
    with pytest.raises(TrainConfigError, match=r"cannot read .*run_config\.json \("):
        train_and_evaluate(tiny_config(train_root), workdir)
    (workdir / "run_config.json").write_text(json.dumps(record))
    # How the run is logged, saved, run or evaluated may change: it resumes (here at its last
    # step). The evaluation's views are its own (its best restarts when they change).
    config = tiny_config(train_root, log_every=4, keep=5)
    config.data.num_crops, config.eval.average = 3, "softmax"
    summary = train_and_evaluate(config, workdir)
    assert summary["resumed_from"] == 8 and summary["step"] == 8
    assert "resuming" in capsys.readouterr().out
    assert (workdir / "init_report.txt").read_text() == report  # not rewritten on a resume
    # The training data may move (the same files elsewhere), not change.
    moved = tmp_path / "moved"
    shutil.copytree(train_root, moved)
    assert train_and_evaluate(tiny_config(moved), workdir)["resumed_from"] == 8
    assert f"the training data moved from {train_root} to {moved}: the same 10 videos" in (
        capsys.readouterr().err
    )
    # A checkpoint path written another way that leads to the same place is the same run
    # (it was refused as 'checkpoint: ... -> ...'); another checkpoint is not.
    record["checkpoint"] = str(workdir / "final")
    (workdir / "run_config.json").write_text(json.dumps(record))
    for path, same in ((f"{workdir}/./final/", True), (str(workdir / "final_ema"), False)):
        config = tiny_config(moved)
        config.checkpoint = path
        if same:
            assert train_and_evaluate(config, workdir)["resumed_from"] == 8
        else:
            with pytest.raises(TrainConfigError, match=r"checkpoint: '.*/final' -> '.*final_ema"):
                train_and_evaluate(config, workdir)
    next(moved.rglob("*.mp4")).rename(moved / "class_0" / "renamed.mp4")
    with pytest.raises(TrainConfigError, match="the videos, classes or labels of the training"):
        train_and_evaluate(tiny_config(moved), workdir)
    # Without its checkpoints (deleted, or none saved yet) the run starts again from step 0,
    # over its metrics, TensorBoard events and best params: other settings used to be taken
    # silently, keeping the old run's best.
    shutil.rmtree(workdir / "checkpoints")
    with pytest.raises(TrainConfigError, match="a run that left no checkpoint made with other"):
        train_and_evaluate(tiny_config(train_root, learning_rate=2e-3), workdir)
    assert (workdir / "metrics.jsonl").read_text() == metrics


def test_a_workdir_another_run_is_using_is_refused_and_left_as_it_is(
    train_root, uninterrupted, tmp_path
):
    """A run started again while the first still runs (twice by hand, or requeued by a
    scheduler) would overwrite its checkpoints and logs: it is refused before reading them."""
    import shutil

    from stam_jax.paths import LOCK_FILE
    from stam_jax.train import TrainConfigError, train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    before = files_in(workdir)
    with held_here(workdir) as in_use:
        with pytest.raises(TrainConfigError) as refused:
            train_and_evaluate(tiny_config(train_root), workdir)
        assert str(refused.value) == f"--workdir={workdir}{in_use}"
        assert files_in(workdir) == before
    assert not (workdir / LOCK_FILE.format(process=0)).exists()


def test_a_restart_compares_every_setting_that_changes_what_the_run_computes(train_root, tmp_path):
    from stam_jax.data.folder import list_videos
    from stam_jax.resume import check_same_run, write_run_record
    from stam_jax.train import TrainConfigError

    folder = list_videos(train_root)
    write_run_record(tiny_config(train_root), tmp_path, folder, "videos")
    changes = {
        "model": "stam_tiny_mean",
        "model_overrides.aggregate": "mean",
        "model_overrides.num_classes": 3,
        "model_overrides.num_frames": 8,
        "model_overrides.dropout_rate": 0.1,
        "model_overrides.drop_path_rate": 0.1,
        "model_overrides.temporal_dropout_rate": 0.2,
        "checkpoint": str(tmp_path / "init"),
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "batch_size": 2,
        "seed": 1,
        "data.class_list": str(tmp_path / "classes.txt"),
        "data.crop": 28,
        "data.frame_rate": 2.0,
        "data.resize": 40,
        "data.train_flip": False,
        "data.train_min_area": 0.5,
        "train.accumulate": 2,
        "train.cutmix_alpha": 1.0,
        "train.distill_temperature": 2.0,
        "train.distill_weight": 0.25,
        "train.ema_decay": 0.99,
        "train.freeze": "vit",
        "train.grad_clip": 0.5,
        "train.layer_decay": 0.75,
        "train.label_smoothing": 0.0,
        "train.loss_scale_initial": 1024.0,
        "train.loss_scale_period": 100,
        "train.mix_switch_prob": 0.25,
        "train.mixup_alpha": 0.8,
        "train.momentum": 0.5,
        "train.optimizer": "sgd",
        "train.teacher": str(tmp_path / "teacher"),
        "train.temporal_pos_embed_std": 1.0,
        "train.warmup_steps": 3,
        "train.weight_decay": 0.0,
    }
    for name, value in changes.items():
        config = tiny_config(train_root)
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        with pytest.raises(TrainConfigError, match=re.escape(f"Changed:\n  {name}: ")):
            check_same_run(config, tmp_path, 3, folder, "videos")
    # A record written before train.freeze and train.layer_decay existed: the run computed
    # with neither, so turning one on is a change (it was let through, to fail restoring the
    # optimizer state), and the defaults are none.
    record = json.loads((tmp_path / "run_config.json").read_text())
    del record["train.freeze"], record["train.layer_decay"]
    (tmp_path / "run_config.json").write_text(json.dumps(record))
    check_same_run(tiny_config(train_root), tmp_path, 3, folder, "videos")
    for name, value in (("freeze", "vit"), ("layer_decay", 0.75)):
        config = tiny_config(train_root)
        config.train[name] = value
        with pytest.raises(TrainConfigError, match=re.escape(f"Changed:\n  train.{name}: ")):
            check_same_run(config, tmp_path, 3, folder, "videos")
    # With no checkpoint, a record alone (a start refused midway) leaves nothing to mix with;
    # kept best params (an evaluation before the first logged step) do.
    config = tiny_config(train_root, learning_rate=2e-3)
    check_same_run(config, tmp_path, 0, folder, "videos")
    (tmp_path / "best.json").write_text("{}")
    with pytest.raises(TrainConfigError, match="a run that left no checkpoint made with other"):
        check_same_run(config, tmp_path, 0, folder, "videos")
    # The same videos read as a prepared dataset of them (or as JPEG frames of one) give other
    # clips: refused, naming where the run read its data, where it was let through as "the
    # training data moved" (its listing is the videos').
    (tmp_path / "best.json").unlink()
    write_run_record(tiny_config(train_root), tmp_path, folder, "videos")
    moved = tiny_config(tmp_path / "prepared")
    with pytest.raises(TrainConfigError) as refused:
        check_same_run(moved, tmp_path, 3, folder, "a prepared dataset (JPEG (quality 90))")
    assert (
        "  train.root_form: read as videos then, as a prepared dataset (JPEG (quality 90)) now "
        f"(other frames; the run read --config.train.root={train_root})\n"
    ) in str(refused.value)
    check_same_run(moved, tmp_path, 3, folder, "videos")  # moved, the same form: resumed
    # How the steps are executed may change: the same run to float rounding.
    for name, value in (("remat", True), ("triton_gemm", True), ("attention_impl", "xla")):
        config = tiny_config(train_root)
        config[name] = value
        check_same_run(config, tmp_path, 3, folder, "videos")


def test_any_saved_step_exports_as_a_checkpoint(uninterrupted, tmp_path, capsys):
    from stam_jax.export import main as export_main

    saved = sorted(
        int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert saved[-1] == 8 and len(saved) >= 2
    # The last step's params and EMA are the run's final ones, bit for bit.
    assert export_main([str(uninterrupted), str(tmp_path / "last")]) == 0
    assert export_main([str(uninterrupted), str(tmp_path / "ema"), "--ema"]) == 0
    final, final_ema = final_params(uninterrupted)
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "last")[1], final)
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "ema")[1], final_ema)
    last = str(uninterrupted / "checkpoints" / "8")
    assert checkpoints.read_config(tmp_path / "ema")["metadata"] == {
        "source": last,
        "step": 8,
        "params": "ema_params",
    }
    # A step midway, named by its folder: a checkpoint of the run's model, saying its source.
    midway = uninterrupted / "checkpoints" / str(saved[0])
    refused = re.escape(f"{midway} is a saved train state of the run in {uninterrupted}")
    with pytest.raises(checkpoints.CheckpointError, match=refused):
        checkpoints.load(midway)
    assert export_main([str(midway), str(tmp_path / "mid")]) == 0
    assert f"wrote {tmp_path / 'mid'}: the params of step {saved[0]}" in capsys.readouterr().out
    config = checkpoints.read_config(tmp_path / "mid")
    assert config["metadata"] == {"source": str(midway), "step": saved[0], "params": "params"}
    assert config["model"] == checkpoints.read_config(uninterrupted / "final")["model"]
    mid = checkpoints.load(tmp_path / "mid")[1]
    assert not np.array_equal(mid["head"]["kernel"], final["head"]["kernel"])
    # Refusals: one line each, nothing written.
    for args, message in [
        (
            [str(uninterrupted), str(tmp_path / "x"), "--step", "5"],
            f"has no saved step 5; it has {saved}",
        ),
        ([str(uninterrupted), str(tmp_path / "last")], "already exists"),
        (
            [str(midway), str(tmp_path / "x"), "--step", "8"],
            f"{midway} is step {saved[0]}, but --step=8; give one of them.",
        ),
        ([str(tmp_path), str(tmp_path / "x")], "has no run_config.json"),
    ]:
        assert export_main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_missing_run_and_a_record_that_is_not_settings(tmp_path, capsys):
    from stam_jax.export import main as export_main

    missing = tmp_path / "typo"
    assert export_main([str(missing), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: {missing} does not exist; pass the folder run_train.py wrote (its --workdir).\n"
    )
    (tmp_path / "video.mp4").write_bytes(b"")
    assert export_main([str(tmp_path / "video.mp4"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'video.mp4'} is a file, not a run directory; pass the folder "
        "run_train.py wrote (its --workdir).\n"
    )
    # An output among the run's saved steps would be taken for one: the run could not resume.
    inside = tmp_path / "checkpoints" / "99"
    assert export_main([str(tmp_path), str(inside)]) == 2
    assert capsys.readouterr().err == (
        f"error: {inside} is inside {tmp_path / 'checkpoints'}, where the run keeps its saved "
        "training steps: a checkpoint there would be taken for one (the run could no longer "
        f"resume); write it outside, e.g. {tmp_path / 'exported'}.\n"
    )
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "run_config.json").write_text("[1]\n")
    assert export_main([str(tmp_path), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot read the run's architecture from {tmp_path / 'run_config.json'}: it "
        "holds a list, not the run's settings (a JSON object, as run_train.py writes it); "
        "restore the file the run wrote.\n"
    )
    assert not (tmp_path / "x").exists()


def test_export_of_the_ema_of_a_run_that_kept_none_is_refused(uninterrupted, tmp_path, capsys):
    # With train.ema_decay=0 the train state's ema_params are a copy of the params and no
    # final_ema is written: --ema is refused rather than exporting the params as 'the EMA'.
    from stam_jax.export import main as export_main

    record = json.loads((uninterrupted / "run_config.json").read_text())
    assert record["train.ema_decay"] == 0.999
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({**record, "train.ema_decay": 0.0}))
    (run / "checkpoints").symlink_to(uninterrupted / "checkpoints")
    assert export_main([str(run), str(tmp_path / "ema"), "--ema"]) == 2
    assert capsys.readouterr().err == (
        f"error: {run} kept no EMA of its params (train.ema_decay=0 in its run_config.json), so "
        "there is none to export: drop --ema (ema=False from Python) to export the params.\n"
    )
    assert not (tmp_path / "ema").exists()
    # The architecture is the variant with the run's model overrides: a run recorded with
    # 3 classes does not hold these 10-class params.
    record["model_overrides.num_classes"] = 3
    (run / "run_config.json").write_text(json.dumps(record))
    assert export_main([str(run), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'checkpoints' / '8'} does not hold the run's model: " in err
    assert "param head/bias: shape (10,), this model's (3,)" in err
    assert f"\n{run / 'run_config.json'} does not describe this run's params: it was edited" in err
    assert not (tmp_path / "x").exists()


def test_export_takes_only_complete_steps_and_names_a_damaged_one(uninterrupted, tmp_path, capsys):
    from stam_jax.export import main as export_main

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", workdir / "checkpoints")
    shutil.copy(uninterrupted / "run_config.json", workdir)
    saved = workdir / "checkpoints"
    # A step folder without orbax's commit_success.txt (a save cut short) is not the last step.
    (saved / "9").mkdir()
    assert export_main([str(workdir), str(tmp_path / "last")]) == 0
    assert f"wrote {tmp_path / 'last'}: the params of step 8" in capsys.readouterr().out
    assert checkpoints.read_config(tmp_path / "last")["metadata"]["step"] == 8
    for args in ([str(workdir), "--step", "9"], [str(saved / "9")]):
        assert export_main([*args[:1], str(tmp_path / "x"), *args[1:]]) == 2
        assert capsys.readouterr().err == (
            f"error: {saved / '9'} is not a complete saved step (orbax did not mark it "
            "finished: a save cut short, or a folder made by other means); export another saved "
            "step with --step N, N one of [3, 6, 8].\n"
        )
    # A complete step whose files are damaged: one line naming it, without orbax's reports of
    # its abandoned reads ('Event loop is closed', up to 60 lines at exit), silenced as
    # checkpoints.read does. In a process of its own, as the command runs: the reports come
    # when the process ends.
    shutil.copytree(saved / "8", saved / "10")
    for chunk in (saved / "10" / "state").rglob("d/*"):
        os.truncate(chunk, chunk.stat().st_size // 2)
    script = (
        "import sys; from stam_jax import checkpoints; from stam_jax.export import main; "
        "code = main(sys.argv[1:]); "
        "print(sys.unraisablehook is checkpoints._quiet_closed_loop_reports); sys.exit(code)"
    )
    result = run([sys.executable, "-c", script, str(workdir), str(tmp_path / "x")])
    assert (result.returncode, result.stdout) == (2, "True\n"), result.stderr[-3000:]
    assert result.stderr.startswith(
        f"error: cannot read the params of step 10: {saved / '10'} is damaged or incompletely "
        "copied (ValueError: "
    )
    assert result.stderr.endswith(
        "; export another saved step with --step N, N one of [3, 6, 8].\n"
    )
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    # Saved by an orbax older than 0.12.8 (no commit_success.txt on a local disk): the commit
    # time in _CHECKPOINT_METADATA marks the save finished.
    (saved / "3" / "commit_success.txt").unlink(missing_ok=True)
    assert export_main([str(workdir), str(tmp_path / "three"), "--step", "3"]) == 0
    capsys.readouterr()
    # No complete step at all.
    for step in ("3", "6", "8", "10"):
        (saved / step / "commit_success.txt").unlink(missing_ok=True)
        (saved / step / "_CHECKPOINT_METADATA").unlink()
    assert export_main([str(workdir), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: {workdir} has no complete saved training step (no {saved}/N that orbax marked "
        f"finished; {saved}/N for N in [3, 6, 8, 9, 10] are unfinished): export once the run "
        "has saved one (every train.save_every steps).\n"
    )
    assert not (tmp_path / "x").exists()


def test_periodic_evaluation_names_a_skipped_video_once(tmp_path, capsys):
    from stam_jax.evaluate import NON_FINITE_REASON
    from stam_jax.train_eval import _eval_report

    counts = {"listed": 3, "evaluated": 2}
    broken = {"path": "a/broken.mp4", "reason": "failed: InvalidDataError"}
    nan = {"path": "b/x.mp4", "reason": NON_FINITE_REASON}
    named: set[str] = set()
    for step in (2, 4):
        _eval_report(
            step,
            {"top1": 0.5, "ema_top1": float("nan")},
            {"params": counts, "ema": {**counts, "evaluated": 0}},
            {"params": [broken] + [nan] * (step == 4), "ema": [broken, nan]},
            named,
            tmp_path / f"step_{step}",
            "params" if step == 2 else None,
            tmp_path / "best",
        )
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"eval at step {step}: top-1 50.00% (EMA n/a) on 2 of 3 videos (EMA on 0), 1 left out "
        f"(reasons in {tmp_path}/step_{step}/params_results/results.json)" + end
        for step, end in ((2, f"; new best (params) in {tmp_path / 'best'}"), (4, ""))
    ]
    # The decoding failure once; the NaN logits once per set that gave them, each named.
    assert err.splitlines() == [
        "  eval skipped a/broken.mp4: failed: InvalidDataError",
        f"  eval skipped b/x.mp4 (EMA): {NON_FINITE_REASON}",
        f"  eval skipped b/x.mp4 (params): {NON_FINITE_REASON}",
    ]


def test_a_prepared_run_resumes_only_with_its_process_and_worker_counts(monkeypatch, tmp_path):
    # Each process's grain position counts its own rows: under another process count it would
    # resume elsewhere in the data (2 -> 1) or fail with an IndexError (1 -> 2).
    from stam_jax.train import TrainConfigError, _data_position

    def position(rank: int, workers: int = 0) -> str:
        return json.dumps({"worker_count": workers, "last_seen_indices": {"0": rank}})

    two = [position(0), position(1)]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert _data_position(two, 0, tmp_path) == position(1).encode()
    with pytest.raises(TrainConfigError, match=r"--config.data.workers=0 \(the data position"):
        _data_position(two, 2, tmp_path)
    with pytest.raises(TrainConfigError, match=r"as 1 process\(es\), this one runs 2; resume wi"):
        _data_position([position(0)], 0, tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(TrainConfigError, match=r"--config.distributed.num_processes=2 \(the data"):
        _data_position(two, 0, tmp_path)


def test_processes_reading_the_same_data_at_other_paths_agree(train_root, tmp_path, monkeypatch):
    # The processes of one run may find the same data and checkpoints at other paths (other
    # hosts' mounts); what they hold is compared, by digest. The listing's settings used to
    # hold the path too, so the same videos under another root refused the run.
    from stam_jax import sharding
    from stam_jax.data.folder import list_videos
    from stam_jax.resume import process_settings

    moved = shutil.copytree(train_root, tmp_path / "elsewhere")
    settings = [
        process_settings(tiny_config(root), list_videos(root), "videos")
        for root in (train_root, moved)
    ]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "allgather_json", lambda mine: [mine, other])
    other = {"settings": settings[1], "refusal": None}
    assert sharding.processes_agree(settings[0]) is None
    (moved / "class_0" / "video_0.mp4").rename(moved / "class_1" / "video_9.mp4")
    other["settings"] = process_settings(tiny_config(moved), list_videos(moved), "videos")
    assert re.fullmatch(
        rf"the processes were started with different settings: --config.train.root's listing "
        rf"\(process 0: {train_root} \(10 classes, 10 videos, digest \w{{12}}\), process 1: "
        rf"{moved} \(10 classes, 10 videos, digest \w{{12}}\)\)\. Start every process .*",
        sharding.processes_agree(settings[0]),
    )


def test_processes_differing_in_when_they_save_evaluate_or_how_they_compile_are_refused(
    train_root, tmp_path, monkeypatch
):
    # A restart may change how often a run saves or evaluates, or how it compiles, but the
    # processes of one run may not differ in them: each decides when the collectives of a save
    # or an evaluation run, and what the compiled step exchanges (a different
    # --config.train.eval_every hung for ever, a different --config.frame_chunk aborted in
    # gloo). Only the settings of one host's own running may differ.
    from stam_jax import sharding
    from stam_jax.data.folder import list_videos
    from stam_jax.resume import process_settings

    folder = list_videos(train_root)
    mine = process_settings(tiny_config(train_root), folder, "videos")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "allgather_json", lambda me: [me, other])

    def theirs(**fields):
        config = tiny_config(train_root)
        for name, value in fields.items():
            section, _, field = name.rpartition("__")
            (config[section] if section else config)[field] = value
        return {"settings": process_settings(config, folder, "videos"), "refusal": None}

    for fields, named in [
        (dict(train__eval_every=5), r"--config\.train\.eval_every \(process 0: 0, process 1: 5\)"),
        (dict(train__save_every=4), r"--config\.train\.save_every \(process 0: 3, process 1: 4\)"),
        (dict(train__keep=1), r"--config\.train\.keep \(process 0: 3, process 1: 1\)"),
        (dict(frame_chunk=4), r"--config\.frame_chunk \(process 0: None, process 1: 4\)"),
        (dict(remat=True), r"--config\.remat \(process 0: False, process 1: True\)"),
        (dict(data__num_clips=2), r"--config\.data\.num_clips \(process 0: 1, process 1: 2\)"),
        (dict(eval__average="probs"), r"--config\.eval\.average \(process 0: logits, "),
    ]:
        other = theirs(**fields)
        assert re.match(
            rf"the processes were started with different settings: {named}",
            sharding.processes_agree(mine),
        ), fields
    # One host's own running: its id, its path to the coordinator, its workers, its cache,
    # its progress bar, how often process 0 logs, and data.root (not read in training).
    other = theirs(
        distributed__process_id=1,
        distributed__coordinator="10.0.0.1:1234",
        distributed__join_timeout=60,
        data__workers=3,
        data__prefetch=2,
        data__root="/elsewhere",
        progress=True,
        compilation_cache_dir="/tmp/cache",
        train__log_every=1,
    )
    assert sharding.processes_agree(mine) is None

    # The periodic evaluation's data and the teacher are compared by what they hold.
    moved = shutil.copytree(train_root, tmp_path / "val")
    config = tiny_config(train_root, eval_every=4, eval_root=str(train_root))
    mine = process_settings(config, folder, "videos", folder)
    config.train.eval_root = str(moved)
    other = {"settings": process_settings(config, folder, "videos", list_videos(moved))}
    other["refusal"] = None
    assert sharding.processes_agree(mine) is None
    (moved / "class_0" / "video_0.mp4").rename(moved / "class_1" / "video_9.mp4")
    other["settings"] = process_settings(config, folder, "videos", list_videos(moved))
    assert re.match(
        rf"the processes were started with different settings: --config\.train\.eval_root's "
        rf"listing \(process 0: {train_root} \(10 classes, 10 videos, digest \w{{12}}\), "
        rf"process 1: {moved} \(10 classes, 10 videos",
        sharding.processes_agree(mine),
    )
    teacher = {"head": {"kernel": np.ones((4, 10), np.float32)}}
    config = tiny_config(train_root, teacher="/host0/teacher")
    mine = process_settings(config, folder, "videos", teacher=teacher)
    config.train.teacher = "/host1/teacher"
    other["settings"] = process_settings(config, folder, "videos", teacher=teacher)
    assert sharding.processes_agree(mine) is None
    teacher = {"head": {"kernel": np.zeros((4, 10), np.float32)}}
    other["settings"] = process_settings(config, folder, "videos", teacher=teacher)
    assert re.match(
        r"the processes were started with different settings: --config\.train\.teacher's "
        r"params \(process 0: /host0/teacher \(checksum \w{8}\), process 1: /host1/teacher ",
        sharding.processes_agree(mine),
    )
    # A setting only another process holds is a difference, found alike in every process.
    other["settings"] = {**mine, "--config.new_field": 1}
    assert re.match(
        r"the processes were started with different settings: --config\.new_field "
        r"\(process 0: None, process 1: 1\)",
        sharding.processes_agree(mine),
    )


def test_processes_starting_from_other_params_are_refused(train_root, tmp_path, monkeypatch):
    # Each process reads --config.checkpoint itself and places its copy on its devices as the
    # replicated params: processes that read other contents (another file at the same path on
    # another host) would each train their own model. The initial params' checksums are
    # compared before anything is written, as evaluation compares the params it reads.
    from stam_jax import sharding, train
    from stam_jax.train import TrainConfigError, train_and_evaluate

    params = {"head": {"kernel": np.ones((4, 10), np.float32)}}  # what the run starts from
    monkeypatch.setattr(train, "_initial_params", lambda *_: (params, "report", ""))

    def gather(mine: dict) -> list[dict]:
        other = json.loads(json.dumps(mine))
        if mine["settings"] and "the initial params" in mine["settings"]:
            other["settings"]["the initial params"] = sharding.by_content(
                "/host1/ckpt (checksum 0badf00d)", "0badf00d"
            )
        return [mine, other]

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "allgather_json", gather)
    with pytest.raises(TrainConfigError) as refused:
        train_and_evaluate(tiny_config(train_root), tmp_path / "run")
    assert re.fullmatch(
        r"the processes were started with different settings: the initial params \(process 0: "
        rf"a fresh initialisation \(--config.seed=0\) \(checksum {sharding.tree_digest(params)}\), "
        r"process 1: /host1/ckpt "
        r"\(checksum 0badf00d\)\)\. Start every process with the same command, only "
        r"--config.distributed.process_id differing \(data and checkpoints may be at other "
        r"paths on other hosts, holding the same\)\.",
        str(refused.value),
    )
    assert not (tmp_path / "run").exists()


def test_a_refused_run_removes_the_new_workdir_another_of_its_processes_made(
    train_root, tmp_path, monkeypatch
):
    # Process 1 of a two-process run creates the shared new workdir while this process (0)
    # joins, and is refused: this process, leaving last, removes the workdir, though it found
    # it made when it came to claim it (it was left behind, empty).
    from stam_jax import sharding
    from stam_jax.train import TrainConfigError, train_and_evaluate

    workdir = tmp_path / "new" / "run"
    mesh = sharding.data_mesh

    def made_by_process_1() -> object:
        workdir.mkdir(parents=True)
        return mesh()

    monkeypatch.setattr(sharding, "data_mesh", made_by_process_1)
    monkeypatch.setattr(sharding, "processes_agree", lambda *_: "process 1 refused the run: x")
    with pytest.raises(TrainConfigError, match=r"^process 1 refused the run: x$"):
        train_and_evaluate(tiny_config(train_root), workdir)
    assert os.listdir(tmp_path) == []


def test_periodic_evaluation_scores_each_set_and_keeps_the_first_best(
    tmp_path, monkeypatch, capsys
):
    # evaluate and the checkpoint writer stubbed: the params score 0.5 then 0.75, their EMA
    # 0.75 then 0.5. Each top-1 is logged under its own set's name, and a tie is no new best.
    import stam_jax.evaluate
    from stam_jax import train_eval
    from stam_jax.train_step import TrainState

    scores = {2: {"params": 0.5, "ema": 0.75}, 4: {"params": 0.75, "ema": 0.5}}

    def evaluate(config, workdir, report, resumable, claim):
        assert not resumable and not claim  # the results folder is made only to write them
        step, name = int(Path(config.checkpoint).parent.name[5:]), Path(config.checkpoint).name
        counts = {"listed": 1, "evaluated": 1}
        top1 = scores[step][name]
        return {
            "counts": counts,
            "dropped": [],
            "failed": [],
            "non_finite": [],
            "metrics": {"top1": top1},
        }

    monkeypatch.setattr(stam_jax.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(
        train_eval.checkpoints, "save", lambda path, *a, **k: path.mkdir(parents=True)
    )
    config = tiny_config(tmp_path / "train", eval_root=str(tmp_path / "val"))
    state = TrainState(np.int32(0), {"w": np.zeros(1)}, None, {"w": np.ones(1)})
    for step in (2, 4):
        got = train_eval.periodic_eval(config, tmp_path, None, state, step, set())
        assert got == {"top1": scores[step]["params"], "ema_top1": scores[step]["ema"]}
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["step"], best["params"], best["top1"]) == (2, "ema", 0.75)
    assert "new best (ema)" in capsys.readouterr().out


def without_orbax_logs(stderr: str) -> str:
    """`stderr` without the lines orbax logs through absl, which a loaded machine adds (seen in
    a full run: "W1203 13:33:30.490916 140590861941632 checkpoint_manager.py:1466] Waiting for
    previous save to complete took 1.079117 seconds. ...")."""
    log = re.compile(r"[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
    return "".join(line for line in stderr.splitlines(True) if not log.match(line))


def test_decoding_processes_that_cannot_start_stop_training_with_one_line(
    train_root, cache, tmp_path
):
    """It ended with a traceback; now one `error:` line says why, what to do and what is kept,
    and the same command, once processes can start, resumes from the last checkpoint."""
    cmd = command(train_root, tmp_path, cache, "--config.data.workers=1")
    failed = run([*pools_refusing_after(20), *cmd[1:]])  # 20 clips decoded, then none
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert without_orbax_logs(failed.stderr) == (
        f"{NO_DECODING_PROCESSES}The checkpoints in {tmp_path}/checkpoints are kept; run the "
        "same command again to resume from the last one.\n"
    )
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    # Clips 1-20 made steps 1-5: the checkpoint of step 3 was kept, and no later one.
    assert again.stdout.splitlines()[-1].startswith(
        "trained to step 8 (resumed from step 3); final params in "
    ), again.stdout


def scripted_step(metrics_at):
    """A stand-in for `make_train_step`: a step that only counts, with `metrics_at(step)`'s
    metrics (the step it ends, traced) and the count of usable videos."""

    def make(*args):
        def step(state, videos, labels, weights, teacher_params=None):
            done = state.step + 1
            return state.replace(step=done), {"videos": weights.sum(), **metrics_at(done)}

        return step

    return make


def tensorboard_scalars(logdir: Path) -> dict[str, list[int]]:
    """The steps of each scalar's events as TensorBoard shows them: the files are read in name
    order, and a SessionLog START at step S (a resumed run's purge_step) hides the events of
    steps >= S read before it."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown: dict[str, list[int]] = {}
    for path in sorted(logdir.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length, crc, payload, crc
            length = int.from_bytes(data[at : at + 8], "little")
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {tag: [s for s in steps if s < event.step] for tag, steps in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append(event.step)
    return shown


def test_the_loop_logs_saves_and_evaluates_on_its_cadences_and_at_its_last_step(
    train_root, tmp_path, monkeypatch, capsys
):
    # 7 steps, none of the cadences dividing it: the last step is logged, evaluated and saved
    # all the same. Then a restart from the checkpoint of step 6 redoes step 7 only, and its
    # logs hold each step once, as an uninterrupted run's.
    import jax.numpy as jnp

    import stam_jax.train as train_module
    from stam_jax.export import saved_steps

    def metrics_at(step):
        return {"loss": step.astype(jnp.float32), "grad_norm": jnp.float32(1.0)}

    evaluated = []

    def periodic_eval(config, workdir, model, state, step, named):
        evaluated.append(step)
        return {"top1": step / 10, "ema_top1": math.nan}

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    monkeypatch.setattr(train_module, "periodic_eval", periodic_eval)
    monkeypatch.setattr(train_module, "check_eval_root", lambda *args: None)
    settings = dict(steps=7, save_every=3, log_every=3, eval_every=4)
    config = tiny_config(train_root, eval_root=str(tmp_path / "val"), **settings)
    workdir = tmp_path / "run"
    summary = train_module.train_and_evaluate(config, workdir)
    assert evaluated == [4, 7]
    assert (summary["step"], summary["resumed_from"], summary["last_metrics"]["step"]) == (7, 0, 7)
    assert summary["last_metrics"]["loss"] == 7.0
    assert summary["final"] == str(workdir / "final") and summary["final_ema"] == str(
        workdir / "final_ema"
    )
    rows = [json.loads(row) for row in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [(3, True), (4, False), (6, True), (7, True), (7, False)]  # (step, a train row)
    assert [(row["step"], "loss" in row) for row in rows] == logged
    assert rows[-1] == {"step": 7, "top1": 0.7, "ema_top1": None}
    train_row = {"step", "loss", "grad_norm", "steps_per_s", "videos_per_s", "failed_videos"}
    assert all(set(row) == train_row for row in rows if "loss" in row)
    assert sorted(saved_steps(workdir / "checkpoints")[0]) == [3, 6, 7]
    shown = tensorboard_scalars(workdir / "tensorboard")
    assert shown["train/loss"] == [3, 6, 7] and shown["eval/top1"] == [4, 7]
    assert "eval/ema_top1" not in shown  # no finite score
    shutil.rmtree(workdir / "checkpoints" / "7")  # as if killed before saving step 7
    config.progress = True
    capsys.readouterr()
    summary = train_module.train_and_evaluate(config, workdir)
    bar = capsys.readouterr().err
    assert "| 6/7 [" in bar and "| 7/7 [" in bar  # the bar starts at the step resumed from
    assert (summary["step"], summary["resumed_from"]) == (7, 6) and evaluated == [4, 7, 7]
    rows = [json.loads(row) for row in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], "loss" in row) for row in rows] == logged
    # TensorBoard too shows each step once: step 6, logged before the restart, is kept.
    shown = tensorboard_scalars(workdir / "tensorboard")
    assert shown["train/loss"] == [3, 6, 7] and shown["eval/top1"] == [4, 7]
    # Without an EMA (train.ema_decay=0) no final_ema is written.
    config = tiny_config(train_root, steps=1, warmup_steps=0, ema_decay=0.0)
    summary = train_module.train_and_evaluate(config, tmp_path / "no_ema")
    assert "final_ema" not in summary and not (tmp_path / "no_ema" / "final_ema").exists()
    assert (tmp_path / "no_ema" / "final").is_dir()


def test_a_non_finite_gradient_stops_the_run_though_the_loss_is_finite(
    train_root, tmp_path, monkeypatch
):
    import jax.numpy as jnp

    import stam_jax.train as train_module

    def metrics_at(step):
        return {"loss": jnp.float32(2.5), "grad_norm": jnp.where(step == 4, jnp.inf, 1.0)}

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    with pytest.raises(train_module.NonFiniteError) as stopped:
        train_module.train_and_evaluate(tiny_config(train_root), tmp_path)
    assert str(stopped.value) == (
        "step 4: loss 2.5, gradient norm inf; stopped before saving, checkpoints up to step 3 "
        "intact. Lower --config.train.learning_rate, in a new --workdir (a restart in this one "
        "must keep its settings)."
    )


def test_float16_steps_skipped_are_counted_and_the_run_stops_at_loss_scale_1(
    train_root, tmp_path, monkeypatch, capsys
):
    # The loss scale as the step reports it: step 2 skipped at scale 4, step 5 at scale 2,
    # step 6 at scale 1 (nothing left to lower: the run stops).
    import jax.numpy as jnp

    import stam_jax.train as train_module

    def metrics_at(step):
        skipped = (step == 2) | (step >= 5)
        scale = jnp.where(step < 5, 4.0, jnp.where(step == 5, 2.0, 1.0))
        return {
            "loss": jnp.float32(1.0),
            "grad_norm": jnp.where(skipped, jnp.inf, 1.0),
            "skipped": skipped.astype(jnp.float32),
            "loss_scale": scale.astype(jnp.float32),
        }

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    config = tiny_config(train_root)
    config.dtype = "float16"
    with pytest.raises(train_module.NonFiniteError) as stopped:
        train_module.train_and_evaluate(config, tmp_path)
    assert str(stopped.value) == (
        "step 6: gradients not finite even at float16 loss scale 1; checkpoints up to step 3 "
        "intact. Use --config.dtype=bfloat16, in a new --workdir (a restart in this one must "
        "keep its settings)."
    )
    rows = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["skipped_steps"]) for row in rows] == [(2, 1), (4, 1)]
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "step skipped" in line] == [
        f"step {step}: float16 gradients not finite at loss scale {scale}; step skipped (params "
        "unchanged), scale halved"
        for step, scale in ((2, 4), (5, 2), (6, 1))
    ]


def test_the_stop_rule_for_unusable_videos_counts_from_32_and_needs_more_than_half(tmp_path):
    from stam_jax.train import UnusableDataError, _Unusable

    unusable = _Unusable(tmp_path, start=0)
    unusable.check(1, 31, 0.0, "videos")  # all failed, but fewer than 32 seen
    unusable = _Unusable(tmp_path, start=0)
    unusable.check(1, 16, 0.0, "videos")
    unusable.check(2, 16, 16.0, "videos")  # 16 of 32: half, not more
    assert unusable.failed == 16
    with pytest.raises(UnusableDataError, match=r"^step 3: 17 of the 33 training videos of st"):
        unusable.check(3, 1, 0.0, "videos")
    unusable = _Unusable(tmp_path, start=0)
    with pytest.raises(UnusableDataError, match=r"^step 1: 17 of the 32 training videos of st"):
        unusable.check(1, 32, 15.0, "videos")  # more than half of 32: stopped at 32 already


def test_a_root_of_fewer_videos_than_one_batch_is_refused_and_one_batch_is_enough(
    train_root, tmp_path, monkeypatch
):
    import stam_jax.train as train_module
    from stam_jax.train import TrainConfigError, train_and_evaluate

    config = tiny_config(train_root)
    config.batch_size = 11
    with pytest.raises(TrainConfigError) as refused:
        train_and_evaluate(config, tmp_path / "run")
    assert str(refused.value) == (
        f"--config.train.root={train_root} has 10 videos, fewer than one batch "
        "(--config.batch_size=11); lower the batch size or add videos."
    )

    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached

    monkeypatch.setattr(train_module, "_teacher_model", reached)  # the next check
    config.batch_size = 10
    with pytest.raises(Reached):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sigterm_during_a_periodic_evaluation_saves_that_step_once_it_ends(
    train_root, tmp_path, monkeypatch
):
    # Told to end (SIGTERM) while step 4 is evaluated: the evaluation ends, then step 4 (not
    # a log_every step) is logged and saved and the run ends there; it went on to step 5.
    import jax.numpy as jnp

    import stam_jax.train as train_module
    from stam_jax.export import saved_steps

    def metrics_at(step):
        return {"loss": step.astype(jnp.float32), "grad_norm": jnp.float32(1.0)}

    evaluated = []

    def periodic_eval(config, workdir, model, state, step, named):
        evaluated.append(step)
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the run's handler, acted on later
        return {"top1": 0.5}

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    monkeypatch.setattr(train_module, "periodic_eval", periodic_eval)
    monkeypatch.setattr(train_module, "check_eval_root", lambda *args: None)
    before = signal.getsignal(signal.SIGTERM)
    settings = dict(steps=8, save_every=3, log_every=3, eval_every=4)
    config = tiny_config(train_root, eval_root=str(tmp_path / "val"), **settings)
    workdir = tmp_path / "run"
    summary = train_module.train_and_evaluate(config, workdir)
    assert (summary["step"], summary["terminated"], evaluated) == (4, "SIGTERM", [4])
    assert "final" not in summary and not (workdir / "final").exists()
    assert sorted(saved_steps(workdir / "checkpoints")[0]) == [1, 3, 4]  # orbax saves step 1
    rows = [json.loads(row) for row in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], "loss" in row) for row in rows] == [(3, True), (4, False), (4, True)]
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it


def test_an_eval_root_without_periodic_evaluation_is_warned_of(train_root, tmp_path, capsys):
    from stam_jax.train import TrainConfigError, train_and_evaluate

    config = tiny_config(train_root, eval_every=0, eval_root=str(tmp_path / "val"))
    config.batch_size = 11  # refused just after: nothing is computed
    with pytest.raises(TrainConfigError, match="fewer than one batch"):
        train_and_evaluate(config, tmp_path / "run")
    assert capsys.readouterr().err == (
        f"warning: --config.train.eval_root={tmp_path / 'val'} is not used: periodic evaluation "
        "is off (train.eval_every=0); set --config.train.eval_every=N to evaluate every N steps.\n"
    )


def test_the_progress_bar_starts_at_the_step_resumed_from_on_stderr(capsys):
    from stam_jax.progress import progress_bar

    bar = progress_bar(10, "train", "step", True, initial=4)
    assert (bar.n, bar.total) == (4, 10)
    bar.update(1)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and "train:  50%" in err and "5/10" in err
    silent = progress_bar(10, "train", "step", False, initial=4)
    silent.update(1)
    silent.close()
    assert capsys.readouterr() == ("", "")


def test_a_teacher_of_other_frames_or_frame_size_and_a_seed_given_as_true_are_refused(
    train_root, tmp_path
):
    from stam_jax.train import TrainConfigError, train_and_evaluate

    for name, value, shape in (("num_frames", 8, (1, 8, 32, 32, 3)), ("image_size", 64, None)):
        other = create_model("stam_tiny", **{name: value})
        video = np.zeros(shape or (1, 4, 64, 64, 3), np.uint8)
        shapes = jax.eval_shape(other.init, jax.random.key(0), video)["params"]
        teacher = tmp_path / f"teacher_{name}"
        checkpoints.save(teacher, other, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
        with pytest.raises(TrainConfigError) as refused:
            train_and_evaluate(tiny_config(train_root, teacher=str(teacher)), tmp_path / "run")
        student = {"num_frames": 4, "image_size": 32}[name]
        assert str(refused.value).startswith(
            f"--config.train.teacher={teacher} has {name}={value}, the student {student}: "
        )
    config = tiny_config(train_root)
    config.seed = True  # a config file's `True` is 1 to Python: refused, not taken as seed 1
    with pytest.raises(TrainConfigError) as refused:
        train_and_evaluate(config, tmp_path / "run")
    assert str(refused.value) == "--config.seed=True: use a whole number in [0, 2**32), e.g. 0."
    assert not (tmp_path / "run").exists()


def test_the_training_rate_leaves_out_evaluation_time_whatever_the_cadences(
    train_root, tmp_path, monkeypatch
):
    # A clock of the test's own: each step takes 1 s, each evaluation 100 s. Evaluating every
    # 2 steps and logging every 3, the rate at step 3 counted steps 1-3 over step 3's time
    # alone (the clock was restarted after the evaluation at step 2): 3 steps/s, not 1.
    from types import SimpleNamespace

    import jax.numpy as jnp

    import stam_jax.train as train_module

    now = [0.0]

    def step_begins(step: int) -> None:
        now[0] += 1.0

    def periodic_eval(config, workdir, model, state, step, named):
        now[0] += 100.0
        return {"top1": 0.5, "ema_top1": 0.5}

    def metrics_at(step):
        return {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    monkeypatch.setattr(train_module, "_fail_hook", step_begins)
    monkeypatch.setattr(train_module, "periodic_eval", periodic_eval)
    monkeypatch.setattr(train_module, "check_eval_root", lambda *args: None)
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    config = tiny_config(train_root, steps=7, log_every=3, eval_every=2, eval_root="val")
    train_module.train_and_evaluate(config, tmp_path)
    rows = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [
        (row["step"], row["steps_per_s"], row["videos_per_s"]) for row in rows if "loss" in row
    ]
    assert rates == [(3, 1.0, 4.0), (6, 1.0, 4.0), (7, 1.0, 4.0)]


def test_a_run_with_a_frozen_vit_resumes_exactly_and_keeps_the_vit(train_root, tmp_path):
    # The optimizer state then holds nothing for the frozen params (optax.MaskedNode in its
    # tree): orbax must save and restore it as it is. Layer decay rides along.
    import flax

    from stam_jax.train import train_and_evaluate
    from stam_jax.train_step import frozen_paths

    config = tiny_config(train_root, freeze="vit", layer_decay=0.5, accumulate=2)
    config.train.update(steps=4, save_every=2, warmup_steps=0)
    init = tmp_path / "init"
    checkpoints.save(init, create_model("stam_tiny"), init_params(4))
    config.checkpoint = str(init)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(config, straight)
    shutil.copytree(straight, resumed)
    for name in ("final", "final_ema"):
        shutil.rmtree(resumed / name)
    for saved in (resumed / "checkpoints").iterdir():
        if saved.name != "2":
            shutil.rmtree(saved)
    result = train_and_evaluate(config, resumed)
    assert result["resumed_from"] == 2
    # The report says what is frozen, after where each tensor came from and before the list.
    assert (
        "\ntrain.freeze='vit': 30 of 60 tensors held fixed (0.02M of 0.04M params), in "
        "blocks_0, blocks_1, cls_token, norm, patch_embed, pos_embed\n\nevery tensor, by name:\n"
    ) in (straight / "init_report.txt").read_text()
    frozen = frozen_paths(config.train, init_params(4))
    for which in (0, 1):  # the params, then their EMA
        ended = flax.traverse_util.flatten_dict(final_params(straight)[which])
        again = flax.traverse_util.flatten_dict(final_params(resumed)[which])
        start = flax.traverse_util.flatten_dict(init_params(4))
        for path, value in ended.items():
            np.testing.assert_array_equal(again[path], value, err_msg=str(path))
            if path in frozen:
                np.testing.assert_array_equal(value, start[path], err_msg=str(path))
            else:
                assert not np.array_equal(value, start[path]), path


def test_freezing_tensors_no_checkpoint_gave_is_warned_of(train_root, tmp_path):
    # A head re-initialised for another class count, or no checkpoint at all: frozen, those
    # tensors would keep their random values, which the start's report says.
    from stam_jax.train import _initial_params

    model = create_model("stam_tiny")
    video = np.zeros((1, 4, 32, 32, 3), np.uint8)
    three = create_model("stam_tiny", num_classes=3)
    checkpoints.save(tmp_path / "init", three, three.init(jax.random.key(0), video)["params"])
    config = tiny_config(train_root, freeze="vit,head")
    config.checkpoint = str(tmp_path / "init")
    report = _initial_params(model, config, video)[1].splitlines()
    assert report[-2].startswith("train.freeze='vit,head': 32 of 60 tensors held fixed (")
    assert report[-1] == (
        "warning: train.freeze holds 2 tensors that no checkpoint gave (head/bias, head/kernel): "
        "they stay at their random initial values"
    )
    config.checkpoint = ""
    report = _initial_params(model, config, video)[1].splitlines()
    assert report[-1] == (
        "warning: train.freeze holds 32 tensors that no checkpoint gave (blocks_0/attn/proj/bias, "
        "blocks_0/attn/proj/kernel, blocks_0/attn/qkv/bias and 29 more): they stay at their "
        "random initial values"
    )
    config.train.freeze = "vit"  # the ViT copied: nothing to warn of
    config.checkpoint = str(tmp_path / "init")
    assert not any(
        "warning" in line for line in _initial_params(model, config, video)[1].split("\n")
    )


def test_tensorboard_events_are_on_disk_before_a_save_in_files_of_their_own(tmp_path):
    # tensorboardX's flush() left the events its thread had not taken yet (it takes them
    # within 120 s): a kill after the next save lost them for good. Closed before each save,
    # and the next event opens a new file, which one made in the same second no longer
    # overwrites (the file name held only the second).
    from stam_jax.train import _Board

    board = _Board(tmp_path, purge_step=1)
    for step in (3, 6, 9):
        board.add("train/loss", float(step), step)
        board.close()
        assert tensorboard_scalars(tmp_path)["train/loss"][-1] == step  # on disk, now
    assert len(list(tmp_path.iterdir())) == 3
    # A run started again hides the earlier start's events from its purge step on.
    again = _Board(tmp_path, purge_step=4)
    again.add("train/loss", 6.5, 6)
    again.close()
    assert tensorboard_scalars(tmp_path) == {"train/loss": [3, 6]}


def test_a_row_cut_off_as_it_was_written_does_not_stop_a_resume(tmp_path, capsys):
    # A kill or a full disk mid-write left a last line that is no JSON: every resume of the
    # run failed on it with a traceback.
    from stam_jax.resume import truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 2}\n{"step": 4}\nnot json\n{"step": 6}\n{"step": 8, "loss": 1.')
    assert truncate_log(log, 6) == ['{"step": 2}', '{"step": 4}', '{"step": 6}']
    assert log.read_text() == '{"step": 2}\n{"step": 4}\n{"step": 6}\n'
    assert capsys.readouterr().err == f"warning: {log} line 3 is not a JSON object; dropped.\n"
