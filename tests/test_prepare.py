"""Prepared datasets: writing, resuming, bit-identical evaluation, training with exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import Mock

import chex
import numpy as np
import pytest
from absl import flags
from conftest import (
    TINY_CONFIGS,
    child_pids,
    free_port,
    held_here,
    process_running,
    random_params,
    run_processes,
)
from test_eval import config_for, keep, make_folder, read_predictions
from test_train import TWO_DEVICES, scripted_step, tiny_config, train_two_processes

from stam_jax import checkpoints, create_model
from stam_jax.cli import parse_flags
from stam_jax.data import prepare as prepare_module
from stam_jax.data.folder import list_videos
from stam_jax.data.loader import _start_error
from stam_jax.data.prepare import STOP_HOOK, prepare
from stam_jax.data.prepared import META_FILE, SPLITS, PreparedError, open_checked, open_prepared
from stam_jax.data.synthetic import index_frame, write_video
from stam_jax.data.video import ClipSpec
from stam_jax.evaluate import EvalConfigError, evaluate
from stam_jax.partial import PARTIAL, kept_count
from stam_jax.train import KILL_HOOK, TrainConfigError, train_and_evaluate

ROOT = Path(__file__).resolve().parent.parent
SPEC = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32)  # configs/tiny.py
TRAIN_SPEC = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32, short_videos="pad")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """12 videos: 10 good ones, one too short for a 4-frame clip, one empty file.

    And entries the listing leaves out: a hidden folder in the root and in a class (with a
    video), and a non-video file.
    """
    root = make_folder(tmp_path_factory.mktemp("videos"), per_class=1)
    write_video(root / "class_2" / "short.mp4", (index_frame(i, 48, 64) for i in range(5)), 10)
    (root / "class_3" / "zero.mp4").write_bytes(b"")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "class_1" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "class_1" / "video_0.mp4", root / "class_1" / ".ipynb_checkpoints")
    (root / "class_5" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoints.save(path, create_model("stam_tiny"), random_params(TINY_CONFIGS["tiny"], seed=4))
    return path


def run(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def prepare_cli(src, out, *extra, env=None, timeout=600) -> subprocess.CompletedProcess:
    args = ["-m", "stam_jax.data.prepare", f"--src={src}", f"--out={out}"]
    command = [*args, "--config=configs/tiny.py", "--config.progress=False", *extra]
    return run(command, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def prepared_raw(videos, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("prepared") / "eval_raw"
    result = prepare_cli(videos, out, "--workers=2", "--shard_size=4")
    return out, result


@pytest.fixture(scope="module")
def from_videos(videos, ckpt, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("from_videos")
    results = evaluate(config_for(ckpt, videos, batch_size=3), workdir)
    return results, read_predictions(workdir)


def test_cli_writes_a_tfds_dataset_and_records_skipped_videos(prepared_raw, videos):
    out, result = prepared_raw
    assert result.returncode == 3, result.stderr[-3000:]  # finished, some videos skipped
    assert "prepared 10 of 12 videos" in result.stdout
    assert "skipped class_2/short.mp4" in result.stderr
    meta = json.loads((out / META_FILE).read_text())
    assert meta["complete"] and meta["kind"] == "eval" and meta["encoding"] == "raw"
    assert meta["counts"] == {"listed": 12, "records": 10, "dropped_too_short": 1, "failed": 1}
    assert not (out / ".prepare").exists()
    # What the listing left out is stored (and printed), so evaluations can report it.
    assert meta["ignored"] == [
        [".ipynb_checkpoints", "hidden", ""],
        ["class_1/.ipynb_checkpoints", "hidden", ""],
        # the official loader would list this one (results.json `official_listing`)
        ["class_1/.ipynb_checkpoints/video_0.mp4", "in_hidden", ""],
        ["class_5/notes.txt", "not_video", ""],
    ]
    assert "ignored 2 hidden or system entries: .ipynb_checkpoints" in result.stdout
    assert (
        "ignored 1 video files inside hidden folders: class_1/.ipynb_checkpoints/video_0.mp4"
        in result.stdout
    )
    assert "ignored 1 files without a video extension: class_5/notes.txt" in result.stdout
    # A standard TFDS dataset: any TFDS reader opens it, without TensorFlow.
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["label"].names == [f"class_{c}" for c in range(10)]
    assert [d["path"] for d in builder.info.metadata["dropped"]] == ["class_2/short.mp4"]
    assert [d["path"] for d in builder.info.metadata["failed"]] == ["class_3/zero.mp4"]
    assert builder.info.metadata["failed"][0]["reason"].endswith(  # as listed: not absolute
        "Invalid data found when processing input: 'class_3/zero.mp4'"
    )
    assert len(builder.info.metadata["ignored"]) == 4
    assert len(builder.info.splits["validation"].shard_lengths) == 3  # 4 + 4 + 2 records
    source = builder.as_data_source(split="validation")
    listing = meta["items"]
    indices = [int(source[i]["index"]) for i in range(len(source))]
    assert indices == sorted(indices) and len(indices) == 10
    for i in range(len(source)):
        record = source[i]
        path, label = listing[int(record["index"])]
        assert record["path"].decode() == path and record["label"] == label
        assert record["frames"].shape == (1, 4, 32, 32, 3)
    assert "tensorflow" not in sys.modules


def test_raw_prepared_evaluation_is_bit_identical(prepared_raw, from_videos, ckpt, tmp_path):
    out, _ = prepared_raw
    # run_eval.py, with grain reading in 2 worker processes.
    args = ["run_eval.py", "--config=configs/tiny.py", f"--config.checkpoint={ckpt}"]
    args += [f"--config.data.root={out}", "--config.batch_size=3", "--config.data.workers=2"]
    args += ["--config.progress=False", "--config.compilation_cache_dir=", f"--workdir={tmp_path}"]
    result = run(args)
    assert result.returncode == 3, result.stderr[-3000:]  # 3: two videos were skipped
    results = json.loads((tmp_path / "results.json").read_text())
    want_results, want = from_videos
    assert read_predictions(tmp_path) == want  # paths, labels, top-5 and every logit, exactly
    for key in ("metrics", "counts", "dropped", "failed", "classes", "empty_classes", "ignored"):
        assert results[key] == want_results[key], key
    # not {} for the prepared copy
    assert set(results["ignored"]) == {"hidden", "in_hidden", "not_video"}
    assert results["timing"]["input_wait_s"] >= 0
    # grain's workers are stopped and their shared memory freed before exit (reading.close):
    # before that, this run printed the resource tracker's warning (6 runs of 6).
    assert "leaked shared_memory" not in result.stderr, result.stderr[-3000:]


def test_jpeg_prepared_evaluation_agrees(videos, from_videos, ckpt, tmp_path):
    meta = prepare(videos, tmp_path / "jpeg", SPEC, encoding="jpeg", workers=0, progress=False)
    assert meta["counts"]["records"] == 10
    # The results an interrupted run on the videos kept are not finished from JPEG frames (the
    # listing is the same): that mixed the two in one results.json.
    keep(tmp_path / "eval", 0, config_for(ckpt, videos), [1], np.zeros((1, 10)))
    with pytest.raises(EvalConfigError, match="frames: 'raw' then, 'JPEG \\(quality 95\\)' now"):
        evaluate(config_for(ckpt, tmp_path / "jpeg", batch_size=3), tmp_path / "eval")
    shutil.rmtree(tmp_path / "eval" / PARTIAL)
    evaluate(config_for(ckpt, tmp_path / "jpeg", batch_size=3), tmp_path / "eval")
    got, want = read_predictions(tmp_path / "eval"), from_videos[1]
    assert [p["path"] for p in got] == [p["path"] for p in want]
    agree = np.mean([g["top5"][0] == w["top5"][0] for g, w in zip(got, want, strict=True)])
    assert agree >= 0.99
    logits = np.array([p["logits"] for p in got]), np.array([p["logits"] for p in want])
    np.testing.assert_allclose(*logits, atol=0.1)
    assert not np.array_equal(*logits)  # lossy, as it should be


def test_an_interrupted_prepare_resumes_to_the_same_dataset(videos, ckpt, tmp_path):
    out = tmp_path / "resumed"
    args = ["--workers=0", "--shard_size=3"]
    # Its decoding processes end with it: they outlived a SIGKILL, waiting for work forever
    # while holding its stdout and stderr, so this run did not return (the timeout).
    killed = prepare_cli(videos, out, *args, "--workers=2", env={STOP_HOOK: "2"}, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / ".prepare").glob("*.json")) == [
        "part-00000.json",
        "part-00001.json",
    ]
    with pytest.raises(EvalConfigError, match=r"unfinished \(2 of 4 shards prepared\); run"):
        evaluate(config_for(ckpt, out), tmp_path / "eval")
    resumed = prepare_cli(videos, out, *args)
    assert resumed.returncode == 3, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "2 of 4 shards" in resumed.stdout
    straight = tmp_path / "straight"
    prepare(videos, straight, SPEC, workers=0, shard_size=3, progress=False)
    names = sorted(p.name for p in straight.iterdir() if "array_record" in p.name)
    assert names == sorted(p.name for p in out.iterdir() if "array_record" in p.name)
    assert len(names) == 4
    # The same records (their serialized bytes differ: protobuf map order is not fixed).
    got, want = open_prepared(out).data_source(), open_prepared(straight).data_source()
    assert len(got) == len(want) == 10
    for i in range(len(want)):
        a, b = got[i], want[i]
        assert (a["index"], a["label"], a["path"]) == (b["index"], b["label"], b["path"])
        np.testing.assert_array_equal(a["frames"], b["frames"])
    assert (out / META_FILE).read_bytes() == (straight / META_FILE).read_bytes()


def test_decoding_processes_end_when_preparing_fails(videos, tmp_path, monkeypatch):
    import stam_jax.data.prepare as prepare_module

    before = child_pids()
    write_part = prepare_module._write_part

    def disk_full_at_the_second_shard(parts, shard, results, bar):
        if shard == 1:
            raise OSError("No space left on device")
        write_part(parts, shard, results, bar)

    monkeypatch.setattr(prepare_module, "_write_part", disk_full_at_the_second_shard)
    with pytest.raises(OSError, match="No space left") as failed:
        prepare(videos, tmp_path / "full", SPEC, workers=2, shard_size=3, progress=False)
    # `failed` holds the traceback, so prepare's frame and its decoder are still alive.
    assert "prepare" in [entry.name for entry in failed.traceback]
    assert child_pids() == before
    assert (tmp_path / "full" / ".prepare" / "part-00000.json").exists()  # kept for a resume


def test_prepare_refuses_what_it_should(videos, prepared_raw, tmp_path):
    out, _ = prepared_raw
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(PreparedError, match="not a prepared dataset"):
        prepare(videos, foreign, SPEC, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(PreparedError, match="a_file is a file, not a folder; give another"):
        prepare(videos, tmp_path / "a_file", SPEC, progress=False)
    assert (tmp_path / "a_file").read_text() == "mine"
    with pytest.raises(PreparedError, match="--encoding: there 'raw', now 'jpeg'"):
        prepare(videos, out, SPEC, encoding="jpeg", shard_size=4, progress=False)
    # Each sampling field that differs, by its flag (was the two whole ClipSpecs, to compare).
    other = dataclasses.replace(SPEC, frame_rate=2.0, num_clips=2)
    with pytest.raises(PreparedError) as info:
        prepare(videos, out, other, shard_size=4, progress=False)
    assert (
        "settings (--config.data.frame_rate: there 4.0, now 2.0; --config.data.num_clips: "
        "there 1, now 2); use another --out" in str(info.value)
    )
    again = prepare(videos, out, SPEC, shard_size=4, progress=False)  # done: nothing to do
    assert again["complete"]
    for kwargs, message in [
        ({"kind": "test"}, "--kind 'test'"),
        ({"encoding": "png"}, "--encoding 'png'"),
        ({"encoding": "jpeg", "jpeg_quality": 0}, "--jpeg_quality 0"),
        ({"jpeg_quality": 95}, "--jpeg_quality 95 with --encoding raw"),  # was ignored
    ]:
        with pytest.raises(PreparedError, match=message):
            prepare(videos, tmp_path / "x", SPEC, progress=False, **kwargs)
    with pytest.raises(PreparedError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "y", SPEC, progress=False)


def one_video(videos: Path, root: Path, classes: tuple[str, ...] = ("a",)) -> Path:
    """A video folder of one video in each of `classes`."""
    for name in classes:
        (root / name).mkdir(parents=True)
        shutil.copy(videos / "class_0" / "video_0.mp4", root / name / "v.mp4")
    return root


def test_numbers_are_refused_just_past_their_limits(videos, tmp_path):
    # Quality 1-100, shards of one video or more, -1 or more workers: the first value outside
    # is refused before anything is written, the limits themselves are taken.
    for kwargs, message in [
        ({"encoding": "jpeg", "jpeg_quality": 101}, "--jpeg_quality 101; use 1-100"),
        ({"shard_size": 0}, "--shard_size 0; use >= 1."),
        ({"workers": -2}, "--workers -2; use -1 (one decoding process per core), 0"),
    ]:
        with pytest.raises(PreparedError, match=re.escape(message)):
            prepare(videos, tmp_path / "x", SPEC, progress=False, **kwargs)
    assert not (tmp_path / "x").exists()
    src = one_video(videos, tmp_path / "src")
    for quality in (1, 100):
        out = tmp_path / f"q{quality}"
        meta = prepare(
            src,
            out,
            SPEC,
            encoding="jpeg",
            jpeg_quality=quality,
            workers=0,
            shard_size=1,
            progress=False,
        )
        assert meta["counts"]["records"] == 1 and meta["jpeg_quality"] == quality
        assert open_prepared(out).frames == f"JPEG (quality {quality})"


def test_frames_are_stored_at_the_jpeg_quality_asked_for(videos, tmp_path):
    src = one_video(videos, tmp_path / "src")
    frames = {}
    for quality in (10, 95):
        out = tmp_path / f"q{quality}"
        prepare(src, out, SPEC, encoding="jpeg", jpeg_quality=quality, workers=0, progress=False)
        frames[quality] = open_prepared(out).data_source()[0]["frames"]
    low, high = (sum(len(f) for f in frames[q]) for q in (10, 95))
    assert len(frames[10]) == len(frames[95]) == SPEC.num_frames and low < high / 2, (low, high)
    meta = prepare(src, tmp_path / "raw", SPEC, workers=0, progress=False)
    assert meta["jpeg_quality"] is None  # raw frames have no quality


def test_a_class_name_with_a_carriage_return_is_refused(videos, tmp_path):
    # TFDS reads the label names back as text, where a lone '\r' ends a line as '\n' does.
    src = one_video(videos, tmp_path / "src", ("ok", "car\rriage"))
    with pytest.raises(PreparedError, match=r"^class name\(s\) 'car\\rriage' cannot be stored"):
        prepare(src, tmp_path / "out", SPEC, workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_skipped_videos_are_listed_in_order_and_a_shard_of_none_has_no_file(videos, tmp_path):
    # 11 videos, the 3rd and the 11th empty files; shards of 2: the last holds none.
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(11):
        path = src / "a" / f"v{i:02d}.mp4"
        if i in (2, 10):
            path.write_bytes(b"")
        else:
            shutil.copy(videos / "class_0" / "video_0.mp4", path)
    out = tmp_path / "out"
    meta = prepare(src, out, SPEC, workers=0, shard_size=2, progress=False)
    assert meta["counts"] == {"listed": 11, "records": 9, "dropped_too_short": 0, "failed": 2}
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    failed = [entry["path"] for entry in builder.info.metadata["failed"]]
    assert failed == ["a/v02.mp4", "a/v10.mp4"]  # by position, not as text ('10' < '2')
    names = sorted(p.name for p in out.iterdir() if "array_record" in p.name)
    assert names == [f"stam_videos-validation.array_record-{k:05d}-of-00005" for k in range(5)]
    assert builder.info.splits["validation"].shard_lengths == [2, 1, 2, 2, 2]
    source = open_prepared(out).data_source()
    assert [int(source[i]["index"]) for i in range(len(source))] == [0, 1, 3, 4, 5, 6, 7, 8, 9]


def test_a_finish_stopped_after_naming_the_shards_is_finished_again(videos, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    src = one_video(videos, tmp_path / "src", ("a", "b"))
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(tfds.folder_dataset, "write_metadata", Mock(side_effect=KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            prepare(src, out, SPEC, workers=0, shard_size=1, progress=False)
    assert len([p for p in out.iterdir() if "array_record" in p.name]) == 2  # named already
    assert prepare(src, out, SPEC, workers=0, shard_size=1, progress=False)["num_records"] == 2
    source = open_prepared(out).data_source()
    assert [int(source[i]["index"]) for i in range(len(source))] == [0, 1]


def test_a_shard_whose_rename_failed_is_prepared_again(videos, tmp_path, monkeypatch):
    # A shard is done once its sidecar is written, which comes after its records are in place:
    # a run stopped between the two redoes the shard, and the dataset has all its records.
    replace = os.replace

    def full_at_the_second_shard(a, b):
        if str(b).endswith("part-00001.array_record"):
            raise OSError(28, "No space left on device")
        replace(a, b)

    src = one_video(videos, tmp_path / "src", ("a", "b", "c"))
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module.os, "replace", full_at_the_second_shard)
        with pytest.raises(OSError, match="No space left"):
            prepare(src, out, SPEC, workers=0, shard_size=1, progress=False)
    assert sorted(p.name for p in (out / ".prepare").glob("*.json")) == ["part-00000.json"]
    meta = prepare(src, out, SPEC, workers=0, shard_size=1, progress=False)
    assert meta["num_records"] == 3
    source = open_prepared(out).data_source()
    assert [int(source[i]["index"]) for i in range(len(source))] == [0, 1, 2]


def test_a_video_changed_since_prepare_is_refused(videos, tmp_path):
    # A re-run used to find the dataset "already prepared" (or resume it) from the list of
    # paths alone: a video replaced or fixed since kept its old record, or its old failure.
    src = tmp_path / "videos"
    shutil.copytree(videos, src)
    out = tmp_path / "out"
    prepare(src, out, SPEC, workers=0, shard_size=4, progress=False)
    first = sorted(p for p in src.rglob("*") if p.is_file())[0]
    stat = first.stat()
    name = first.relative_to(src).as_posix()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(PreparedError) as info:
        prepare(src, out, SPEC, workers=0, shard_size=4, progress=False)
    assert str(info.value) == (
        f"1 of the videos under {src} changed since {out} was prepared (their size or "
        f"modification time differ): {name}; its records were made from the files as they "
        "were: use another --out, or delete it to start over."
    )
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as it was: nothing to do
    assert prepare(src, out, SPEC, workers=0, shard_size=4, progress=False)["complete"]


def test_a_video_renamed_since_prepare_is_refused(videos, tmp_path):
    # A rename keeps the size and modification time: the listing itself tells.
    src = one_video(videos, tmp_path / "src", ("a", "b", "c", "d", "e"))
    out = tmp_path / "out"
    prepare(src, out, SPEC, workers=0, progress=False)
    os.rename(src / "b" / "v.mp4", src / "b" / "w.mp4")
    with pytest.raises(PreparedError) as info:
        prepare(src, out, SPEC, workers=0, progress=False)
    # It said "since OUT was started" of a finished dataset, and named no video.
    assert str(info.value) == (
        f"the videos under {src.resolve()} changed since {out} was prepared (5 listed then, 5 "
        "now; gone or relabelled: b/v.mp4; new or relabelled: b/w.mp4); use another --out, or "
        "delete it to start over."
    )
    for name in "acde":
        os.remove(src / name / "v.mp4")
    with pytest.raises(PreparedError) as info:
        prepare(src, out, SPEC, workers=0, progress=False)
    assert (
        "(5 listed then, 1 now; gone or relabelled: a/v.mp4, b/v.mp4, c/v.mp4 and 2 more; "
        "new or relabelled: b/w.mp4; empty class folders new: a, c, d and 1 more); use another "
        "--out, or delete it to start over." in str(info.value)
    )


def test_classes_changed_since_prepare_are_named_with_how_to_go_on(videos, tmp_path):
    # A new (empty) class folder, or a class list of one more class, was "the videos ...
    # changed (5 listed then, 5 now)", naming nothing, with deleting the dataset as the fix.
    src = one_video(videos, tmp_path / "src", ("a", "b", "c", "d", "e"))
    out = tmp_path / "out"
    prepare(src, out, SPEC, workers=0, progress=False)
    (src / "f").mkdir()
    with pytest.raises(PreparedError) as info:
        prepare(src, out, SPEC, workers=0, progress=False)
    assert str(info.value) == (
        f"the videos or classes under {src.resolve()} changed since {out} was prepared (5 videos "
        "and 5 classes listed then, 5 and 6 now; classes new: f; empty class folders new: f); "
        "restore them (--config.data.class_list, or the class folders) to go on, or use "
        "another --out."
    )
    (src / "f").rmdir()
    prepare(src, out, SPEC, workers=0, progress=False)  # as it was: goes on


def test_class_names_tfds_cannot_keep_and_no_videos_are_refused(videos, tmp_path):
    # TFDS keeps label names one per line, stripped: 'new\nline' became two classes and every
    # later label named the wrong class.
    src = tmp_path / "videos"
    one = next(p for p in videos.rglob("*.mp4"))
    for name in ("ok", "new\nline", "trailing "):
        (src / name).mkdir(parents=True)
        shutil.copy(one, src / name / "v.mp4")
    with pytest.raises(PreparedError) as info:
        prepare(src, tmp_path / "out", SPEC, workers=0, progress=False)
    assert str(info.value) == (
        "class name(s) 'new\\nline', 'trailing ' cannot be stored in a TFDS dataset (its label "
        "names are kept one per line, without spaces at either end); rename those class folders "
        "(or their lines in --config.data.class_list). Nothing was written."
    )
    assert not (tmp_path / "out").exists()
    # Files that are not videos: refused, and what the job had written is gone.
    junk = tmp_path / "junk"
    for name in ("a", "b"):
        (junk / name).mkdir(parents=True)
        (junk / name / "v.mp4").write_text("not a video")
    with pytest.raises(PreparedError, match=r"none of the 2 videos .* nothing was kept in"):
        prepare(junk, tmp_path / "out", SPEC, workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_names_that_are_not_utf8_are_prepared(videos, tmp_path):
    # Latin-1 names (an old zip archive): Python lists them with surrogate escapes, which TFDS
    # could not encode; preparing stopped with a traceback at the first such video.
    src = tmp_path / "src"
    try:
        for name in [b"caf\xe9"] + [b"d%d" % c for c in range(1, 10)]:  # the tiny model's 10
            os.makedirs(os.fsencode(src) + b"/" + name)
    except OSError:  # a file system that only takes UTF-8 names (macOS)
        pytest.skip("this file system refuses names that are not UTF-8")
    for name in (b"caf\xe9/v\xe9.mp4", b"d1/v.mp4"):
        shutil.copy(videos / "class_0" / "video_0.mp4", os.fsencode(src) + b"/" + name)
    meta = prepare(src, tmp_path / "out", SPEC, workers=0, progress=False)
    assert meta["counts"]["records"] == 2
    assert meta["classes"][:2] == ["caf\udce9", "d1"]  # the folder names themselves
    assert meta["items"][0] == ["caf\udce9/v\udce9.mp4", 0]
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(tmp_path / "out"))
    assert builder.info.features["label"].names[:2] == ["caf\\xe9", "d1"]
    assert builder.as_data_source(split="validation")[0]["path"] == b"caf\\xe9/v\\xe9.mp4"
    # Evaluation reads the listing, which is the videos' own (paths, labels, classes).
    prepared, listed = open_prepared(tmp_path / "out").folder, list_videos(src)
    assert (prepared.classes, prepared.items) == (listed.classes, listed.items)


def prepare_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m stam_jax.data.prepare --config=configs/tiny.py ARGS`, in this process.

    Returns (exit status, stdout, stderr).
    """
    argv = ["prepare", f"--config={ROOT / 'configs/tiny.py'}", "--config.progress=False", *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads --config.* overrides there
    values = flags.FlagValues()
    prepare_module.define_flags(values)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        prepare_module.main(parse_flags(argv, values), values)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def refused(monkeypatch, capsys, *args: str) -> str:
    """The one `error:` line of a prepare command that must exit 2."""
    code, out, err = prepare_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, out, err)
    return err


