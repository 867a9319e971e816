"""Evaluation end to end: official protocol, data parallelism, multi-process, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import (
    NO_DECODING_PROCESSES,
    TINY_CONFIGS,
    child_pids,
    files_in,
    free_port,
    held_here,
    pools_refusing_after,
    random_params,
    run_processes,
    xla_flags,
)

from configs.tiny import get_config
from stam_jax import checkpoints, create_model
from stam_jax.data.synthetic import index_frame, write_video
from stam_jax.data.video import ClipSpec, load_views
from stam_jax.evaluate import EvalConfigError, evaluate, feature_width
from stam_jax.partial import PARTIAL, Journal, PartialError, kept_count, read_kept, remove

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_CONFIGS["tiny"]
SPEC = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32)


def make_folder(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """10 classes of short real videos at assorted frame rates and sizes."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        for j in range(per_class):
            fps = [8, 12, 10, 15][(c + j) % 4]
            h, w = [(48, 64), (64, 48), (40, 72)][(c * 3 + j) % 3]
            n = int(fps * 1.5) + int(rng.integers(0, 6))
            sub = "nested/" if (c, j) == (4, 1) else ""
            write_video(
                root / f"class_{c}" / f"{sub}video_{j}.{['mp4', 'avi'][j % 2]}",
                (index_frame(i, h, w, seed=c * 10 + j) for i in range(n)),
                fps,
            )
    return root


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    params = random_params(TINY, seed=4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoints.save(path, create_model("stam_tiny"), params)
    return path, params


def config_for(ckpt, root, **overrides):
    config = get_config()
    config.checkpoint, config.data.root = str(ckpt), str(root)
    config.data.workers, config.progress = 0, False
    config.compilation_cache_dir = ""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_predictions(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]


def direct_logits(root: Path, path: str, params, spec=SPEC, dtype="float32") -> np.ndarray:
    views = load_views(root / path, spec)
    logits = create_model("stam_tiny", dtype=dtype).apply({"params": params}, views)
    return np.asarray(logits).mean(axis=0)


def direct_features(root: Path, path: str, params, spec=SPEC) -> tuple[np.ndarray, np.ndarray]:
    """The model's video features (views, D) and frame features (views, T, D) of a video."""
    views = load_views(root / path, spec)
    _, state = create_model("stam_tiny").apply({"params": params}, views, mutable="intermediates")
    found = state["intermediates"]
    return np.asarray(found["video_features"][0]), np.asarray(found["frame_features"][0])


def read_features(workdir: Path, predictions: list[dict], params) -> dict[str, np.ndarray]:
    """`features.npz`, checked: the videos of `predictions`, in order, each video feature
    giving its logits through the head."""
    with np.load(workdir / "features.npz", allow_pickle=False) as f:
        arrays = dict(f)
    assert arrays["path"].tolist() == [p["path"] for p in predictions]
    assert arrays["label"].tolist() == [p["label"] for p in predictions]
    assert arrays["video"].dtype == np.float32
    head = params["head"]
    np.testing.assert_allclose(
        arrays["video"] @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
        [p["logits"] for p in predictions],
        rtol=1e-5,
        atol=1e-5,
    )
    return arrays


@pytest.fixture(scope="module")
def reference_run(video_root, tiny_ckpt, tmp_path_factory):
    """One in-process single-device run that other tests compare against."""
    workdir = tmp_path_factory.mktemp("reference")
    results = evaluate(config_for(tiny_ckpt[0], video_root, batch_size=3), workdir)
    return results, read_predictions(workdir)


def test_cli_end_to_end(video_root, tiny_ckpt, tmp_path, reference_run):
    cmd = [
        sys.executable,
        "run_eval.py",
        "--config",
        "configs/tiny.py",
        f"--config.checkpoint={tiny_ckpt[0]}",
        f"--config.data.root={video_root}",
        "--config.batch_size=4",
        "--config.data.workers=2",  # worker processes, against the in-process reference
        f"--config.compilation_cache_dir={tmp_path / 'xla_cache'}",
        f"--workdir={tmp_path}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "videos/s" in result.stdout
    assert "eval: 100%" in result.stderr  # the progress bar ran to the end
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["counts"] == {
        "listed": 20,
        "evaluated": 20,
        "dropped_too_short": 0,
        "failed": 0,
        "non_finite": 0,
        "resumed": 0,
    }
    assert results["timing"]["compile_s"] > 0 and results["timing"]["videos_per_s"] > 0
    assert any((tmp_path / "xla_cache").iterdir())  # the compiled forward was cached
    predictions = read_predictions(tmp_path)
    # Official order: classes sorted, then files sorted, nested folders included.
    assert [p["path"] for p in predictions][:4] == [
        "class_0/video_0.mp4",
        "class_0/video_1.avi",
        "class_1/video_0.mp4",
        "class_1/video_1.avi",
    ]
    assert "class_4/nested/video_1.avi" in [p["path"] for p in predictions]
    assert [p["label"] for p in predictions] == [i // 2 for i in range(20)]
    for got, want in zip(predictions, reference_run[1], strict=True):
        assert got["path"] == want["path"] and got["top5"] == want["top5"]
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)


def test_logits_are_the_models_on_the_official_inputs(video_root, tiny_ckpt, reference_run):
    results, predictions = reference_run
    params = tiny_ckpt[1]
    for p in predictions:
        want = direct_logits(video_root, p["path"], params)
        np.testing.assert_allclose(p["logits"], want, rtol=1e-5, atol=1e-5)
        assert p["top5"] == np.argsort(-want, kind="stable")[:5].tolist()
    labels = np.array([p["label"] for p in predictions])
    top1 = np.mean([p["top5"][0] == p["label"] for p in predictions])
    assert results["metrics"]["top1"] == pytest.approx(top1)
    per_class = [
        np.mean([p["top5"][0] == c for p in predictions if p["label"] == c]) for c in range(10)
    ]
    assert results["metrics"]["mean_class_accuracy"] == pytest.approx(np.mean(per_class))
    assert results["metrics"]["top5"] == pytest.approx(
        np.mean([p["label"] in p["top5"] for p in predictions])
    )
    assert labels.size == 20


def run_subprocess(args, env=None, timeout=300):
    return subprocess.Popen(
        [sys.executable, "run_eval.py", "--config", "configs/tiny.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_eight_devices_match_one(video_root, tiny_ckpt, tmp_path, reference_run):
    # 20 videos in global batches of 8 over 8 simulated devices: the last batch is padded; the
    # ViT runs in 4 steps of 8 frames (one per device).
    proc = run_subprocess(
        [
            f"--config.checkpoint={tiny_ckpt[0]}",
            f"--config.data.root={video_root}",
            "--config.batch_size=8",
            "--config.frame_chunk=8",
            "--config.data.workers=0",
            "--config.eval.features=frames",
            f"--workdir={tmp_path}",
        ],
        env={"XLA_FLAGS": xla_flags(8)},
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["devices"] == 8 and results["counts"]["evaluated"] == 20
    predictions = read_predictions(tmp_path)
    for got, want in zip(predictions, reference_run[1], strict=True):
        assert got["path"] == want["path"] and got["top5"] == want["top5"]
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    assert results["metrics"] == pytest.approx(reference_run[0]["metrics"])
    # The features of the sharded batches (each device's rows) are each video's own.
    features = read_features(tmp_path, predictions, tiny_ckpt[1])
    assert features["frames"].shape == (20, 1, 4, TINY["hidden_size"])
    for i in (0, 13):  # in the first and the last (padded) batch
        video, frames = direct_features(video_root, predictions[i]["path"], tiny_ckpt[1])
        np.testing.assert_allclose(features["video"][i], video[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features["frames"][i], frames, rtol=1e-5, atol=1e-5)


def keep(
    workdir: Path,
    k: int,
    config,
    positions: list[int],
    logits: np.ndarray,
    skipped=None,
    features: np.ndarray | None = None,
) -> None:
    """Keeps `positions`' `logits` (and `features`), and the videos `skipped`, in `workdir` as
    process k of an interrupted run of `config` (on a video folder) would have."""
    import stam_jax.evaluate as evaluate_module
    from stam_jax.data.prepared import list_root
    from stam_jax.sharding import tree_digest

    folder = list_root(config.data.root, "eval", SPEC, None)[0]
    params = checkpoints.read_params(config.checkpoint, create_model("stam_tiny"))
    settings = evaluate_module._settings(
        config,
        folder,
        None,
        tree_digest(params),
        checkpoints.read_config(config.checkpoint)["model"],
        evaluate_module._NOT_IN_RESULTS,
    )
    logits = np.asarray(logits, np.float32)
    width = 0 if features is None else features.shape[1]
    journal = Journal(workdir / PARTIAL, k, 10, lambda: settings, width)
    journal.add(np.array(positions), logits, logits, skipped or {}, features)


def test_two_processes_match_one(video_root, tiny_ckpt, tmp_path, reference_run):
    # Each process's workdir (a host's own disk) keeps results of an interrupted run, two with
    # one process (p0, videos 0-7, and the last one as failed) then two (p1, videos 4-11):
    # videos 4-7 are kept twice and count once. The 7 videos left make shares of 4 and 3. The
    # run exports video features: those kept are stand-ins (the video's position in each value).
    config = config_for(tiny_ckpt[0], video_root, **{"eval.features": "video"})
    logits = [p["logits"] for p in reference_run[1]]
    failed = {19: {"status": "failed", "reason": "kept by process 0"}}
    width = feature_width(create_model("stam_tiny"), 1, "video")
    stand_ins = np.repeat(np.arange(20, dtype=np.float32)[:, None], width, axis=1)
    keep(tmp_path / "0", 0, config, list(range(8)), logits[:8], failed, stand_ins[:8])
    keep(tmp_path / "1", 1, config, list(range(4, 12)), logits[4:12], None, stand_ins[4:12])
    port = free_port()
    procs = [
        run_subprocess(
            [
                f"--config.checkpoint={tiny_ckpt[0]}",
                f"--config.data.root={video_root}",
                "--config.batch_size=6",
                "--config.data.workers=0",
                f"--config.distributed.coordinator=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={rank}",
                "--config.eval.features=video",
                f"--workdir={tmp_path / str(rank)}",
            ],
            env={"XLA_FLAGS": xla_flags(3)},
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 3, err  # finished; a video was skipped
    assert not (tmp_path / "1" / "results.json").exists()  # only process 0 writes
    results = json.loads((tmp_path / "0" / "results.json").read_text())
    assert results["processes"] == 2 and results["devices"] == 6
    assert results["counts"]["evaluated"] == 19 and results["counts"]["resumed"] == 13
    assert results["failed"] == [
        {"path": "class_9/video_1.avi", "label": 9, "reason": "kept by process 0"}
    ]
    predictions = read_predictions(tmp_path / "0")
    for got, want in zip(predictions, reference_run[1][:19], strict=True):
        assert got["path"] == want["path"] and got["top5"] == want["top5"]
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    # Gathered from both processes, the kept ones' stand-ins with them, in the videos' order.
    with np.load(tmp_path / "0" / "features.npz") as f:
        paths, video = f["path"].tolist(), f["video"]
    assert paths == [p["path"] for p in predictions]
    np.testing.assert_array_equal(video[:12], stand_ins[:12])
    got = video[12:] @ np.asarray(tiny_ckpt[1]["head"]["kernel"]) + tiny_ckpt[1]["head"]["bias"]
    np.testing.assert_allclose(got, logits[12:19], rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "1" / "features.npz").exists()


def test_processes_with_other_data_are_refused(video_root, tiny_ckpt, tmp_path):
    # Process 1 lists another folder (a class missing, its labels kept by a class list): each
    # process would evaluate its share of other videos, and process 0 write them under its own
    # paths. Both refuse, naming each process's listing, before anything is written.
    other = tmp_path / "other"
    shutil.copytree(video_root, other, ignore=shutil.ignore_patterns("class_9"))
    (tmp_path / "classes.txt").write_text("".join(f"class_{c}\n" for c in range(10)))
    port = free_port()
    commands = [
        [
            sys.executable,
            "run_eval.py",
            "--config=configs/tiny.py",
            f"--config.checkpoint={tiny_ckpt[0]}",
            f"--config.data.root={root}",
            f"--config.data.class_list={tmp_path / 'classes.txt'}",
            "--config.batch_size=2",
            "--config.data.workers=0",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={rank}",
            f"--workdir={tmp_path / 'out'}",
        ]
        for rank, root in enumerate([video_root, other])
    ]
    for returncode, _, err in run_processes(commands, devices_each=1, timeout=60):
        assert returncode == 2, err
        assert re.search(
            rf"error: the processes were started with different settings: --config.data.root's "
            rf"listing \(process 0: {video_root} \(10 classes, 20 videos, digest \w+\) with "
            rf".*classes.txt, process 1: {other} \(10 classes, 18 videos, ",
            err,
        ), err
    assert not (tmp_path / "out").exists()


# Process 0 reads its checkpoint 3 s late, so process 1 creates the workdir, and leaves 2 s late.
_SLOW_PROCESS_0 = """
import runpy, sys, time
from stam_jax import checkpoints, sharding
if '--config.distributed.process_id=0' in sys.argv:
    read, agree = checkpoints.read_params, sharding.processes_agree
    checkpoints.read_params = lambda *a, **k: (time.sleep(3), read(*a, **k))[1]
    sharding.processes_agree = lambda *a, **k: (agree(*a, **k), time.sleep(2))[0]
runpy.run_path('run_eval.py', run_name='__main__')
"""


def test_processes_that_do_not_all_join_end_with_one_line_saying_what_to_check(
    tiny_ckpt, video_root, tmp_path
):
    # jax ended a process still waiting for the others after 300 s with a fatal log and a C++
    # stack trace. Process 0 waits for process 1, and process 1 for a process 0 that is not
    # there (another port): each ends after join_timeout with one line, exit status 5, and
    # nothing written.
    ports = [free_port(), free_port()]
    procs = [
        run_subprocess(
            [
                f"--config.checkpoint={tiny_ckpt[0]}",
                f"--config.data.root={video_root}",
                f"--config.distributed.coordinator=localhost:{ports[rank]}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={rank}",
                "--config.distributed.join_timeout=2",
                f"--workdir={tmp_path / str(rank)}",
            ]
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    check = (
        r"Start every process with the same --config.distributed.coordinator and "
        r"num_processes=2, each with its own process_id from 0 to 1; where they start at "
        r"different times \(a scheduler's queue\), raise join_timeout\.$"
    )
    waited = "within --config.distributed.join_timeout=2 s"
    assert procs[0].returncode == 5, outputs[0][1]
    assert re.fullmatch(
        rf"error: not every one of the 2 processes joined {waited} \(this is process 0, "
        rf"listening at localhost:{ports[0]}\)\. {check}",
        outputs[0][1].strip(),
    ), outputs[0][1]
    assert procs[1].returncode == 5, outputs[1][1]
    assert re.fullmatch(
        rf"error: process 1 could not join the run at localhost:{ports[1]} {waited}: process 0 "
        r"is not listening there \(not started, another host or port, a firewall\), or not "
        rf"every one of the 2 processes has started\. {check}",
        outputs[1][1].strip(),
    ), outputs[1][1]
    assert not any(tmp_path.iterdir())
    # A Ctrl-C while process 0 waits (its main thread in jax's C++ join, where Python's handler
    # cannot run) ends it at once.
    port = free_port()
    proc = run_subprocess(
        [
            f"--config.checkpoint={tiny_ckpt[0]}",
            f"--config.data.root={video_root}",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            "--config.distributed.join_timeout=100",
            f"--workdir={tmp_path / 'w'}",
        ]
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # waiting once its coordination service listens
        with socket.socket() as probe:
            if probe.connect_ex(("localhost", port)) == 0:
                break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith(
        "interrupted: while waiting for the other processes to join; nothing was written."
    ), err
    assert time.monotonic() - sent < 10
    assert not any(tmp_path.iterdir())


def test_a_refused_multi_process_run_removes_the_workdir_whichever_process_made_it(
    video_root, tiny_ckpt, tmp_path
):
    """The processes of one run share a new workdir: each removes it when refused, not only the
    one that made it, which left it behind (empty) when that one's claim went first."""
    port = free_port()
    commands = [
        [
            sys.executable,
            "-c",
            _SLOW_PROCESS_0,
            "--config=configs/tiny.py",
            f"--config.checkpoint={tiny_ckpt[0]}",
            f"--config.data.root={video_root}",
            f"--config.data.num_clips={rank + 1}",
            "--config.batch_size=2",
            "--config.data.workers=0",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={rank}",
            f"--workdir={tmp_path / 'new' / 'out'}",
        ]
        for rank in range(2)
    ]
    for returncode, _, err in run_processes(commands, devices_each=1, timeout=60):
        assert returncode == 2, err
        assert "error: the processes were started with different settings: " in err, err
        assert "--config.data.num_clips (process 0: 1, process 1: 2)" in err, err
    assert os.listdir(tmp_path) == []


def test_bfloat16_run(video_root, tiny_ckpt, tmp_path, reference_run):
    results = evaluate(
        config_for(tiny_ckpt[0], video_root, batch_size=4, dtype="bfloat16"), tmp_path
    )
    assert results["counts"]["evaluated"] == 20
    got = np.array([p["logits"] for p in read_predictions(tmp_path)])
    want = np.array([p["logits"] for p in reference_run[1]])
    error = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < error < 3e-2


@pytest.mark.parametrize("triton_gemm", [False, True])
def test_the_forward_is_compiled_with_the_configs_xla_options(
    video_root, tiny_ckpt, tmp_path, monkeypatch, triton_gemm
):
    # The options that sharding.compiler_options gives for config.triton_gemm reach the
    # compile: one XLA does not know fails it, naming the option.
    import stam_jax.evaluate as evaluate_module

    asked = []

    def options(value):
        asked.append(value)
        return {"not_an_xla_option": value}

    monkeypatch.setattr(evaluate_module.sharding, "compiler_options", options)
    config = config_for(tiny_ckpt[0], video_root, batch_size=4, triton_gemm=triton_gemm)
    with pytest.raises(Exception, match="No such compile option: 'not_an_xla_option'"):
        evaluate(config, tmp_path / "out")
    assert asked == [triton_gemm]


def test_multi_view_averages_views(video_root, tiny_ckpt, tmp_path):
    # With the features of every view and frame exported: the video feature is the views'
    # mean, as the logits are; the frames are each view's (clip-major, as the views are).
    views = {"data.num_clips": 2, "data.num_crops": 3, "eval.features": "frames"}
    config = config_for(tiny_ckpt[0], video_root, batch_size=4, **views)
    evaluate(config, tmp_path)
    spec = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32, num_clips=2, num_crops=3)
    predictions = read_predictions(tmp_path)
    features = read_features(tmp_path, predictions, tiny_ckpt[1])
    assert features["frames"].shape == (20, 6, 4, TINY["hidden_size"])
    for i, p in enumerate(predictions[:4]):
        want = direct_logits(video_root, p["path"], tiny_ckpt[1], spec)
        np.testing.assert_allclose(p["logits"], want, rtol=1e-5, atol=1e-5)
        video, frames = direct_features(video_root, p["path"], tiny_ckpt[1], spec)
        np.testing.assert_allclose(features["video"][i], video.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features["frames"][i], frames, rtol=1e-5, atol=1e-5)
    # A later run in the same workdir that exports no features removes these, which stayed
    # beside its predictions as if they were its videos'.
    evaluate(config_for(tiny_ckpt[0], video_root, batch_size=4), tmp_path)
    assert not (tmp_path / "features.npz").exists()
    assert len(read_predictions(tmp_path)) == 20


def test_views_are_averaged_as_logits_or_as_softmax():
    # eval.average='softmax' ranks by the mean of the views' softmax (the logits written are
    # their mean either way); it ranked by the mean logits, as 'logits' does. Rows of the
    # model's batch are (video, view) in video-major order.
    from stam_jax.evaluate import _forward_fn

    class Logits:  # a "model" whose logits are its input: (b * v, K)
        def apply(self, variables, x):
            return x

    videos = np.array([[[6.0, 0.0], [0.0, 2.0], [0.0, 2.0]], [[1.0, 3.0], [2.0, 0.0], [0.0, 0.0]]])
    softmax = np.exp(videos) / np.exp(videos).sum(-1, keepdims=True)
    for average, scores in (("logits", videos.mean(1)), ("softmax", softmax.mean(1))):
        mean_logits, ranked = _forward_fn(Logits(), average)(None, videos)
        np.testing.assert_allclose(mean_logits, videos.mean(1), rtol=1e-6)
        np.testing.assert_allclose(ranked, scores, rtol=1e-6)
    assert np.argmax(softmax.mean(1)[0]) != np.argmax(videos.mean(1)[0])  # they rank otherwise


def test_metrics_count_each_video_once_and_each_class_alike():
    from stam_jax.evaluate import _metrics

    # Label ranks: 1st, 2nd, 5th (class 0); 6th (class 1); 1st, and tied 1st with class 3 (the
    # lower index ranks first, as in predictions.jsonl) (class 2). Classes 3-5: no videos.
    labels = np.array([0, 0, 0, 1, 2, 2])
    scores = np.array(
        [
            [9, 1, 2, 3, 4, 5],
            [8, 9, 1, 2, 3, 4],
            [1, 9, 8, 7, 6, 0],
            [5, 0, 4, 3, 2, 1],
            [0, 1, 9, 2, 3, 4],
            [0, 1, 9, 9, 3, 4],
        ],
        np.float32,
    )
    assert _metrics(labels, scores, 6) == pytest.approx(
        {"top1": 3 / 6, "top5": 5 / 6, "mean_class_accuracy": (1 / 3 + 0 + 1) / 3}
    )
    assert _metrics(labels[:4] % 3, scores[:4, :3], 3)["top5"] == 1.0  # top-3 of 3 classes
    assert all(np.isnan(v) for v in _metrics(labels[:0], scores[:0], 6).values())


def test_another_datasets_folder_gives_features_and_predictions_without_accuracy(
    video_root, tiny_ckpt, reference_run, tmp_path, capsys
):
    # 12 classes (the model has 10), each one video of the 20: refused for accuracy, with the
    # way to go on; with eval.accuracy=False, each video's logits and features are the model's
    # and its label is its class in this folder.
    other = tmp_path / "other"
    sources = [p["path"] for p in reference_run[1]][::-1][:12]
    for i, source in enumerate(sources):
        (other / f"c{i:02d}").mkdir(parents=True)
        (other / f"c{i:02d}" / Path(source).name).symlink_to(video_root / source)
    config = config_for(tiny_ckpt[0], other, batch_size=3, **{"eval.features": "video"})
    with pytest.raises(
        EvalConfigError,
        match=r"has 12 classes but the checkpoint has 10 .*"
        r"For features or predictions of another dataset, whose classes are not "
        r"the model's, add --config.eval.accuracy=False\.$",
    ):
        evaluate(config, tmp_path / "out")
    config.eval.accuracy = False
    results = evaluate(config, tmp_path / "out")
    assert results["metrics"] == {"top1": None, "top5": None, "mean_class_accuracy": None}
    assert capsys.readouterr().out.startswith(
        "no accuracy (--config.eval.accuracy=False)  on 12 of 12 videos"
    )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["metrics"]["top1"] is None and written["classes"][11] == "c11"
    predictions = read_predictions(tmp_path / "out")
    assert [p["label"] for p in predictions] == list(range(12))
    reference = {p["path"]: p for p in reference_run[1]}
    for p, source in zip(predictions, sources, strict=True):
        np.testing.assert_allclose(p["logits"], reference[source]["logits"], rtol=1e-5, atol=1e-6)
        assert p["top5"] == reference[source]["top5"]  # the model's classes
    read_features(tmp_path / "out", predictions, tiny_ckpt[1])
    from stam_jax.plot import plot_evaluation

    with pytest.raises(ValueError, match=r"accuracy=False, .* there is no accuracy to draw"):
        plot_evaluation(
            tmp_path / "out" / "results.json",
            tmp_path / "out" / "predictions.jsonl",
            tmp_path / "pictures" / "eval.png",
        )


@pytest.fixture
def awkward_root(tmp_path) -> Path:
    root = make_folder(tmp_path / "awkward", per_class=1)
    write_video(root / "class_2" / "short.mp4", (index_frame(i, 48, 64) for i in range(5)), 10)
    (root / "class_3" / "zero.mp4").write_bytes(b"")
    (root / "class_5" / "notes.avi").write_text("not a video\n")
    good = (root / "class_6" / "video_0.mp4").read_bytes()
    (root / "class_6" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    return root


def test_bad_files_are_counted_listed_and_the_run_finishes(awkward_root, tiny_ckpt, tmp_path):
    proc = run_subprocess(
        [
            f"--config.checkpoint={tiny_ckpt[0]}",
            f"--config.data.root={awkward_root}",
            "--config.batch_size=4",
            "--config.data.workers=0",
            f"--workdir={tmp_path}",
        ]
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err  # finished, but something was skipped
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["counts"] == {
        "listed": 14,
        "evaluated": 10,
        "dropped_too_short": 1,
        "failed": 3,
        "non_finite": 0,
        "resumed": 0,
    }
    assert [d["path"] for d in results["dropped"]] == ["class_2/short.mp4"]
    assert "a clip needs 4" in results["dropped"][0]["reason"]
    failed = {f["path"]: f["reason"] for f in results["failed"]}
    assert sorted(failed) == ["class_3/zero.mp4", "class_5/notes.avi", "class_6/truncated.mp4"]
    assert all(reason for reason in failed.values())
    # PyAV names the file as opened (absolute): the reason names it as listed, so results
    # (and those a resumed run kept) read the same wherever the videos are.
    assert failed["class_3/zero.mp4"] == (
        "InvalidDataError: [Errno 1094995529] Invalid data found when processing input: "
        "'class_3/zero.mp4'"
    )
    assert str(awkward_root) not in json.dumps(results["failed"])
    assert "skipped class_2/short.mp4" in err


def test_nan_logits_are_no_prediction(video_root, tiny_ckpt, tmp_path, capsys):
    # NaN logits gave every video "class 0" through the argmax, and a top-5 of 50% on 10
    # classes: such videos are now listed apart, out of the metrics, and said. Finite params
    # whose logits overflow float32 (params holding NaN are refused before any video).
    params = jax.tree.map(np.array, tiny_ckpt[1])
    params["norm"]["bias"][:] = 1.0  # every feature near 1, so class 0's logit is +inf
    params["head"]["kernel"][:, 0] = 3e38  # (the others finite: one non-finite logit is enough)
    nan_ckpt = checkpoints.save(tmp_path / "nan", create_model("stam_tiny"), params)
    results = evaluate(config_for(nan_ckpt, video_root), tmp_path / "out")
    assert results["counts"] == {
        "listed": 20,
        "evaluated": 0,
        "dropped_too_short": 0,
        "failed": 0,
        "non_finite": 20,
        "resumed": 0,
    }
    assert all(np.isnan(v) for v in results["metrics"].values())  # null in results.json
    assert results["non_finite"][0] == {
        "path": "class_0/video_0.mp4",
        "label": 0,
        "reason": "the model gave non-finite logits (NaN/Inf)",
    }
    assert read_predictions(tmp_path / "out") == []
    err = capsys.readouterr().err
    assert "warning: 20 of 20 videos gave non-finite logits (NaN/Inf)" in err
    assert "the params are finite, so a value overflowed float32: check the checkpoint's" in err
    assert strict_json(tmp_path / "out" / "results.json")["metrics"]["top1"] is None


def test_params_beyond_float16_range_are_refused_in_float16(video_root, tiny_ckpt, tmp_path):
    # Cast to float16 they were Inf, and the warning then blamed an overflow of float32
    # activations in "finite" params; now refused before any video is decoded.
    params = jax.tree.map(np.array, tiny_ckpt[1])
    params["head"]["bias"][0] = -7e4
    big = checkpoints.save(tmp_path / "big", create_model("stam_tiny"), params)
    beyond = r"big holds values beyond float16's range .* 1 param\(s\) \(head/bias\)"
    for settings, flags in [
        (dict(param_dtype="float16"), "--config.param_dtype=float16"),
        (dict(dtype="float16"), "--config.dtype=float16"),  # the compute casts them too
    ]:
        with pytest.raises(EvalConfigError, match=rf"^{flags}: .*{beyond}.* use bfloat16"):
            evaluate(config_for(big, video_root, **settings), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pad_mode_keeps_short_videos(awkward_root, tiny_ckpt, tmp_path):
    config = config_for(tiny_ckpt[0], awkward_root, batch_size=4, **{"data.short_videos": "pad"})
    results = evaluate(config, tmp_path)
    assert results["counts"]["dropped_too_short"] == 0 and results["counts"]["evaluated"] == 11
    assert "class_2/short.mp4" in [p["path"] for p in read_predictions(tmp_path)]


def test_refused_before_compute(video_root, tiny_ckpt, tmp_path):
    def refused(message, **overrides):
        overrides = {"batch_size": 4, **overrides}
        config = config_for(overrides.pop("checkpoint", tiny_ckpt[0]), video_root, **overrides)
        with pytest.raises(EvalConfigError, match=message):
            evaluate(config, tmp_path / "out")

    refused(r"no checkpoint: pass --config.checkpoint", checkpoint="")
    refused(r"is not a stam-jax checkpoint", checkpoint=str(tmp_path))
    # README: one error naming the flag to fix (as --config.train.root's refusals do).
    nowhere = str(tmp_path / "nowhere")
    refused(
        rf"^--config.data.root: data root {re.escape(nowhere)} does not exist",
        **{"data.root": nowhere},
    )
    refused(
        r"^--config.batch_size=0: must be at least 1 \(a multiple of the 1 device\(s\)\), "
        r"e.g. --config.batch_size=1\.$",
        batch_size=0,
    )
    refused(r"--config.data.num_clips=0, num_frames=4: use >= 1", **{"data.num_clips": 0})
    refused(r"num_crops=2; use 1 \(official\) or 3", **{"data.num_crops": 2})
    refused(r"T=4 model, but the config samples clips for stam_16 \(T=16\)", model="stam_16")
    refused(r"takes 32px frames but --config.data.crop=48", **{"data.crop": 48})
    refused(r"--config\.eval\.average='max'; use 'logits' \(", **{"eval.average": "max"})
    refused(
        r"--config.frame_chunk: frame_chunk=5 does not divide the batch's 16 frames", frame_chunk=5
    )
    (tmp_path / "empty").mkdir()
    refused(
        r"^--config.data.root: .* has no class sub-folders",
        **{"data.root": str(tmp_path / "empty")},
    )
    few = tmp_path / "few"
    (few / "a").mkdir(parents=True)
    (few / "b").mkdir()
    refused(r"^--config.data.root: .* holds no video files", **{"data.root": str(few)})
    write_video(few / "a" / "x.mp4", (index_frame(i, 48, 64) for i in range(20)), 10)
    refused(r"has 2 classes but the checkpoint has 10 outputs", **{"data.root": str(few)})
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # Results written into a checkpoint would make it unreplaceable by convert --force.
    with pytest.raises(EvalConfigError, match=r"tiny is a stam-jax checkpoint; write the results"):
        evaluate(config_for(tiny_ckpt[0], video_root), tiny_ckpt[0])
    # Results in the data root, or inside it, were listed as a class by the next run (refused
    # for a wrong class count, or resumed never: partial/ was an 11th class).
    for inside, where in ((video_root, "is"), (video_root / "eval_out", "is inside")):
        with pytest.raises(
            EvalConfigError,
            match=rf"^--workdir={re.escape(str(inside))} {where} --config\.data\.root="
            rf"{re.escape(str(video_root))}: the next run would list its outputs as a class of "
            rf"videos; write them outside the data, e\.g\. --workdir=.*_runs\.$",
        ):
            evaluate(config_for(tiny_ckpt[0], video_root), inside)
    assert not (video_root / "eval_out").exists()
    assert not (tiny_ckpt[0] / "results.json").exists()


def test_class_list_file(video_root, tiny_ckpt, tmp_path):
    names = [f"class_{c}" for c in range(10)]
    class_list = tmp_path / "classes.txt"
    class_list.write_text("\n".join(reversed(names)) + "\n")
    results = evaluate(
        config_for(tiny_ckpt[0], video_root, batch_size=4, **{"data.class_list": str(class_list)}),
        tmp_path,
    )
    assert results["classes"] == list(reversed(names))
    first = read_predictions(tmp_path)[0]
    assert first["path"].startswith("class_9/") and first["label"] == 0  # label = line number
    class_list.write_text("\n".join(names[:9]) + "\n")
    with pytest.raises(EvalConfigError, match=r"class folders that are not in .*\['class_9'\]"):
        evaluate(
            config_for(tiny_ckpt[0], video_root, **{"data.class_list": str(class_list)}), tmp_path
        )


def test_decoding_processes_end_when_the_run_fails(video_root, tiny_ckpt, tmp_path, monkeypatch):
    """The input starts before compiling; a failure there or in the loop stops its workers."""
    import stam_jax.evaluate as evaluate_module

    before = child_pids()
    config = config_for(tiny_ckpt[0], video_root, batch_size=4, **{"data.workers": 2})

    def no_forward(*args):
        raise RuntimeError("compile failed")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_forward_fn", no_forward)
        with pytest.raises(RuntimeError, match="compile failed") as failed:
            evaluate(config, tmp_path / "compile")
        # `failed` holds the traceback, so evaluate's frame (and its decoder) is still alive.
        assert "evaluate" in [entry.name for entry in failed.traceback]
        assert child_pids() == before

    def loop_fails(*args):
        raise KeyboardInterrupt  # as Ctrl-C during the loop

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_run_loop", loop_fails)
        with pytest.raises(KeyboardInterrupt) as interrupted:
            evaluate(config, tmp_path / "loop")
        assert "evaluate" in [entry.name for entry in interrupted.traceback]
        assert child_pids() == before


def test_an_unclaimed_evaluation_makes_its_folder_only_to_write_its_results(
    video_root, tiny_ckpt, tmp_path, monkeypatch
):
    # Training's periodic evaluation (claim=False) made and claimed `*_results` as it started.
    # In a multi-process run, the processes that another's failure ends at once (nothing of
    # theirs cleaned up: `sharding.stop_together`) left it behind, holding only their lock
    # files. Now nothing is made before process 0 writes the results; a failed write removes
    # the folders it made, and leaves one that was there before as it was.
    import stam_jax.evaluate as evaluate_module

    config = config_for(tiny_ckpt[0], video_root, batch_size=10)
    step = tmp_path / "eval" / "step_2"
    step.mkdir(parents=True)
    workdir = step / "params_results"
    seen, run_loop = [], evaluate_module._run_loop

    def loop(*args):
        seen.append(workdir.exists())
        return run_loop(*args)

    monkeypatch.setattr(evaluate_module, "_run_loop", loop)
    results = evaluate(config, workdir, report=False, resumable=False, claim=False)
    assert seen == [False]
    assert sorted(os.listdir(workdir)) == ["predictions.jsonl", "results.json"]
    assert json.loads((workdir / "results.json").read_text())["counts"] == results["counts"]

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_module, "_write", full)
    shutil.rmtree(tmp_path / "eval")
    with pytest.raises(OSError, match="No space"):
        evaluate(config, workdir, report=False, resumable=False, claim=False)
    assert os.listdir(tmp_path) == []  # eval/step_2 too: made for this write
    workdir.mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine\n")
    with pytest.raises(OSError, match="No space"):
        evaluate(config, workdir, report=False, resumable=False, claim=False)
    assert os.listdir(workdir) == ["notes.txt"]
    with pytest.raises(ValueError, match="resumable=True keeps results in the workdir"):
        evaluate(config, workdir, claim=False)


def strict_json(path: Path) -> dict:
    """results.json parsed as strict JSON (Python's json accepts NaN by default)."""

    def no_constant(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=no_constant)


def test_frame_count_is_the_configs_with_overrides(video_root, tiny_ckpt, tmp_path, capsys):
    """A T=8 checkpoint, which no variant has, evaluates with model_overrides.num_frames=8."""
    model = create_model("stam_tiny", num_frames=8)
    params = jax.tree.map(  # stam_tiny's, but for the temporal position embedding (T + 1 rows)
        lambda want, have: have if want.shape == have.shape else np.zeros(want.shape, want.dtype),
        checkpoints.abstract_params(model),
        tiny_ckpt[1],
    )
    ckpt = checkpoints.save(tmp_path / "t8", model, params)
    with pytest.raises(EvalConfigError) as refused:
        evaluate(config_for(ckpt, video_root), tmp_path / "out")
    message = str(refused.value)
    assert "T=8 model, but the config samples clips for stam_tiny (T=4); use --config" in message
    assert "stam_8" not in message and "--config.data.frame_rate sets how many seconds" in message
    with pytest.raises(EvalConfigError, match=r"num_frames=6 \(T=6\); .*num_frames=8\b"):
        evaluate(config_for(ckpt, video_root, **{"model_overrides.num_frames": 6}), tmp_path)
    # 8 frames at 2 fps need 4 s: every video here is shorter, so none is evaluated.
    config = config_for(
        ckpt, video_root, batch_size=4, **{"model_overrides.num_frames": 8, "data.frame_rate": 2.0}
    )
    results = evaluate(config, tmp_path / "out")
    assert results["counts"]["evaluated"] == 0 and results["counts"]["dropped_too_short"] == 20
    written = strict_json(tmp_path / "out" / "results.json")
    assert written["metrics"] == {"top1": None, "top5": None, "mean_class_accuracy": None}
    assert "top-1 n/a" in capsys.readouterr().out


def test_ignored_entries_and_empty_classes_are_reported(tiny_ckpt, tmp_path, capsys):
    root = make_folder(tmp_path / "root", per_class=1)
    (root / "class_9" / "video_0.mp4").unlink()  # an empty class keeps its label
    (root / "class_3" / "video_0.mp4").rename(root / "class_3" / "video_0.mov")
    (root / ".ipynb_checkpoints").mkdir()  # was class 0, shifting every label by one
    (root / "__MACOSX").mkdir()
    (root / "README.txt").write_text("Kinetics-400 val\n")
    (root / "class_0" / "._video_0.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS fork
    (root / "class_1" / "notes.txt").write_text("-\n")
    os.symlink("..", root / "class_2" / "up")  # a loop: every class again, inside class_2
    results = evaluate(config_for(tiny_ckpt[0], root, batch_size=4), tmp_path / "out")
    assert results["counts"] == {
        "listed": 9,
        "evaluated": 9,
        "dropped_too_short": 0,
        "failed": 0,
        "non_finite": 0,
        "resumed": 0,
    }
    assert results["classes"] == [f"class_{c}" for c in range(10)]
    labels = {p["path"]: p["label"] for p in read_predictions(tmp_path / "out")}
    assert labels["class_3/video_0.mov"] == 3 and labels["class_8/video_0.mp4"] == 8
    assert strict_json(tmp_path / "out" / "results.json")["ignored"] == {
        "hidden": {
            "count": 3,
            "paths": [".ipynb_checkpoints", "__MACOSX", "class_0/._video_0.mp4"],
        },
        "root_file": {"count": 1, "paths": ["README.txt"]},
        "not_video": {"count": 1, "paths": ["class_1/notes.txt"]},
        "link_loop": {"count": 1, "paths": ["class_2/up -> ."]},
    }
    # The official loader would not list the .mov, and would list the macOS fork.
    assert strict_json(tmp_path / "out" / "results.json")["official_listing"] == {
        "not_listed": {"count": 1, "paths": ["class_3/video_0.mov"]},
        "also_listed": {"count": 1, "paths": ["class_0/._video_0.mp4"]},
    }
    out = capsys.readouterr().out
    assert "1 of 10 classes have no video (their labels are kept): class_9" in out
    assert "ignored 3 hidden or system entries: .ipynb_checkpoints, __MACOSX, class_0/" in out
    assert "ignored 1 files in the root outside any class folder: README.txt" in out
    assert (
        "note: the official loader does not list 1 of the videos listed here (not .mp4/.avi: "
        "class_3/video_0.mov) and lists 1 .mp4/.avi files skipped here as hidden "
        "(class_0/._video_0.mp4): its counts and top-1 are over another set of videos.\n"
    ) in out


def test_bad_config_values_are_refused_before_anything_is_created(video_root, tiny_ckpt, tmp_path):
    out = tmp_path / "out"

    def refused(message, workdir=out, **overrides):
        config = config_for(overrides.pop("checkpoint", tiny_ckpt[0]), video_root, **overrides)
        with pytest.raises(EvalConfigError, match=message):
            evaluate(config, workdir)

    refused(r"--config.dtype='fp16' is not supported", dtype="fp16")
    refused(r"--config.param_dtype='bf16' is not supported", param_dtype="bf16")
    refused(r"--config.model='stam_99' is not a registered variant", model="stam_99")
    refused(r"--config.attention_impl='flash' is not supported", attention_impl="flash")
    refused(
        r"^--config.eval.features='frame'; use 'video' \(each video's feature, the head's "
        r"input\), 'frames' \(that and every frame's ViT feature\) or '' \(none\)\.$",
        **{"eval.features": "frame"},
    )
    if jax.default_backend() != "gpu":
        refused(r"attention_impl=cudnn needs an NVIDIA GPU", attention_impl="cudnn")
    refused(
        r"num_processes=2 needs --config.distributed.coordinator=HOST:PORT",
        **{"distributed.num_processes": 2},
    )
    refused(
        r"--config.distributed.process_id=1 with num_processes=1", **{"distributed.process_id": 1}
    )
    refused(
        r"^--config.distributed.join_timeout=0; give the seconds the processes may take to join, "
        r"a whole number >= 1 \(default 300\)\.$",
        **{"distributed.join_timeout": 0},
    )
    refused(r"--workdir is empty", workdir="")
    # The checkpoint defines the architecture: an override that contradicts it was ignored.
    refused(
        r"model_overrides.num_classes=11, but checkpoint .* holds num_classes=10",
        **{"model_overrides.num_classes": 11},
    )
    refused(
        r"model_overrides.aggregate='mean', but checkpoint .* holds aggregate='transformer'",
        **{"model_overrides.aggregate": "mean"},
    )
    (tmp_path / "file").write_text("")
    refused(r"--workdir=.*file: .*file is a file, not a folder", workdir=tmp_path / "file")
    refused(r"cannot write .*file/x: .*file is a file, not", workdir=tmp_path / "file" / "x")
    # JAX alone warned at every compile and ran on without the cache.
    refused(
        r"^--config.compilation_cache_dir=.*file/xla cannot be written: .*file is a file, not a "
        r"folder\. Give a folder this process can write to, or --config.compilation_cache_dir='' "
        r"to compile without the persistent cache\.$",
        compilation_cache_dir=str(tmp_path / "file" / "xla"),
    )
    misfit = tmp_path / "misfit"  # its config says mlp_dim=48, its params hold 64
    shutil.copytree(tiny_ckpt[0], misfit)
    meta = json.loads((misfit / "config" / "metadata").read_text())
    meta["model"]["mlp_dim"] = 48
    (misfit / "config" / "metadata").write_text(json.dumps(meta))
    refused(
        r"(?s)params do not fit the model:\n  param blocks_0/mlp/fc1/bias: shape \(64,\), this "
        r"model's \(48,\).*\n.*misfit's config/metadata does not describe its own params: it was "
        r"edited, or parts of two checkpoints were mixed; write it again",
        checkpoint=misfit,
    )
    eleven = tmp_path / "eleven.txt"
    eleven.write_text("".join(f"class_{c}\n" for c in range(11)))
    refused(
        r"class_list=.*eleven.txt names 11 classes but the checkpoint has 10 outputs",
        **{"data.class_list": str(eleven)},
    )
    splits = tmp_path / "k400"
    for split in ("train", "val"):
        (splits / split / "abseiling").mkdir(parents=True)
        (splits / split / "abseiling" / "x.mp4").write_bytes(b"")
    refused(
        r"has 2 classes .* Its class folders: train, val\. train, val look like dataset splits, "
        r"not classes: point --config.data.root at one of them \(e\.g\. .*k400/val\)",
        **{"data.root": str(splits)},
    )
    assert not out.exists()


def test_cli_unknown_config_field_is_one_line(tmp_path):
    proc = run_subprocess([f"--workdir={tmp_path / 'out'}", "--config.data.rot=/x"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err == (
        "error: unknown config field 'rot' (--config.data.rot). "
        'Did you mean "root" instead of "rot"?\n'
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.checkpoint=x"],
            "--config.checkpoint sets a field of the run config, but no --config was given: name "
            "it first, e.g. --config configs/stam_16.py --config.checkpoint=...",
        ),
        (
            ["--config.data.workers=0", "--config", "configs/tiny.py"],
            "--config.data.workers comes before --config: name the config file first.",
        ),
        (
            ["--config=configs/demo.py:stam", "--config.model_overrides.temporal_heads=8"],
            "unknown config field 'temporal_heads' (--config.model_overrides.temporal_heads). "
            "The fields of --config.model_overrides are aggregate, drop_path_rate, dropout_rate, "
            "num_classes, num_frames, temporal_dropout_rate.",
        ),
        (
            ["--config", "configs/tiny.py", "--dtype=bfloat16"],
            "unknown flag --dtype; the flags are --config, --workdir, and the run config's fields "
            "are set as --config.FIELD (did you mean --config.dtype?).",
        ),
        (
            ["--config", "configs/tiny.py", "--workers=0"],
            "unknown flag --workers; the flags are --config, --workdir, and the run config's "
            "fields are set as --config.FIELD (did you mean --config.data.workers?).",
        ),
        (
            ["--config", "configs/tiny.py:fast"],
            "--config=configs/tiny.py:fast: configs/tiny.py has one run and takes no ':fast'; "
            "write --config=configs/tiny.py.",
        ),
        (
            ["--config", "configs/tiny.py", "--force"],
            "unknown flag --force; the flags are --config, --workdir, and the run config's "
            "fields are set as --config.FIELD (the run config has no field named 'force').",
        ),
    ],
)
def test_cli_flag_mistakes_say_what_to_write(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "run_eval.py", *args, f"--workdir={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (proc.returncode, proc.stderr) == (2, f"error: {message}\n")


def test_discovering_a_cluster_where_there_is_none_is_refused_naming_the_flags(tmp_path):
    # num_processes=0 asks JAX to discover the cluster; with none to find, its ValueError
    # ended the run as a traceback, exit status 1.
    proc = subprocess.run(
        [
            sys.executable,
            "run_eval.py",
            "--config=configs/tiny.py",
            "--config.distributed.num_processes=0",
            f"--workdir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI", "PMI"))},
    )
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(
        r"error: --config\.distributed\.num_processes=0: JAX found no cluster to join \(.+\); "
        r"run it in one JAX discovers \(SLURM, a TPU pod, \.\.\.\), or give "
        r"--config\.distributed\.num_processes=N and --config\.distributed\.coordinator="
        r"HOST:PORT \(num_processes=1: one process\)\.\n",
        proc.stderr,
    ), proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_workdir_that_cannot_be_made_is_refused_naming_what_to_do(
    video_root, tiny_ckpt, tmp_path, monkeypatch
):
    mkdir = Path.mkdir

    def disk_full(self: Path, *args, **kwargs) -> None:
        if self == tmp_path / "out":
            raise OSError(28, "No space left on device")
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", disk_full)
    with pytest.raises(EvalConfigError) as refused:
        evaluate(config_for(tiny_ckpt[0], video_root), tmp_path / "out")
    assert str(refused.value) == (
        f"--workdir={tmp_path / 'out'} cannot be created: No space left on device; name "
        "another folder."
    )
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_holding_nan_is_refused_before_any_video(video_root, tiny_ckpt, tmp_path):
    # Every logit would be NaN: the run would decode the whole folder to report nothing.
    params = jax.tree.map(np.array, tiny_ckpt[1])
    params["norm"]["scale"][5] = np.nan
    ckpt = checkpoints.save(tmp_path / "diverged", create_model("stam_tiny"), params)
    with pytest.raises(EvalConfigError) as refused:
        evaluate(config_for(ckpt, video_root), tmp_path / "out")
    assert str(refused.value) == (
        f"--config.checkpoint: {ckpt} holds NaN or Inf values in 1 param(s) (norm/scale), so "
        "every prediction would be NaN; evaluate a checkpoint with finite params (a run that "
        "diverged: export an earlier step with python -m stam_jax.export RUN_DIR OUT_DIR "
        "--step N)."
    )
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_resumes_with_only_the_videos_left(
    video_root, tiny_ckpt, tmp_path, reference_run, monkeypatch, capsys
):
    import stam_jax.evaluate as evaluate_module

    # The run exports video features: they are kept with the results, and resumed.
    workdir, kept = tmp_path / "out", tmp_path / "out" / PARTIAL
    features = {"eval.features": "video"}
    collect, calls = evaluate_module._collect, []

    def interrupted_at_the_third_batch(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C (a crash or a kill keeps the same)
        collect(*args)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_collect", interrupted_at_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            evaluate(config_for(tiny_ckpt[0], video_root, batch_size=4, **features), workdir)
    assert kept_count(kept) == 8 and not (workdir / "results.json").exists()  # 2 batches
    line = subprocess.run(  # what run_eval.py prints on Ctrl-C (in a process of its own: absl)
        [sys.executable, "-c", f"import run_eval; print(run_eval._interrupted({str(workdir)!r}))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert line == (
        f"interrupted: the results of 8 videos are kept in {kept}; run the same command again "
        "to evaluate the others (results.json comes at the end).\n"
    )

    # Other settings: refused, naming them; what is kept stays.
    with pytest.raises(EvalConfigError) as refused:
        evaluate(config_for(tiny_ckpt[0], video_root, dtype="bfloat16", **features), workdir)
    assert str(refused.value) == (
        f"--workdir={workdir} holds the results of an interrupted evaluation with other settings "
        "(--config.dtype: 'float32' then, 'bfloat16' now); run the command that was interrupted "
        f"to finish it, or delete {kept} to evaluate from the start (or give another --workdir)."
    )
    # The same params under other head counts (a .pth converted again with another
    # --num-heads, into the same folder) give other results: refused, where the params'
    # checksum alone let the resume mix both.
    heads = tmp_path / "heads"
    checkpoints.save(heads, create_model("stam_tiny", num_heads=4), tiny_ckpt[1])
    with pytest.raises(EvalConfigError) as refused:
        evaluate(config_for(heads, video_root, **features), workdir)
    assert "(--config.checkpoint's architecture: {" in str(refused.value)
    assert "'num_heads': 2, " in str(refused.value) and "'num_heads': 4, " in str(refused.value)
    assert "--config.checkpoint's params" not in str(refused.value)  # the same params
    # The kept records hold the features: a resume without them (or with others) is refused.
    with pytest.raises(EvalConfigError, match=r"\(--config.eval.features: 'video' then, '' now\)"):
        evaluate(config_for(tiny_ckpt[0], video_root), workdir)
    assert kept_count(kept) == 8

    # A kill while a batch was written leaves part of a record: it is left out, and cut off
    # before the next append (which would otherwise be read shifted).
    with open(kept / "p0.bin", "ab") as f:
        f.write(b"\x7f" * 7)
    decoding, decoded = evaluate_module.decode_in_order, []

    def recorded(paths, *args):
        decoded.extend(Path(p).relative_to(video_root).as_posix() for p in paths)
        return decoding(paths, *args)

    def after_the_last_batch(*args):
        raise KeyboardInterrupt

    # Another batch size, or training-only settings, change no video's results: they may go on
    # with the run. Interrupted again once every batch is done, before the results are written.
    want_results, want = reference_run
    again = config_for(
        tiny_ckpt[0], video_root, batch_size=6, **{"data.train_flip": False, **features}
    )
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "decode_in_order", recorded)
        patch.setattr(evaluate_module, "_gather", after_the_last_batch)
        with pytest.raises(KeyboardInterrupt):
            evaluate(again, workdir)
    assert decoded == [p["path"] for p in want[8:]]  # only the videos left
    assert kept_count(kept) == 20
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "decode_in_order", recorded)
        results = evaluate(config_for(tiny_ckpt[0], video_root, **features), workdir)
    assert len(decoded) == 12  # none decoded again
    assert "no video evaluated by this run (compile 0.0s excluded)" in capsys.readouterr().out
    assert results["timing"]["videos_per_s"] is None
    assert results["counts"] == {**want_results["counts"], "resumed": 20}
    assert results["metrics"] == pytest.approx(want_results["metrics"])
    got = read_predictions(workdir)
    assert [g["path"] for g in got] == [w["path"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["top5"] == w["top5"]
        np.testing.assert_allclose(g["logits"], w["logits"], rtol=1e-5, atol=1e-6)
    assert not kept.exists()  # gone once results.json is written
    exported = read_features(workdir, got, tiny_ckpt[1])
    assert set(exported) == {"path", "label", "video"}
    for i in (7, 8):  # the last video kept by the first run, the first of the second
        video, _ = direct_features(video_root, got[i]["path"], tiny_ckpt[1])
        np.testing.assert_allclose(exported["video"][i], video[0], rtol=1e-5, atol=1e-5)


def test_kept_results_are_read_once_whatever_the_process_count(tmp_path):
    """Journals of processes 0-2 in one (shared) folder: two processes read each once; a cut
    line or record is left out; the settings are compared by content."""
    folder, classes = tmp_path / PARTIAL, 3
    settings = {"--config.dtype": "float32", "params": {"shown": "/a (1)", "content": "1"}}
    logits = np.random.default_rng(0).normal(size=(21, classes)).astype(np.float32)
    for k in range(3):
        rows = np.array([k, k + 3])
        skipped = {10 + k: {"status": "failed", "reason": "x"}}
        Journal(folder, k, classes, lambda: settings).add(
            rows, logits[rows], -logits[rows], skipped
        )
    # Cut short by a kill: a line, and a record, which a later append must not shift.
    with open(folder / "p1.skipped.jsonl", "a") as f:
        f.write('{"position": 9')
    with open(folder / "p0.bin", "ab") as f:
        f.write(b"\x7f" * 7)
    assert kept_count(folder) == 9
    rows = np.array([20])
    Journal(folder, 0, classes, lambda: settings).add(rows, logits[rows], -logits[rows], {})
    moved = {"--config.dtype": "float32", "params": {"shown": "/b (1)", "content": "1"}}
    parts = [read_kept(folder, p, 2, classes, lambda: moved, "--workdir=w") for p in range(2)]
    assert [part.positions.tolist() for part in parts] == [[0, 3, 20, 2, 5], [1, 4]]
    assert [sorted(part.skipped) for part in parts] == [[10, 12], [11]]
    for part in parts:
        np.testing.assert_array_equal(part.logits, logits[part.positions])
        np.testing.assert_array_equal(part.scores, -logits[part.positions])
    with pytest.raises(PartialError, match=r"\(params: /a \(1\) then, /c \(2\) now\)"):
        other = {**settings, "params": {"shown": "/c (2)", "content": "2"}}
        read_kept(folder, 0, 1, classes, lambda: other, "--workdir=w")
    # A description that cannot be read: refused, naming the files, never a traceback.
    for text in ['{"format": 2, "num_classes": 3, "settings": [1]}\n', '{"format": 3}', "{"]:
        good = (folder / "p2.json").read_bytes()
        (folder / "p2.json").write_text(text)
        with pytest.raises(PartialError, match=rf"but {folder}/p2\.\* cannot be read \(.+\); "):
            read_kept(folder, 0, 2, classes, lambda: moved, "--workdir=w")
        (folder / "p2.json").write_bytes(good)
    with pytest.raises(PartialError, match=r"but they name video 20, not one of the 20 listed"):
        read_kept(folder, 0, 2, classes, lambda: settings, "--workdir=w", 20)
    with pytest.raises(PartialError, match=r"\(--config.seed: \(not set\) then, 3 now\)"):
        read_kept(folder, 0, 2, classes, lambda: {**settings, "--config.seed": 3}, "--workdir=w")
    # But a setting recorded since (the checkpoint's architecture): results kept by a version
    # that did not record it go on as that version would have, where they were refused.
    architecture = {**settings, "--config.checkpoint's architecture": {"num_heads": 2}}
    assert kept_count(folder) == 10
    assert len(read_kept(folder, 0, 1, classes, lambda: architecture, "--workdir=w").positions)
    (folder / "p1.bin.orig").write_bytes(b"")  # a copy of one's own: never removed
    remove(folder, 1, 2)  # process 1 of 2: p1 only
    assert sorted(p.name for p in folder.iterdir()) == [
        "p0.bin",
        "p0.json",
        "p0.skipped.jsonl",
        "p1.bin.orig",
        "p2.bin",
        "p2.json",
        "p2.skipped.jsonl",
    ]
    remove(folder, 0, 2)
    assert [p.name for p in folder.iterdir()] == ["p1.bin.orig"]


def test_damaged_records_are_left_out_and_their_videos_evaluated_again(tmp_path, capsys):
    """Blocks a power loss left zero-filled (or any bytes but the record's): never read as a
    video's results (a zero record would be video 0 with logits 0); the rest is kept."""
    from stam_jax.partial import record_dtype

    folder, classes, settings = tmp_path / PARTIAL, 3, {"--config.dtype": "float32"}
    logits = np.arange(30, dtype=np.float32).reshape(10, classes)
    journal = Journal(folder, 0, classes, lambda: settings)
    journal.add(
        np.array([4, 5]), logits[[4, 5]], -logits[[4, 5]], {7: {"status": "failed", "reason": "r"}}
    )
    size = record_dtype(classes).itemsize
    assert size == 8 + 2 * 4 * classes + 4
    data, lines = folder / "p0.bin", folder / "p0.skipped.jsonl"
    good = data.read_bytes()
    flipped = bytearray(good)
    flipped[size + 9] ^= 1  # one bit of video 5's first logit
    data.write_bytes(bytes(flipped) + bytes(2 * size))  # and two zero-filled records
    with open(lines, "ab") as f:
        f.write(b"\0" * 20 + b"\n")
    kept = read_kept(folder, 0, 1, classes, lambda: settings, "--workdir=w")
    assert kept.positions.tolist() == [4] and list(kept.skipped) == [7]
    np.testing.assert_array_equal(kept.logits, logits[[4]])
    assert capsys.readouterr().err == (
        f"warning: 3 damaged records and 1 damaged line of skipped videos in {folder}/p0.* (cut "
        "short, or not written whole before a power loss) left out; their videos are evaluated "
        "again.\n"
    )
    assert kept_count(folder) == 2  # what an interrupted run says is kept: videos 4 and 7
    # The next append goes after the last intact record (the damaged ones at the end are cut
    # off; video 5's, between intact ones, stays left out).
    journal = Journal(folder, 0, classes, lambda: settings)
    journal.add(np.array([6]), logits[[6]], -logits[[6]], {})
    assert data.stat().st_size == 2 * size
    journal.add(np.array([5]), logits[[5]], -logits[[5]], {})
    kept = read_kept(folder, 0, 1, classes, lambda: settings, "--workdir=w")
    assert kept.positions.tolist() == [4, 6, 5]
    np.testing.assert_array_equal(kept.scores, -logits[[4, 6, 5]])
    assert "1 damaged line of skipped videos in" in capsys.readouterr().err
    assert kept_count(folder) == 4  # videos 4, 6, 5 and 7

    # A journal of format 1 (no CRC, from an earlier version) is read and appended to as such.
    old = tmp_path / "old"
    old.mkdir()
    (old / "p0.json").write_text(json.dumps({"format": 1, "num_classes": 3, "settings": settings}))
    one = np.zeros(1, record_dtype(classes, 1))
    one["position"], one["logits"] = 2, logits[2]
    (old / "p0.bin").write_bytes(one.tobytes())
    line = '{"position": 7, "status": "failed", "reason": "r"}\n'
    (old / "p0.skipped.jsonl").write_text(line)
    Journal(old, 0, classes, lambda: settings).add(
        np.array([3]), logits[[3]], logits[[3]], {8: {"status": "too_short", "reason": "s"}}
    )
    assert (old / "p0.bin").stat().st_size == 2 * record_dtype(classes, 1).itemsize
    assert (old / "p0.skipped.jsonl").read_text() == line + (
        '{"position": 8, "status": "too_short", "reason": "s"}\n'
    )
    kept = read_kept(old, 0, 1, classes, lambda: settings, "--workdir=w")
    assert kept.positions.tolist() == [2, 3] and sorted(kept.skipped) == [7, 8]
    np.testing.assert_array_equal(kept.logits, logits[[2, 3]])
    assert kept_count(old) == 4 and capsys.readouterr().err == ""


def test_no_single_flipped_bit_is_read_as_a_result(tmp_path, capsys):
    """Every one bit flipped in the kept files, one at a time: the record or line it lands in
    is left out with a warning, never read as other results (a position digit flipped in a
    line of pK.skipped.jsonl, '7' to '6', reported video 6 as failed and never evaluated it)."""
    folder, classes, settings = tmp_path / PARTIAL, 2, {"--config.dtype": "float32"}
    logits = np.arange(6, dtype=np.float32).reshape(3, classes)
    failed = {7: {"status": "failed", "reason": "cannot decode"}}
    failed[12] = {"status": "dropped_too_short", "reason": "2 frames"}
    Journal(folder, 0, classes, lambda: settings).add(np.array([1, 2, 3]), logits, -logits, failed)
    whole = read_kept(folder, 0, 1, classes, lambda: settings, "--workdir=w", 20)
    assert whole.positions.tolist() == [1, 2, 3] and whole.skipped == failed
    assert capsys.readouterr().err == ""
    for name in ("p0.bin", "p0.skipped.jsonl"):
        path = folder / name
        good = path.read_bytes()
        for bit in range(8 * len(good)):
            damaged = bytearray(good)
            damaged[bit // 8] ^= 1 << bit % 8
            path.write_bytes(bytes(damaged))
            kept = read_kept(folder, 0, 1, classes, lambda: settings, "--workdir=w", 20)
            at = {p: i for i, p in enumerate(kept.positions.tolist())}
            assert set(at) <= {1, 2, 3} and len(at) >= 2 + (name != "p0.bin"), (name, bit)
            for p, i in at.items():
                np.testing.assert_array_equal(kept.logits[i], logits[p - 1])
                np.testing.assert_array_equal(kept.scores[i], -logits[p - 1])
            wrong = {p: s for p, s in kept.skipped.items() if failed.get(p) != s}
            assert not wrong, (name, bit, wrong)
            # Left out with a warning; but the last line without its newline is one a kill cut
            # short, left out as such.
            warned = len(at) < 3 or (len(kept.skipped) < 2 and bit // 8 < len(good) - 1)
            what = "damaged record" if name == "p0.bin" else "damaged line of skipped videos"
            assert (what in capsys.readouterr().err) == warned, (name, bit)
            assert kept_count(folder) == len(at) + len(kept.skipped), (name, bit)
        path.write_bytes(good)


def test_results_that_cannot_be_kept_do_not_stop_the_run(tmp_path, capsys):
    (tmp_path / "out").write_text("")  # WORKDIR/partial cannot be created under a file
    journal = Journal(tmp_path / "out" / PARTIAL, 0, 2, dict)
    for _ in range(2):
        journal.add(np.array([0]), np.zeros((1, 2)), np.zeros((1, 2)), {})
    assert capsys.readouterr().err == (
        f"warning: cannot keep results in {tmp_path / 'out' / PARTIAL} (Not a directory); the "
        "run goes on, but if it is interrupted, the videos from here on are evaluated again.\n"
    )


def test_a_workdir_another_run_is_using_is_refused_and_left_as_it_is(
    video_root, tiny_ckpt, tmp_path, reference_run
):
    """Two runs in one workdir would each evaluate the videos left and remove the other's
    kept results: the second is refused before it reads or writes anything there."""
    workdir = tmp_path / "out"
    config = config_for(tiny_ckpt[0], video_root, batch_size=4)
    keep(workdir, 0, config, [0, 1], np.ones((2, 10), np.float32))
    before = files_in(workdir)
    with held_here(workdir) as in_use:  # as a run started earlier holds it
        with pytest.raises(EvalConfigError) as refused:
            evaluate(config, workdir)
        assert str(refused.value) == f"--workdir={workdir}{in_use}"
        assert files_in(workdir) == before
    # Once it has ended, the same command runs, and leaves no claim behind.
    results = evaluate(config, workdir)
    assert results["counts"]["resumed"] == 2
    assert sorted(os.listdir(workdir)) == ["predictions.jsonl", "results.json"]


def test_run_loop_pads_the_last_batch_and_keeps_each_video_once(monkeypatch):
    """Rows of skipped videos and past the end are padding; each step's results are fetched
    and kept during the next one, with the videos skipped since; the wait for input is timed
    once the first batch is dispatched."""
    import types

    import jax.numpy as jnp

    import stam_jax.evaluate as evaluate_module
    from stam_jax import sharding
    from stam_jax.data.loader import Decoded

    clock = [0.0]  # seconds: 5 to the first video, 1 to each other, 100 per step
    monkeypatch.setattr(
        evaluate_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )
    statuses = ["ok", "ok", "failed", "ok", "too_short", "ok", "ok"]

    def items():
        for i, status in enumerate(statuses):
            clock[0] += 1 if i else 5
            views = np.full((1, 1, 1, 1, 3), i + 1, np.uint8) if status == "ok" else None
            yield Decoded(10 + i, views, status, "" if status == "ok" else f"reason {i}")

    def compiled(params, videos):
        clock[0] += 100
        logits = jnp.asarray(videos).reshape(videos.shape[0], -1)[:, :2].astype(jnp.float32)
        return logits, -logits

    class Journal:
        def __init__(self):
            self.added = []

        def add(self, positions, logits, scores, skipped, features):
            assert features.shape == (len(positions), 0)  # no features exported
            self.added.append((positions.tolist(), logits[:, 0].tolist(), dict(skipped)))

    class Progress:
        def __init__(self):
            self.steps = []

        def update(self, n):
            self.steps.append(n)

    journal, progress = Journal(), Progress()
    (done, logits, scores, outcomes, _), first_batch_at, waited = evaluate_module._run_loop(
        compiled, None, items(), 3, (3, 1, 1, 1, 1, 3), sharding.data_mesh(), progress, journal
    )
    # Batches: [10, 11, (12 failed)], [13, (14 too short), 15], [16, (end), (end)].
    assert done == [10, 11, 13, 15, 16]
    np.testing.assert_array_equal(np.concatenate(logits)[:, 0], [1, 2, 4, 6, 7])
    np.testing.assert_array_equal(np.concatenate(scores)[:, 1], [-1, -2, -4, -6, -7])
    assert outcomes == {
        12: {"status": "failed", "reason": "reason 2"},
        14: {"status": "too_short", "reason": "reason 4"},
    }
    assert journal.added == [([10, 11], [1, 2], outcomes), ([13, 15], [4, 6], {}), ([16], [7], {})]
    assert progress.steps == [1, 1, 1]
    assert (first_batch_at, waited) == (107.0, 4.0)  # the first step's 7 s are no wait


def test_skipped_videos_are_kept_once_and_listed_in_order(
    awkward_root, tiny_ckpt, tmp_path, monkeypatch
):
    import stam_jax.evaluate as evaluate_module

    workdir, config = tmp_path / "out", config_for(tiny_ckpt[0], awkward_root, batch_size=4)
    # An interrupted run kept video 0's results, and video 13 (the last) as failed.
    kept = {13: {"status": "failed", "reason": "kept reason"}}
    keep(workdir, 0, config, [0], np.zeros((1, 10)), kept)
    decoding, decoded = evaluate_module.decode_in_order, []

    def recorded(paths, spec, workers, prefetch):
        assert (workers, prefetch) == (0, 8)  # prefetch 0: twice the batch
        decoded.extend(Path(p).relative_to(awkward_root).as_posix() for p in paths)
        return decoding(paths, spec, workers, prefetch)

    def after_the_last_batch(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "decode_in_order", recorded)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_gather", after_the_last_batch)
        with pytest.raises(KeyboardInterrupt):
            evaluate(config, workdir)
    assert len(decoded) == 12 and "class_9/video_0.mp4" not in decoded
    decoded.clear()
    results = evaluate(config, workdir)
    assert decoded == []  # the videos skipped were kept too
    assert results["counts"] == {
        "listed": 14,
        "evaluated": 9,
        "dropped_too_short": 1,
        "failed": 4,
        "non_finite": 0,
        "resumed": 14,
    }
    assert [f["path"] for f in results["failed"]] == [  # in listing order
        "class_3/zero.mp4",
        "class_5/notes.avi",
        "class_6/truncated.mp4",
        "class_9/video_0.mp4",
    ]
    assert results["failed"][3]["reason"] == "kept reason"


def test_predictions_and_metrics_rank_by_the_scores(video_root, tiny_ckpt, tmp_path, monkeypatch):
    """The ranking scores (the views' mean softmax for eval.average='softmax') decide top5 and
    the metrics, and are kept for a resumed run; the logits written are the mean logits."""
    import stam_jax.evaluate as evaluate_module

    forward_fn, collect, calls = evaluate_module._forward_fn, evaluate_module._collect, []

    def reversed_ranking(model, average, features):  # scores ranking as the logits do not
        forward = forward_fn(model, average, features)

        def negated(params, videos):
            mean_logits, _, *exported = forward(params, videos)
            return mean_logits, -mean_logits, *exported

        return negated

    def interrupted_at_the_third_batch(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        collect(*args)

    monkeypatch.setattr(evaluate_module, "_forward_fn", reversed_ranking)
    workdir, config = tmp_path / "out", config_for(tiny_ckpt[0], video_root, batch_size=4)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_collect", interrupted_at_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            evaluate(config, workdir)
    results = evaluate(config, workdir)
    assert results["counts"]["resumed"] == 8 and results["counts"]["evaluated"] == 20
    predictions = read_predictions(workdir)
    for p in predictions:
        want = direct_logits(video_root, p["path"], tiny_ckpt[1])
        np.testing.assert_allclose(p["logits"], want, rtol=1e-5, atol=1e-5)
        lowest = np.argsort(np.asarray(p["logits"], np.float32), kind="stable")[:5]
        assert p["top5"] == lowest.tolist()
    hits = np.array([(p["top5"][0] == p["label"], p["label"] in p["top5"]) for p in predictions])
    labels = np.array([p["label"] for p in predictions])
    assert results["metrics"] == pytest.approx(
        {
            "top1": hits[:, 0].mean(),
            "top5": hits[:, 1].mean(),
            "mean_class_accuracy": np.mean([hits[labels == c, 0].mean() for c in range(10)]),
        }
    )


def test_settings_compare_what_decides_the_results(video_root, tiny_ckpt, tmp_path):
    """What every process must share, and what an interrupted run must have had to be resumed:
    paths by content, per-process and speed settings left out."""
    import types

    from stam_jax.data.prepared import list_root
    from stam_jax.evaluate import _NOT_IN_RESULTS, _PER_PROCESS, _settings
    from stam_jax.sharding import compared

    moved = shutil.copytree(video_root, tmp_path / "moved")
    renamed = shutil.copytree(video_root, tmp_path / "renamed")  # same counts, other names
    (renamed / "class_0" / "video_0.mp4").rename(renamed / "class_0" / "video_2.mp4")

    def settings(
        leave_out, root=video_root, checksum="c", prepared=None, architecture=TINY, **overrides
    ):
        config = config_for(tiny_ckpt[0], root, **overrides)
        folder = list_root(root, "eval", SPEC, None)[0]
        return {
            k: compared(v)
            for k, v in _settings(
                config, folder, prepared, checksum, architecture, leave_out
            ).items()
        }

    for leave_out in (_PER_PROCESS, _NOT_IN_RESULTS):
        same = settings(leave_out)
        for overrides in [
            {"root": moved},
            {"checkpoint": str(tmp_path / "copy")},  # its params' checksum is the same
            {"data.workers": 5},
            {"data.prefetch": 7},
            {"progress": True},
            {"distributed.process_id": 1},
            {"compilation_cache_dir": "/cache"},
        ]:
            assert settings(leave_out, **overrides) == same, overrides
        for overrides in [
            {"checksum": "d"},
            {"architecture": {**TINY, "num_heads": 4}},  # the same params, other heads
            {"root": renamed},
            {"prepared": types.SimpleNamespace(frames="jpeg")},
            {"dtype": "bfloat16"},
            {"eval.average": "softmax"},
            {"data.num_clips": 2},
            {"data.short_videos": "pad"},
        ]:
            assert settings(leave_out, **overrides) != same, overrides
    # Resumed with another batch size or training-only values: the same results.
    for overrides in [
        {"batch_size": 7},
        {"seed": 3},
        {"data.train_flip": False},
        {"triton_gemm": True},  # other GEMM kernels: the same results to float rounding
    ]:
        assert settings(_NOT_IN_RESULTS, **overrides) == settings(_NOT_IN_RESULTS), overrides
        assert settings(_PER_PROCESS, **overrides) != settings(_PER_PROCESS), overrides


def test_summary_lines(tmp_path, capsys):
    from stam_jax.evaluate import _summary

    results = {
        "metrics": {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": float("nan")},
        "counts": {
            "listed": 20,
            "evaluated": 7,
            "dropped_too_short": 6,
            "failed": 7,
            "non_finite": 0,
            "resumed": 0,
        },
        "timing": {"videos_per_s": 3.5, "eval_s": 2.0, "compile_s": 1.3},
        "devices": 1,
        "classes": ["a", "b"],
        "empty_classes": [],
        "ignored": {},
        "dropped": [{"path": f"a/{i}.mp4", "reason": "short"} for i in range(6)],
        "failed": [{"path": f"b/{i}.mp4", "reason": "bad"} for i in range(7)],
    }
    _summary(results, tmp_path)
    out, err = capsys.readouterr()
    assert out == (
        "top-1 50.00%  top-5 100.00%  mean class accuracy n/a  on 7 of 20 videos (6 dropped as "
        "too short, 7 failed to decode)\n"
        f"3.5 videos/s over 2.0s (compile 1.3s excluded), 1 device(s); results in "
        f"{tmp_path / 'results.json'}\n"
        f"  ... and 3 more, each with its reason in {tmp_path / 'results.json'}\n"
    )
    assert err == "".join(
        [f"  skipped a/{i}.mp4: short\n" for i in range(5)]
        + [f"  skipped b/{i}.mp4: bad\n" for i in range(5)]
    )
    results["counts"].update(evaluated=0, dropped_too_short=0, failed=0, non_finite=2, resumed=3)
    results.update(dropped=[], failed=[], timing={**results["timing"], "videos_per_s": None})
    _summary(results, tmp_path)
    out, err = capsys.readouterr()
    assert out == (
        "top-1 50.00%  top-5 100.00%  mean class accuracy n/a  on 0 of 20 videos (0 dropped as "
        "too short, 0 failed to decode, 2 with NaN/Inf logits)\n"
        f"no video evaluated by this run (compile 1.3s excluded), 1 device(s); results in "
        f"{tmp_path / 'results.json'} (3 videos' results were kept by the interrupted run and "
        "not redone)\n"
    )
    assert err == ""


_EXIT_STATUSES = """
import json, types

import run_eval
import stam_jax.evaluate as evaluate_module
import stam_jax.sharding as sharding

run_eval._CONFIG = run_eval._WORKDIR = types.SimpleNamespace(value="w")
statuses = {}
stop_together = sharding.stop_together


def recorded(status_of, peer_status):  # the statuses of a multi-process run
    errors = KeyboardInterrupt(), evaluate_module.EvalConfigError("x"), RuntimeError("x")
    statuses["status_of"] = [status_of(e) for e in errors] + [peer_status]
    return stop_together(status_of, peer_status)


sharding.stop_together = recorded
for case in ["none", "dropped_too_short", "failed", "non_finite", "refused"]:
    def evaluate(config, workdir, case=case):
        if case == "refused":
            raise evaluate_module.EvalConfigError("--config.data.crop=48; set it to 32.")
        counts = {"dropped_too_short": 0, "failed": 0, "non_finite": 0}
        return {"counts": {**counts, **({case: 2} if case in counts else {})}}

    evaluate_module.evaluate = evaluate
    try:
        statuses[case] = run_eval._evaluate()
    except SystemExit as e:
        statuses[case] = e.code
print(json.dumps(statuses))
"""


def test_cli_exit_statuses():
    # 3 for a run that skipped videos, NaN/Inf logits included; 2 and one line for a refusal.
    # (One process: the statuses of a multi-process run are what `stop_together` is given.)
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_STATUSES], cwd=ROOT, capture_output=True, text=True
    )
    assert result.stderr == "error: --config.data.crop=48; set it to 32.\n"
    assert json.loads(result.stdout) == {
        "none": 0,
        "dropped_too_short": 3,
        "failed": 3,
        "non_finite": 3,
        "refused": 2,
        "status_of": [130, 2, 1, 5],  # Ctrl-C, a refusal, a crash; ended by another process
    }


def test_decoding_processes_that_cannot_start_end_the_run_with_one_line_and_lose_nothing(
    video_root, tiny_ckpt, tmp_path, reference_run
):
    """It ended with a traceback; now one `error:` line says why, what to do and what is kept,
    and the same command, once processes can start, evaluates the videos left."""
    args = [
        "--config=configs/tiny.py",
        f"--config.checkpoint={tiny_ckpt[0]}",
        f"--config.data.root={video_root}",
        "--config.batch_size=2",
        "--config.data.workers=1",
        "--config.compilation_cache_dir=",
        "--config.progress=False",
        f"--workdir={tmp_path}",
    ]
    run = [*pools_refusing_after(6), "run_eval.py", *args]  # 6 videos decoded, then none
    failed = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr
    kept = kept_count(tmp_path / PARTIAL)
    assert 0 < kept <= 6
    assert failed.stderr == (
        f"{NO_DECODING_PROCESSES}The results of {kept} videos are kept in {tmp_path / PARTIAL}; "
        "run the same command again to evaluate the others (results.json comes at the end).\n"
    )
    again = subprocess.run(
        [sys.executable, "run_eval.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["counts"]["resumed"] == kept and results["counts"]["evaluated"] == 20
    for got, want in zip(read_predictions(tmp_path), reference_run[1], strict=True):
        assert got["path"] == want["path"] and got["top5"] == want["top5"]
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
