"""The demo's generated task (labels only in the frame order) and the demo pipeline end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stam_jax.data import demo as demo_data
from stam_jax.data.folder import list_videos
from stam_jax.data.video import ClipSpec, load_views, resample_indices

GEOMETRY = demo_data.Geometry()
SPEC = ClipSpec(GEOMETRY.num_frames, GEOMETRY.frame_rate, resize=36, crop=32)


def test_receding_is_approaching_reversed_at_the_sampled_frames():
    for seed in range(20):
        fps = demo_data.FRAME_RATES[seed % len(demo_data.FRAME_RATES)]
        count = int(np.ceil(GEOMETRY.num_frames * fps / GEOMETRY.frame_rate))
        sampled = resample_indices(count, fps, GEOMETRY.frame_rate)
        assert len(sampled) == GEOMETRY.num_frames  # one clip: training sees what eval sees
        up = demo_data.motion_radii(np.random.default_rng(seed), GEOMETRY, 0, count, fps)
        down = demo_data.motion_radii(np.random.default_rng(seed), GEOMETRY, 1, count, fps)
        np.testing.assert_allclose(
            down[sampled], up[sampled][::-1], atol=0.35 * (up.max() - up.min()) / 7
        )
        assert up[sampled][-1] - up[sampled][0] >= GEOMETRY.min_change * 0.8


def test_same_scene_played_backwards_gives_the_same_frames(tmp_path):
    paths = []
    for label in (0, 1):
        rng = np.random.default_rng(7)
        path = tmp_path / f"{label}.mp4"
        demo_data.write_motion_video(path, rng, GEOMETRY, label)
        paths.append(path)
    up, down = (load_views(p, SPEC)[0].astype(np.int16) for p in paths)
    in_order, reversed_order = np.abs(up - down).mean(), np.abs(up - down[::-1]).mean()
    # The order differs; the frames do not, up to the codec's losses.
    assert reversed_order < 0.3 * in_order and reversed_order < 3, (in_order, reversed_order)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    demo_data.write_dataset(out, train=2, val=160, frames_train=8, frames_val=4, progress=False)
    return out


def _object_area(views: np.ndarray) -> np.ndarray:
    """Per-frame fraction of bright pixels: the object (>= 140 in every channel) vs background."""
    frames = views[0].astype(np.int16)
    return (frames.min(axis=-1) >= 120).mean(axis=(1, 2))


def test_labels_are_recoverable_from_the_frame_order_only(dataset):
    folder = list_videos(dataset / "videos" / "val")
    assert list(folder.classes) == list(demo_data.MOTION_CLASSES)
    areas = np.stack(
        [_object_area(load_views(dataset / "videos" / "val" / i.path, SPEC)) for i in folder.items]
    )
    labels = np.array([i.label for i in folder.items])
    assert np.bincount(labels).tolist() == [80, 80]
    # Motion: the object's area grows (approaching, 0) or shrinks (receding, 1).
    by_order = (areas[:, -1] < areas[:, 0]).astype(int)
    assert (by_order == labels).mean() >= 0.95
    # Per-frame statistics without the order: a threshold on the mean area (what frame
    # averaging can see), fitted on one half and scored on the other, stays at chance.
    mean_area, half = areas.mean(axis=1), len(labels) // 2
    order = np.random.default_rng(0).permutation(len(labels))
    fit, test = order[:half], order[half:]
    candidates = [(t, sign) for t in np.unique(mean_area[fit]) for sign in (False, True)]

    def accuracy(rows, t, sign):
        return np.mean(((mean_area[rows] > t) ^ sign) == labels[rows])

    threshold, sign = max(candidates, key=lambda c: accuracy(fit, *c))
    assert accuracy(test, threshold, sign) < 0.67  # chance 0.5; 3 standard errors at 80 videos
    # Sorted per-frame areas (the whole multiset) have the same distribution in both classes.
    ranked = np.sort(areas, axis=1)
    gap = np.abs(ranked[labels == 0].mean(axis=0) - ranked[labels == 1].mean(axis=0))
    assert gap.max() < 3 * ranked.std(axis=0).max() / np.sqrt(80)


def test_size_classes_are_what_a_single_frame_shows(dataset):
    folder = list_videos(dataset / "frames" / "train")
    assert list(folder.classes) == list(demo_data.SIZE_CLASSES)
    spec = ClipSpec(1, GEOMETRY.frame_rate, resize=36, crop=32)
    areas = [
        _object_area(load_views(dataset / "frames" / "train" / i.path, spec))[0]
        for i in folder.items
    ]
    labels = [i.label for i in folder.items]
    assert np.corrcoef(areas, labels)[0, 1] > 0.8


def test_a_smaller_dataset_written_over_a_larger_one_keeps_none_of_its_videos(tmp_path):
    # Written again into the same --out with fewer videos, the earlier run's extra videos stayed
    # and were listed with the new ones; a file of the user's own stays.
    sizes = dict(val=2, frames_train=4, frames_val=4, progress=False)
    demo_data.write_dataset(tmp_path, train=6, **sizes)
    mine = tmp_path / "videos" / "train" / "approaching" / "notes.txt"
    mine.write_text("kept")
    demo_data.write_dataset(tmp_path, train=2, **sizes)
    assert [i.path for i in list_videos(tmp_path / "videos" / "train").items] == [
        "approaching/approaching_00000.mp4",
        "receding/receding_00001.mp4",
    ]
    assert mine.read_text() == "kept"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val", "1"], "--val=1: need at least 2 (one per class: approaching, receding)"),
        # Four size classes: 3 still videos left one class empty.
        (
            ["--frames-train", "3"],
            "--frames-train=3: need at least 4 (one per class: size_1_tiny, size_2_small, "
            "size_3_medium, size_4_large)",
        ),
        # A negative seed was a numpy traceback once the first video was drawn.
        (["--seed", "-3"], "--seed=-3: use a whole number >= 0"),
    ],
)
def test_demo_command_line_refuses_tiny_sizes_and_a_negative_seed(capsys, tmp_path, flags, message):
    # One `error:` line and exit 2, as the other tools (it was argparse's usage block).
    with pytest.raises(SystemExit) as end:
        demo_data.main(["--out", str(tmp_path / "data"), *flags])
    assert end.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["stam_jax.data.demo", "stam_jax.demo"])
def test_demo_commands_refuse_an_empty_folder_or_a_file(capsys, tmp_path, monkeypatch, command):
    # An empty --out/--workdir wrote into the current folder; a file there was a traceback
    # (FileExistsError, NotADirectoryError).
    from stam_jax import demo

    main, flag = (demo_data.main, "--out") if "data" in command else (demo.main, "--workdir")
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for value, says in [
        ("", f"{flag} is empty: name the folder to write "),
        (str(afile), f"{flag}={afile}: {afile} is a file, not a folder; name a folder (created "),
        (str(afile / "sub"), f"{flag}={afile / 'sub'}: {afile} is a file, not a folder; name a "),
    ]:
        with pytest.raises(SystemExit) as end:
            main([f"{flag}={value}"])
        assert end.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and afile.read_text() == "kept"


def test_a_failing_step_stops_the_demo_naming_its_status(tmp_path):
    import sys

    from stam_jax.demo import _run

    log = []
    assert _run([sys.executable, "-c", "pass"], log) >= 0
    with pytest.raises(SystemExit, match=r"^demo: the step above failed with exit status 3\.$"):
        _run([sys.executable, "-c", "raise SystemExit(3)"], log)
    # The log shows each command as one types it (python, not the interpreter's path).
    assert [(row["command"], row["status"]) for row in log] == [
        ("python -c pass", 0),
        ("python -c 'raise SystemExit(3)'", 3),
    ]


def test_round_trip_is_exact_only_when_every_tensor_comes_back_the_same(monkeypatch, tmp_path):
    # The conversions stood in: the tensors read back decide the verdict.
    import types

    from stam_jax import checkpoints, demo

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    written = {"head": {"kernel": kernel, "bias": np.zeros(3, np.float32)}}
    model = types.SimpleNamespace(num_heads=2, temporal_heads=4)

    def verdict(back):
        monkeypatch.setattr(demo, "_run", lambda command, log: 0.0)
        monkeypatch.setattr(
            checkpoints,
            "load",
            lambda path: (model, back if path.name == "roundtrip" else written),
        )
        result = demo._round_trip(tmp_path / "final", tmp_path, [])
        return result["exact"], result["bit_identical"], result["tensors"]

    assert verdict(written) == (True, 2, 2)
    changed = {"head": {"kernel": kernel + 1e-7, "bias": np.zeros(3, np.float32)}}
    assert verdict(changed) == (False, 1, 2)
    as_float16 = {"head": {"kernel": kernel.astype(np.float16), "bias": np.zeros(3, np.float32)}}
    assert verdict(as_float16) == (False, 1, 2)  # equal values in another dtype
    extra = {"head": {**written["head"], "scale": np.ones(3, np.float32)}}
    assert verdict(extra) == (False, 2, 2)  # a tensor the original does not have


def test_report_says_how_stam_compares_and_whether_the_round_trip_is_exact(tmp_path):
    from stam_jax.demo import format_report

    def run(top1, name):
        return {
            "top1": top1,
            "train_videos_per_s": 12.5,
            "eval_videos_per_s": 30.0,
            "checkpoint": f"{name}/final",
            "metrics": f"{name}/metrics.jsonl",
            "predictions": f"{name}/eval/predictions.jsonl",
        }

    report = {
        "validation_videos": 200,
        "chance_top1": 0.5,
        "stam": run(0.9, "stam"),
        "frame_average": run(0.52, "mean"),
        "round_trip": {"exact": True, "bit_identical": 60, "tensors": 60, "pth": "s.pth"},
        "pictures": ["a.png", "b.png"],
        "total_s": 61.4,
    }
    lines = format_report(report, tmp_path).splitlines()
    assert lines[0].startswith("Task: is the object approaching or receding? 200 validation ")
    assert "2 classes, chance 50%." in lines[0]
    assert lines[3].split() == [
        "STAM",
        "(ViT",
        "+",
        "temporal",
        "transformer)",
        "90.0%",
        "12.5",
        "30.0",
    ]
    assert lines[4].split()[-3:] == ["52.0%", "12.5", "30.0"]
    assert lines[6] == "STAM is +38.0% over frame averaging; frame averaging is +2.0% from chance."
    assert lines[7] == (
        "Round trip stam-jax -> official .pth -> stam-jax: 60/60 tensors bit-identical (exact); "
        "the .pth: s.pth"
    )
    assert lines[-4:] == [
        "Pictures:",
        "  a.png",
        "  b.png",
        f"Report: {tmp_path / 'report.txt'}; whole demo 61 s.",
    ]
    report["round_trip"].update(exact=False, bit_identical=59)
    assert "59/60 tensors bit-identical (NOT exact)" in format_report(report, tmp_path)


def test_demo_pipeline_end_to_end_small(tmp_path):
    from stam_jax.demo import run_demo

    report = run_demo(tmp_path, fast=True)
    assert report["round_trip"]["exact"] and report["round_trip"]["tensors"] == 60
    assert report["validation_videos"] == 16 and report["chance_top1"] == 0.5
    for run in ("stam", "frame_average"):
        assert 0.0 <= report[run]["top1"] <= 1.0 and report[run]["train_steps"] == 6
        rows = tmp_path / ("stam" if run == "stam" else "mean") / "eval" / "predictions.jsonl"
        assert len(rows.read_text().splitlines()) == 16
    assert len(report["pictures"]) == 6
    for picture in report["pictures"]:
        with Image.open(picture) as image:
            image.verify()
    # The picture from the checkpoint converted back from the .pth equals the trained one's.
    pictures = tmp_path / "pictures"
    original = np.asarray(Image.open(pictures / "explain_approaching.png"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(pictures / "explain_approaching_from_pth.png")), original
    )
    with Image.open(report["pictures"][0]) as image:
        assert image.size[0] > 400 and image.size[1] > 200
    init = (tmp_path / "stam" / "init_report.txt").read_text()
    assert "aggregate: " in init and "freshly initialised" in init and "redrawn" in init
    assert "head: re-initialised (checkpoint has 4 classes, model 2)" in init
    # Every tensor by name after the summary (the temporal transformer is new).
    listed = dict(line.strip().split(": ", 1) for line in init.split("by name:\n")[1].splitlines())
    assert len(listed) == 60 and listed["head/kernel"].startswith("re-initialised")
    assert listed["aggregate/pos_embed"] == "drawn as normal(0, 1.0)"
    assert listed["blocks_0/attn/qkv/kernel"] == "copied"
    text = (tmp_path / "report.txt").read_text()
    assert "chance 50%" in text and "bit-identical (exact)" in text
    assert json.loads((tmp_path / "report.json").read_text())["fast"] is True