def test_cli_flag_errors_are_one_line_and_exit_2(videos, tmp_path, monkeypatch, capsys):
    # Were a 40-55 line traceback (config) or absl's FATAL line (flags), with exit 1; a stray
    # argument was ignored.
    src, out = f"--src={videos}", f"--out={tmp_path / 'out'}"
    assert "unknown config field 'rot' (--config.data.rot)" in refused(
        monkeypatch, capsys, src, out, "--config.data.rot=3"
    )
    assert "--kind=trian: value should be one of <eval|train>" in refused(
        monkeypatch, capsys, src, out, "--kind=trian"
    )
    assert "unexpected arguments ['stray']" in refused(monkeypatch, capsys, src, out, "stray")
    assert "--src" in refused(monkeypatch, capsys, out)
    # -1 is one process per core, 0 this process: any other negative count is a mistake.
    assert "--workers=-5; use -1 (one decoding process per core), 0" in refused(
        monkeypatch, capsys, src, out, "--workers=-5"
    )
    assert "--config.data.workers=-2; use -1" in refused(
        monkeypatch, capsys, src, out, "--config.data.workers=-2"
    )
    # Was ignored: raw frames were written, as if no quality had been asked for.
    assert (
        "--jpeg_quality 50 with --encoding raw, which stores the frames as they are; add "
        "--encoding jpeg, or leave --jpeg_quality out."
        in refused(monkeypatch, capsys, src, out, "--jpeg_quality=50")
    )
    assert not (tmp_path / "out").exists()


def test_out_in_or_around_src_and_a_prepared_src_are_refused(
    videos, prepared_raw, tmp_path, monkeypatch, capsys
):
    # --out inside --src was accepted: the dataset became one more (empty) class of the videos.
    inside = videos / "prepared"
    err = refused(monkeypatch, capsys, f"--src={videos}", f"--out={inside}")
    assert f"--out {inside} is inside --src {videos}" in err
    assert not inside.exists()
    for out, where in [(videos, "is the same folder as"), (videos.parent, "contains")]:
        with pytest.raises(PreparedError, match=f"--out {out} {where} --src {videos}"):
            prepare(videos, out, SPEC, progress=False)
    linked = tmp_path / "link"  # compared resolved: a link to the videos is the same folder
    linked.symlink_to(videos)
    with pytest.raises(PreparedError, match="is inside --src"):
        prepare(videos, linked / "out", SPEC, progress=False)
    err = refused(monkeypatch, capsys, f"--src={prepared_raw[0]}", f"--out={tmp_path / 'again'}")
    assert f"--src {prepared_raw[0]} is already a prepared dataset (it holds {META_FILE}" in err
    assert f"made from {videos}" in err


def test_an_out_that_cannot_be_written_is_refused(videos, tmp_path, monkeypatch, capsys):
    # Were PermissionError / NotADirectoryError tracebacks.
    (tmp_path / "file").write_text("")
    err = refused(monkeypatch, capsys, f"--src={videos}", f"--out={tmp_path / 'file' / 'x'}")
    assert f"cannot write --out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file" in err
    with monkeypatch.context() as patch:  # tests run as root, who may write anywhere
        patch.setattr(prepare_module.os, "access", lambda path, mode: False)
        err = refused(monkeypatch, capsys, f"--src={videos}", f"--out={tmp_path / 'a' / 'b'}")
    assert f"cannot write --out {tmp_path / 'a' / 'b'}: {tmp_path} is not writable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_out_another_job_is_preparing_is_refused(videos, tmp_path, monkeypatch, capsys):
    from stam_jax.paths import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE.format(process=0)
    with held_here(out) as in_use:
        err = refused(monkeypatch, capsys, f"--src={videos}", f"--out={out}")
        assert err == f"error: --out {out}{in_use}\n"
        assert os.listdir(out) == [lock.name]
    # A job killed as soon as it had claimed the folder leaves only the claim's file: that is
    # not a folder of something else, and the next job prepares it.
    lock.write_text("")
    meta = prepare(videos, out, SPEC, workers=0, shard_size=4, progress=False)
    assert meta["complete"] and not lock.exists()


_NO_PROCESSES = _start_error(BlockingIOError(11, "Resource temporarily unavailable"))


@pytest.mark.parametrize(
    "stop, code, how",
    [
        (KeyboardInterrupt(), 130, "interrupted"),  # was a KeyboardInterrupt traceback
        # A full disk was an OSError traceback (exit 1) saying nothing of what was kept.
        (
            OSError(28, "No space left on device"),
            1,
            "error: stopped by [Errno 28] No space left on device",
        ),
        # A system that can start no decoding process was a DecoderStartError traceback.
        (
            _NO_PROCESSES,
            1,
            f"error: {_NO_PROCESSES} Stopped",
        ),
    ],
)
def test_ctrl_c_or_a_full_disk_says_how_far_it_got_and_how_to_resume(
    stop, code, how, videos, tmp_path, monkeypatch, capsys
):
    write_part = prepare_module._write_part

    def stopped_in_the_second_shard(parts, shard, results, bar):
        if shard == 1:
            raise stop
        write_part(parts, shard, results, bar)

    monkeypatch.setattr(prepare_module, "_write_part", stopped_in_the_second_shard)
    out = tmp_path / "out"
    # 12 videos in shards of 5: 3 shards, the last of 2.
    args = f"--src={videos}", f"--out={out}", "--workers=0", "--shard_size=5"
    assert prepare_main(monkeypatch, capsys, *args)[::2] == (
        code,
        f"{how}: 1 of 3 shards of {out} are prepared and kept; run the same command again to "
        "resume.\n",
    )


def test_empty_classes_and_ignored_entries_are_kept_and_printed(
    videos, tmp_path, monkeypatch, capsys
):
    src = tmp_path / "src"
    (src / "class_a").mkdir(parents=True)
    (src / "class_b" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(videos / "class_0" / "video_0.mp4", src / "class_a")
    out = tmp_path / "out"
    code, stdout, _ = prepare_main(
        monkeypatch, capsys, f"--src={src}", f"--out={out}", "--workers=0"
    )
    assert code == 0
    assert "1 of 2 classes have no video (their labels are kept): class_b" in stdout
    assert "ignored 1 hidden or system entries: class_b/.ipynb_checkpoints" in stdout
    folder = open_prepared(out).folder
    assert folder.empty_classes == ("class_b",)
    assert [(i.path, i.reason) for i in folder.ignored] == [
        ("class_b/.ipynb_checkpoints", "hidden")
    ]
    # A dataset prepared before 'ignored' was stored still opens (with nothing ignored).
    meta = json.loads((out / META_FILE).read_text())
    del meta["ignored"]
    (out / META_FILE).write_text(json.dumps(meta))
    assert open_prepared(out).folder.ignored == ()
    code, stdout, _ = prepare_main(monkeypatch, capsys, f"--src={src}", f"--out={out}")
    assert code == 0 and "nothing to do" in stdout and "\nignored" not in stdout


def test_a_prepared_dataset_missing_a_record_file_or_part_of_one_is_refused(
    prepared_raw, ckpt, tmp_path
):
    # A copy that stopped part-way failed mid-run, after the compile, with a traceback from
    # inside grain ("open() failed", "ArrayRecord file should be at least 64KB big").
    out, _ = prepared_raw
    shards = sorted(p.name for p in out.glob("*.array_record-*"))
    assert len(shards) >= 2
    missing, truncated = tmp_path / "missing", tmp_path / "truncated"
    for copy in (missing, truncated):
        shutil.copytree(out, copy)
    (missing / shards[1]).unlink()
    with open(truncated / shards[0], "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    n = len(shards)
    for copy, problem in (
        (missing, rf"{re.escape(shards[1])} is missing \(shard 2 of {n}\)"),
        (truncated, rf"{re.escape(shards[0])} (cannot be read|holds \d+ records where)"),
    ):
        with pytest.raises(
            EvalConfigError,
            match=rf"^--config\.data\.root: .*{copy.name} is damaged: {problem}.*; copy the "
            r"dataset again, or prepare it again\.$",
        ):
            evaluate(config_for(ckpt, copy), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluation_refuses_a_mismatched_prepared_dataset(prepared_raw, ckpt, tmp_path):
    out, _ = prepared_raw
    # Named by the flags to set (were the bare field names).
    with pytest.raises(
        EvalConfigError, match=r"\(--config.data.frame_rate: prepared 4.0, asked 2.0\)"
    ):
        evaluate(config_for(ckpt, out, **{"data.frame_rate": 2.0}), tmp_path)
    with pytest.raises(EvalConfigError, match=r"--config.data.num_crops: prepared 1, asked 3"):
        evaluate(config_for(ckpt, out, **{"data.num_crops": 3}), tmp_path)


@pytest.fixture(scope="module")
def prepared_train(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "train_raw"
    meta = prepare(videos, out, TRAIN_SPEC, kind="train", workers=0, progress=False)
    # Training keeps short videos (their last frame repeats); only the empty file fails.
    assert meta["counts"] == {"listed": 12, "records": 11, "dropped_too_short": 0, "failed": 1}
    dataset = open_prepared(out)
    record = dataset.data_source()[0]
    assert record["frames"].shape[1:] == (36, 48, 3)  # resized (shorter side 36), not cropped
    return out


def train_command(root: Path, workdir: Path, cache: Path, workers: int = 0) -> list[str]:
    return [
        "run_train.py",
        "--config=configs/tiny.py",
        f"--config.train.root={root}",
        f"--workdir={workdir}",
        "--config.batch_size=4",
        "--config.train.steps=8",
        "--config.train.save_every=3",
        "--config.train.log_every=4",
        "--config.train.warmup_steps=2",
        f"--config.data.workers={workers}",
        "--config.progress=False",
        f"--config.compilation_cache_dir={cache}",
    ]


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_cache")


@pytest.fixture(scope="module")
def straight(prepared_train, train_cache, tmp_path_factory) -> Path:
    """8 steps in one process with two devices: the reference for the resumed and 2-process runs."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run(train_command(prepared_train, workdir, train_cache), env=TWO_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_training_from_a_prepared_dataset_resumes_exactly(
    prepared_train, train_cache, straight, tmp_path
):
    data = json.loads((straight / "checkpoints/3/data/metadata").read_text())
    assert json.loads(data["grain"][0])["last_seen_indices"] == {"0": 11}  # 3 steps x 4 clips

    # Killed while saving step 6, resumed from step 3's params and data position.
    command = train_command(prepared_train, tmp_path, train_cache)
    killed = run(command, env={KILL_HOOK: "6", **TWO_DEVICES})
    assert killed.returncode == -signal.SIGKILL
    refused = run(train_command(prepared_train, tmp_path, train_cache, workers=2))
    assert refused.returncode == 2 and "--config.data.workers=0" in refused.stderr
    resumed = run(command, env=TWO_DEVICES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = checkpoints.load(straight / "final")[1]
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "final")[1], want)


def test_grain_workers_give_the_same_clips(prepared_train):
    from stam_jax.data import reading

    dataset = open_prepared(prepared_train)
    spec = dataclasses.replace(TRAIN_SPEC, crop=24, train_min_area=0.3)

    def clips(workers: int) -> list[dict]:
        stream = reading.batches(iter(reading.train_loader(dataset, spec, 7, 3, workers, 4)), 3)
        return [next(stream) for _ in range(6)]  # 18 clips: more than an epoch of 11

    serial, parallel = clips(0), clips(2)
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert serial[0]["video"].shape == (3, 4, 24, 24, 3)
    # Every record comes once per epoch: the first 11 clips hold each label as often as the data.
    labels = np.concatenate([b["label"] for b in serial])[:11]
    items = dataset.folder.items
    want = [item.label for i, item in enumerate(items) if i not in dataset.outcomes]
    assert sorted(labels.tolist()) == sorted(want)


_READER = """
import multiprocessing, os, signal, sys, threading, time

from stam_jax.data import reading
from stam_jax.data.prepared import open_prepared
from stam_jax.data.video import ClipSpec

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    started = threading.Event()

    def ctrl_c():  # a terminal's Ctrl-C, to the reading processes only, from their start on
        while not started.is_set():
            for child in multiprocessing.active_children():
                if child.name.startswith("grain-process-prefetch") and child.pid:
                    os.kill(child.pid, signal.SIGINT)
            time.sleep(0.02)

    threading.Thread(target=ctrl_c, daemon=True).start()
    spec = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32, short_videos="pad")
    clips = iter(reading.train_loader(open_prepared(sys.argv[1]), spec, 0, 2, 1, 2))
    for _ in range(4):
        next(clips)
    started.set()
    print(*(child.pid for child in multiprocessing.active_children()), flush=True)
    time.sleep(600)
"""


def test_grain_reading_processes_leave_ctrl_c_to_the_parent_and_end_with_it(prepared_train):
    # They printed a KeyboardInterrupt traceback each on a Ctrl-C (and ended, failing the
    # read), and outlived a SIGKILL of the parent, holding its stdout and stderr.
    process = subprocess.Popen(
        [sys.executable, "-c", _READER, str(prepared_train)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
    finally:
        process.kill()
    deadline = time.monotonic() + 10
    while (alive := [p for p in pids if process_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert len(pids) == 1 and not alive, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err


# Put first on the PYTHONPATH of run_eval.py below: each process that multiprocessing spawns
# (grain's reading processes; not its resource tracker) takes a minute to start.
_SLOW_START = """
import sys, time

if "--multiprocessing-fork" in sys.orig_argv:
    time.sleep(60)
"""


def session_processes(session: int) -> list[int]:
    """The processes of `session` that run (neither ended nor ended and not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == session and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def left_after(session: int, within: float) -> dict[int, str]:
    """The processes of `session` still running `within` s from now ({pid: its stat line}).

    A process whose pipes have closed may still be in the kernel's exit path for a moment (its
    memory and files released, not yet a zombie: state R, no command line): seen under load on
    2 cores, gone 2-20 ms later.
    """
    deadline = time.monotonic() + within
    while (found := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = {}
    for pid in found:
        with contextlib.suppress(OSError):
            stats[pid] = Path(f"/proc/{pid}/stat").read_text().strip()
    return stats


def eval_in_own_session(
    tmp_path: Path, site: str, data: Path, ckpt: Path, *args: str
) -> subprocess.Popen:
    """`run_eval.py` of the tiny config on `data` into `tmp_path/out`, with `site` as its
    sitecustomize, in a session of its own (a terminal's Ctrl-C: SIGINT to its whole group)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(site)
    command = ["run_eval.py", "--config=configs/tiny.py", f"--config.checkpoint={ckpt}"]
    command += [f"--config.data.root={data}", f"--workdir={tmp_path / 'out'}", *args]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_ctrl_c_while_grain_reading_processes_start_stops_at_once(prepared_raw, ckpt, tmp_path):
    # A Ctrl-C waited for each reading process to start (importing grain, JAX and TFDS: 7-40 s
    # in all on a busy 2-core machine) and read a video before the command could end; here
    # they would take a minute. They are ended at once instead, having nothing to hand over.
    out, _ = prepared_raw
    process = eval_in_own_session(tmp_path, _SLOW_START, out, ckpt, "--config.data.workers=3")
    try:
        deadline = time.monotonic() + 300
        # The command, the resource tracker and the 3 reading processes.
        while len(session_processes(process.pid)) < 5:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        sent = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
        took = time.monotonic() - sent
        left = left_after(process.pid, within=2.0)  # a reading process would sleep 60 s
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted: no results were kept yet; the same command starts again."
    ], err
    assert took < 30, took  # 2-3 s measured on a busy 2-core machine; 60+ s before
    assert not left, left  # no reading process outlives the command


_SLOW_READS = """
import sys

if "--multiprocessing-fork" in sys.orig_argv:
    import time

    from stam_jax.data import reading

    read = reading._Records.__getitem__

    def slowly(self, i):
        if i > 1:  # the first batch (records 0 and 1) at once, then a record every 0.5 s
            time.sleep(0.5)
        return read(self, i)

    reading._Records.__getitem__ = slowly
"""


def test_a_read_video_is_taken_out_of_grains_element():
    # A thread of grain's may keep its last element after a Ctrl-C (in the frame of an error it
    # holds), and with it the video's shared-memory block, never unlinked.
    from stam_jax.data.reading import _DecodedItems

    element = {"index": np.int64(3), "views": np.zeros((1, 2, 4, 4, 3), np.uint8)}
    views = element["views"]
    item = next(_DecodedItems(iter([element])))
    assert item.position == 3 and item.views is views and item.status == "ok"
    assert "views" not in element


def test_ctrl_c_after_a_prepared_batch_leaves_no_shared_memory_behind(prepared_raw, ckpt, tmp_path):
    # Each video comes from grain's reading processes in a shared-memory block, unlinked when
    # the array is freed. After a Ctrl-C, the arrays still held (by the frames the interrupt
    # came up through, by grain's element in a thread of its own) were never freed, and
    # Python's resource tracker warned "There appear to be 1 leaked shared_memory objects to
    # clean up at shutdown" as the command ended (10 of 10 runs of benchmarks/ctrl_c_bench.py).
    out, _ = prepared_raw
    args = ["--config.data.workers=2", "--config.batch_size=2", "--config.progress=False"]
    process = eval_in_own_session(tmp_path, _SLOW_READS, out, ckpt, *args)
    workdir = tmp_path / "out"
    kept = workdir / PARTIAL / "p0.bin"
    try:
        deadline = time.monotonic() + 300
        while not (kept.exists() and kept.stat().st_size):  # the first batch is kept
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    count = kept_count(workdir / PARTIAL)
    assert 2 <= count < 10
    assert err.splitlines() == [
        f"interrupted: the results of {count} videos are kept in {workdir / PARTIAL}; run the "
        "same command again to evaluate the others (results.json comes at the end)."
    ], err


_STOPPED = """
import multiprocessing, os, pickle, sys, time

from stam_jax.data import reading
from stam_jax.data.video import ClipSpec


def child(transform, made, ready):
    pickle.loads(transform)  # as each grain reading process does, which readies it
    if made == "made":
        with reading._making():
            pass
    ready.set()
    time.sleep(60)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    transform = pickle.dumps(reading.EvalViews("raw", ClipSpec(4, 4.0, 36, 32)))
    ready = context.Event()
    process = context.Process(target=child, args=(transform, sys.argv[1], ready), daemon=True)
    process.start()
    assert ready.wait(120)
    os.kill(process.pid, reading.STOP_STARTING)
    process.join(5)
    print(process.exitcode)
"""


@pytest.mark.parametrize("made", ["nothing", "made"])
def test_a_reading_process_stops_on_stop_starting_only_before_its_first_element(made, tmp_path):
    # Ended while it has nothing to hand over; once it has made an element, it is left to end
    # when grain says (killed while handing one over, it could leave the parent waiting).
    (tmp_path / "stopped.py").write_text(_STOPPED)
    result = run([str(tmp_path / "stopped.py"), made], env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == {"nothing": "1\n", "made": "None\n"}[made]  # None: still running


def test_training_refuses_an_eval_dataset(prepared_raw, prepared_train, videos, tmp_path):
    from configs.tiny import get_config

    config = get_config()
    config.train.root = str(prepared_raw[0])
    config.train.steps, config.train.warmup_steps = 4, 1
    config.compilation_cache_dir = ""
    with pytest.raises(TrainConfigError, match="is an eval dataset"):
        train_and_evaluate(config, tmp_path)
    # A periodic-evaluation root that evaluation would refuse is refused before training.
    config.train.root = str(videos)
    config.train.eval_every, config.train.eval_root = 2, str(prepared_train)
    with pytest.raises(TrainConfigError, match=r"eval_root: .* is a train dataset"):
        train_and_evaluate(config, tmp_path)
    config.train.eval_every, config.train.warmup_steps = 0, 4
    with pytest.raises(TrainConfigError, match=r"warmup_steps=4: the warm-up must end before"):
        train_and_evaluate(config, tmp_path)


def test_processes_read_every_record_once_whatever_their_count(prepared_raw):
    """Each process reads consecutive records, as many as the others or one more, and together
    every record once: grain's DataLoader alone gave each process 10 // P records of 10, and
    left out 10 % P of them (one video with 3 processes, two with 4)."""
    from stam_jax.data.reading import eval_items

    dataset = open_prepared(prepared_raw[0])
    positions = dataset.record_positions()
    assert positions.tolist() == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]  # less short.mp4 and zero.mp4
    for count in (1, 2, 3, 4, 11):
        shares = [
            [item.position for item in eval_items(dataset, 0, 4, p, count)] for p in range(count)
        ]
        assert [p for share in shares for p in share] == positions.tolist(), count
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, count
    # Some of the records (what a resumed evaluation has left), shared out the same way.
    shares = [
        [item.position for item in eval_items(dataset, 0, 4, p, 2, [2, 5, 9])] for p in (0, 1)
    ]
    assert shares == [[3, 7], [11]]


def test_two_processes_read_their_shares(
    prepared_raw, videos, from_videos, ckpt, tmp_path, monkeypatch
):
    # Process 0 finishes what a one-process run on the videos themselves kept before it was
    # interrupted (its first batch: 2 videos and a too-short one, and the empty file the second
    # batch met); process 1 holds none (a workdir of its own): each reads only what is left of
    # the raw prepared copy.
    import stam_jax.evaluate as evaluate_module

    collect, calls = evaluate_module._collect, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:  # the second batch
            raise KeyboardInterrupt
        collect(*args)

    monkeypatch.setattr(evaluate_module, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config_for(ckpt, videos, batch_size=3), tmp_path / "0")
    monkeypatch.undo()
    assert kept_count(tmp_path / "0" / PARTIAL) == 4
    port = free_port()
    commands = [
        [
            sys.executable,
            "run_eval.py",
            "--config=configs/tiny.py",
            f"--config.checkpoint={ckpt}",
            f"--config.data.root={prepared_raw[0]}",
            "--config.batch_size=6",
            "--config.data.workers=0",
            "--config.progress=False",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={rank}",
            f"--workdir={tmp_path / str(rank)}",
        ]
        for rank in range(2)
    ]
    for returncode, _, err in run_processes(commands, devices_each=3):
        assert returncode == 3, err  # all evaluated but the two skipped at preparation
    results = json.loads((tmp_path / "0" / "results.json").read_text())
    want_results, want = from_videos
    assert results["processes"] == 2 and results["devices"] == 6
    assert results["counts"] == {**want_results["counts"], "resumed": 4}
    for key in ("dropped", "failed"):
        assert results[key] == want_results[key], key
    assert not (tmp_path / "0" / PARTIAL).exists() and not (tmp_path / "1" / PARTIAL).exists()
    got = read_predictions(tmp_path / "0")
    assert [p["path"] for p in got] == [p["path"] for p in want]
    for g, w in zip(got, want, strict=True):
        assert g["top5"] == w["top5"]
        np.testing.assert_allclose(g["logits"], w["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "stop",
    [
        # Both processes killed while a checkpoint is being written (each process's grain
        # position is restored from the last complete checkpoint).
        {"kill_at": 6},
        # SIGTERM to one process (a scheduler's preemption, `kill`): both save the step they
        # agree on through jax.distributed's preemption sync point and end (143). They used to
        # save it and train on to the end, the signal ignored.
        {"term_at": 4},
    ],
)
def test_two_processes_train_from_a_prepared_dataset_as_one(
    prepared_train, train_cache, straight, tmp_path, stop
):
    # Each process reads its rows of every global batch of one shuffled stream: the same
    # params, bit for bit, as one process with two devices, even when the run is stopped
    # (`stop`) and the same command resumes it.
    command = [sys.executable, *train_command(prepared_train, tmp_path, train_cache)]
    train_two_processes(command, tmp_path, **stop)
    want = checkpoints.load(straight / "final")[1]
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "final")[1], want)


def _write_meta(path: Path, **changes) -> None:
    """A minimal finished `eval` dataset's stam_prepare.json (no records needed to open it):
    5 listed videos, the 2nd and 4th without a record."""
    meta = {
        "format": 1,
        "complete": True,
        "kind": "eval",
        "encoding": "jpeg",
        "jpeg_quality": 90,
        "spec": dataclasses.asdict(SPEC),
        "shard_size": 2,
        "source": "/data/videos",
        "classes": ["a", "b"],
        "items": [["a/0.mp4", 0], ["a/1.mp4", 0], ["b/2.mp4", 1], ["b/3.mp4", 1], ["b/4.mp4", 1]],
        "empty_classes": [],
        "outcomes": {"1": {"status": "too_short"}, "3": {"status": "failed"}},
        "num_records": 3,
        **changes,
    }
    path.mkdir(exist_ok=True)
    (path / META_FILE).write_text(json.dumps(meta))
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    splits = [
        {"name": name, "filepathTemplate": template, "shardLengths": []} for name in SPLITS.values()
    ]
    info = {"name": "stam_videos", "fileFormat": "array_record", "splits": splits}
    (path / "dataset_info.json").write_text(json.dumps(info))


def test_a_prepared_dataset_opens_with_its_records_listing_positions_and_checks(tmp_path):
    _write_meta(tmp_path / "ds")
    dataset = open_prepared(tmp_path / "ds")
    assert dataset.record_positions().tolist() == [0, 2, 4]  # listed less those without records
    assert dataset.frames == "JPEG (quality 90)" and dataset.split == "validation"
    # An eval dataset fixes every sampling field, short_videos included; train only the rate
    # and the resize (the clip, crop and flip are drawn when reading).
    asked = dataclasses.replace(SPEC, short_videos="pad", crop=24)
    assert dataset.mismatches(asked) == [
        "--config.data.crop: prepared 32, asked 24",
        "--config.data.short_videos: prepared 'official', asked 'pad'",
    ]
    train = dataclasses.replace(dataset, kind="train")
    assert train.mismatches(dataclasses.replace(asked, num_frames=8)) == []
    assert train.mismatches(dataclasses.replace(SPEC, frame_rate=2.0, resize=40)) == [
        "--config.data.frame_rate: prepared 4.0, asked 2.0",
        "--config.data.resize: prepared 36, asked 40",
    ]
    with pytest.raises(PreparedError, match=r"ds is an eval dataset; training reads one made"):
        open_checked(tmp_path / "ds", "train", SPEC)
    (tmp_path / "classes.txt").write_text("b\na\n")
    with pytest.raises(PreparedError, match=r"classes\.txt differs from the classes .*ds was"):
        open_checked(tmp_path / "ds", "eval", SPEC, str(tmp_path / "classes.txt"))
    _write_meta(tmp_path / "old", format=0)
    with pytest.raises(PreparedError, match=r"old was prepared in format 0; this version reads 1"):
        open_prepared(tmp_path / "old")
    _write_meta(tmp_path / "part", complete=False)
    (tmp_path / "part" / ".prepare").mkdir()
    (tmp_path / "part" / ".prepare" / "part-0.json").write_text("{}")
    with pytest.raises(PreparedError, match=r"part is unfinished \(1 of 3 shards prepared\)"):
        open_prepared(tmp_path / "part")


def test_records_give_views_and_clips_in_their_stored_order():
    from stam_jax.data.prepared import encode_jpeg, eval_views, train_clip

    # JPEG eval frames are stored view-major: frame v * T + t is view v's frame t.
    spec = ClipSpec(num_frames=2, frame_rate=1.0, resize=8, crop=8, num_crops=3)
    flat = [np.full((8, 8, 3), 40 * k, np.uint8) for k in range(6)]
    views = eval_views({"frames": [encode_jpeg(f, 95) for f in flat]}, "jpeg", spec)
    assert views.shape == (3, 2, 8, 8, 3)
    np.testing.assert_allclose(views[:, :, 4, 4, 0], [[0, 40], [80, 120], [160, 200]], atol=2)
    # A train record shorter than a clip repeats its last frame, raw or JPEG.
    spec = ClipSpec(num_frames=4, frame_rate=1.0, resize=8, crop=8, train_min_area=1.0)
    for encoding, frames in [
        ("raw", np.stack(flat[:3])),
        ("jpeg", [encode_jpeg(f, 95) for f in flat[:3]]),
    ]:
        clip = train_clip({"frames": frames}, encoding, spec, np.random.default_rng(0))
        np.testing.assert_allclose(clip[:, 4, 4, 0], [0, 40, 80, 80], atol=2)


def test_readers_check_record_order_and_take_their_rows_of_each_global_batch():
    import grain

    from stam_jax.data.reading import _ProcessRows, _Records, batches

    records = _Records([{"index": 0}, {"index": 5}], np.array([0, 1]), np.array([0, 3]))
    assert records[0] == {"index": 0}
    with pytest.raises(RuntimeError, match=r"^record 1 holds video 5 of the listing, not 3: the"):
        records[1]
    # Row r of global batch k (2 processes x 3 rows) is element 6k + r of the one stream.
    stream = [grain.RecordMetadata(index=i, record_key=100 + i) for i in range(12)]
    for process, want in [(0, [0, 1, 2, 6, 7, 8]), (1, [3, 4, 5, 9, 10, 11])]:
        rows = _ProcessRows(stream, 3, process, 2)
        assert [rows[i].record_key - 100 for i in range(6)] == want
    clips = iter({"video": np.full((1, 2, 2, 3), k, np.uint8), "label": k} for k in range(4))
    first = next(batches(clips, 3))
    assert first["label"].tolist() == [0, 1, 2] and first["video"][:, 0, 0, 0, 0].tolist() == [
        0,
        1,
        2,
    ]


def test_a_prepared_run_saves_its_data_position_at_its_last_step_too(
    prepared_train, tmp_path, monkeypatch
):
    # 4 steps of 2 clips, saved every 3: the checkpoint of step 4, saved as the last step, holds
    # grain's position after its 8 clips, as step 3's holds it after 6. Started again once
    # finished, the run resumes from step 4 at that position (without it the restore fails).
    # A step that only counts, and zero params (no model compiled): only the data is looked at.
    import jax
    import jax.numpy as jnp

    import stam_jax.train as train_module
    from stam_jax.data import reading

    def metrics_at(step):
        return {"loss": step.astype(jnp.float32), "grad_norm": jnp.float32(1.0)}

    def zero_params(model, config, video):
        zeros = jax.tree.map(
            lambda x: np.zeros(x.shape, x.dtype), checkpoints.abstract_params(model)
        )
        return zeros, "zero params", ""

    monkeypatch.setattr(train_module, "make_train_step", scripted_step(metrics_at))
    monkeypatch.setattr(train_module, "_initial_params", zero_params)
    config = tiny_config(prepared_train, steps=4, save_every=3, warmup_steps=0, ema_decay=0.0)
    config.batch_size, config.seed = 2, 5
    seeds = []  # the read order follows the config's seed (the order test shows how)
    train_loader = reading.train_loader
    monkeypatch.setattr(
        reading,
        "train_loader",
        lambda dataset, spec, seed, *args: (
            seeds.append(seed) or train_loader(dataset, spec, seed, *args)
        ),
    )
    summary = train_and_evaluate(config, tmp_path)
    assert (summary["step"], summary["resumed_from"]) == (4, 0) and seeds == [5]
    for step, last in [(3, 5), (4, 7)]:
        data = json.loads((tmp_path / f"checkpoints/{step}/data/metadata").read_text())
        assert json.loads(data["grain"][0])["last_seen_indices"] == {"0": last}
    positions = []
    set_state = reading.Reading.set_state
    monkeypatch.setattr(
        reading.Reading,
        "set_state",
        lambda self, state: positions.append(json.loads(state)) or set_state(self, state),
    )
    summary = train_and_evaluate(config, tmp_path)
    assert (summary["step"], summary["resumed_from"]) == (4, 4) and seeds == [5, 5]
    assert [p["last_seen_indices"] for p in positions] == [{"0": 7}]


def test_training_reads_in_an_order_its_seed_sets_shuffled_anew_each_epoch(
    prepared_train, monkeypatch
):
    from stam_jax.data import reading

    # Each clip stands for the listing index of its record: the order records are read in.
    monkeypatch.setattr(reading, "train_clip", lambda record, *args: np.int64(record["index"]))
    dataset = open_prepared(prepared_train)

    def order(seed: int) -> list[int]:
        clips = iter(reading.train_loader(dataset, TRAIN_SPEC, seed, 1, 0, 2))
        try:
            return [int(next(clips)["video"]) for _ in range(2 * dataset.num_records)]
        finally:
            reading.close(clips)

    first, again, other = order(0), order(0), order(1)
    positions = sorted(dataset.record_positions().tolist())
    for read in first, other:  # each epoch reads every record once, in an order of its own
        epochs = read[: len(positions)], read[len(positions) :]
        assert sorted(epochs[0]) == sorted(epochs[1]) == positions
        assert epochs[0] != epochs[1] and positions not in epochs
    assert first == again and first != other


class _CountedInFile:
    """A data source that appends each index it reads to a file (read from any process)."""

    def __init__(self, source, log: Path) -> None:
        self.source, self.log = source, log

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return self.source[i]


def count_reads(monkeypatch, log: Path) -> Callable[[], int]:
    """Makes the prepared datasets opened from now on note each record they read, in this
    process or a reading process, in `log` (emptied to start again); returns how many so far."""
    from stam_jax.data.prepared import PreparedDataset

    log.touch()
    data_source = PreparedDataset.data_source
    monkeypatch.setattr(
        PreparedDataset, "data_source", lambda self: _CountedInFile(data_source(self), log)
    )
    return lambda: len(log.read_text().split())


def test_reading_in_this_process_reads_prefetch_records_ahead_and_no_more(
    prepared_raw, prepared_train, tmp_path, monkeypatch
):
    # grain's default read-ahead (500 records) would hold gigabytes of frames.
    from stam_jax.data import reading

    log = tmp_path / "reads"
    reads = count_reads(monkeypatch, log)

    def settled(want: int) -> int:
        """The records read once the read-ahead has stopped (`want` of them, or a timeout)."""
        deadline = time.monotonic() + 10
        while reads() < want and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # more would have been read by now
        return reads()

    clips = iter(reading.train_loader(open_prepared(prepared_train), TRAIN_SPEC, 0, 1, 0, 3))
    try:
        for taken in (1, 2):
            next(clips)
            assert settled(taken + 3) == taken + 3
    finally:
        reading.close(clips)
    log.write_text("")
    items = reading.eval_items(open_prepared(prepared_raw[0]), 0, 2, 0, 1)
    try:
        assert next(items).position == 0 and settled(3) == 3
    finally:
        items.close()


def test_reading_processes_share_the_read_ahead(prepared_train, tmp_path, monkeypatch):
    # Each of grain's reading processes kept a read buffer of the whole `prefetch`: with 15
    # processes, 15 times the frames `prefetch` allows were held. They share it now; each also
    # holds twice its output buffer (prefetch // workers) and about 2 in hand.
    from stam_jax.data import reading

    read_so_far = count_reads(monkeypatch, tmp_path / "reads")
    workers, prefetch = 2, 4
    clips = iter(
        reading.train_loader(open_prepared(prepared_train), TRAIN_SPEC, 0, 1, workers, prefetch)
    )
    try:
        next(clips)
        reads, deadline = -1, time.monotonic() + 30
        while time.monotonic() < deadline:  # until the read-ahead has stopped for 1 s
            time.sleep(1)
            reads, last = read_so_far(), reads
            if reads == last:
                break
    finally:
        reading.close(clips)
    # 2 x (2 + 2 x 2 + 2) ahead and the one taken; a read buffer of 4 each made it 21.
    assert reads <= 3 * prefetch + 2 * workers + 1, reads


def test_grain_s_notice_about_profiling_its_workers_is_dropped_and_nothing_else(caplog):
    # grain >= 0.2.17 logs it as it is imported, under a jaxlib older than 0.10.1.
    import logging

    import stam_jax.data  # noqa: F401 (sets the filter)

    absl_logger = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logger.warning(
            "Grain multiprocess worker profiling requires jaxlib extension version 448 or later "
            "(jaxlib >= 0.11.0). Current version: %s.",
            368,
        )
        absl_logger.warning("Grain: another warning, %s", "kept")
    assert [record.getMessage() for record in caplog.records] == ["Grain: another warning, kept"]
