"""Clip sampling and frame transform against an independent implementation of the official rule."""

from __future__ import annotations

import itertools
import math
import os
import re
import types
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stam_jax.data import video
from stam_jax.data.synthetic import index_frame, read_index, write_video
from stam_jax.data.video import (
    ClipSpec,
    TooShortError,
    VideoError,
    _random_box,
    augment_clip,
    clip_starts,
    crop_offsets,
    load_sampled_frames,
    load_train_clip,
    load_views,
    resample_indices,
    resized_size,
)


def reference_indices(n: int, fps: float, frame_rate: float) -> list[int]:
    """torchvision VideoClips._resample_video_idx, restated with torch."""
    total = math.floor(n * frame_rate / fps)
    step = fps / frame_rate
    if step.is_integer():
        return list(range(n))[:: int(step)]
    return (torch.arange(total, dtype=torch.float32) * step).floor().to(torch.int64).tolist()


def reference_transform(frame: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """ToPILImage -> Resize(resize) -> CenterCrop(crop), with torchvision's size rules."""
    image = Image.fromarray(frame)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def reference_clip(path, num_frames: int, frame_rate: float, resize=256, crop=224) -> np.ndarray:
    """The whole official path: every frame decoded by PyAV, resampled, first clip, transformed.

    Files are opened as torchvision opens them (metadata that is not UTF-8 ignored).
    """
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        n = len([p for p in container.demux(stream) if p.pts is not None])
    with av.open(str(path), metadata_errors="ignore") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == n
    indices = reference_indices(n, fps, frame_rate)[:num_frames]
    return np.stack([reference_transform(frames[i], resize, crop) for i in indices]), indices


# 29.96 fps (an average rate of variable-rate phone videos): step 18.725 is 18.72499... in
# float64, and float32's i * step floors one frame later than float64's (i = 40: 749, not 748).
@pytest.mark.parametrize("fps", [16, 25, 30000 / 1001, 30, 24, 12.5, 60, 29.96])
@pytest.mark.parametrize("frame_rate", [1.6, 3.2, 6.4])
@pytest.mark.parametrize("n", [37, 301, 1000])
def test_resampling_rule(fps, frame_rate, n):
    assert resample_indices(n, fps, frame_rate).tolist() == reference_indices(n, fps, frame_rate)


CASES = [
    # (file, fps, (height, width), frames)
    ("h264_16fps.mp4", 16, (72, 96), 170),
    ("h264_25fps_portrait.mp4", 25, (128, 72), 262),
    ("mpeg4_ntsc.avi", Fraction(30000, 1001), (90, 160), 310),
    ("h264_30fps.mkv", 30, (64, 114), 305),
    ("vp8_30fps.webm", 30, (96, 96), 330),
]


@pytest.mark.parametrize("name,fps,size,count", CASES, ids=[c[0] for c in CASES])
def test_model_input_is_bit_identical_to_the_official_pipeline(tmp_path, name, fps, size, count):
    path = write_video(tmp_path / name, (index_frame(i, *size) for i in range(count)), fps)
    spec = ClipSpec(num_frames=16, frame_rate=1.6)
    got = load_views(path, spec)
    want, indices = reference_clip(path, 16, 1.6)
    assert got.shape == (1, 16, 224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], want)
    # The frames really are the ones the rule names (read back from their pixels).
    assert [read_index(frame, short=256) for frame in got[0]] == indices


def _write_20_indexed_frames(path, setup):
    """20 index frames, 64x48 H.264 at 10 fps, with `setup(container, stream)` run first."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", 48, 64
        setup(container, stream)
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(index_frame(i, 48, 64), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_metadata_that_is_not_utf8_does_not_stop_a_file(tmp_path):
    # A title tag in Latin-1 (as some downloaders write it): PyAV's default refused the file
    # with a UnicodeDecodeError, and the video was listed as failed; torchvision reads it.
    path = tmp_path / "latin1_title.mkv"

    def title(container, stream):
        container.metadata["title"] = "TITLETAG"

    _write_20_indexed_frames(path, title)
    data = path.read_bytes()
    assert data.count(b"TITLETAG") == 1
    path.write_bytes(data.replace(b"TITLETAG", b"caf\xe9 \xff\xfe "))
    got = load_views(path, ClipSpec(num_frames=4, frame_rate=4.0, resize=64, crop=48))
    want, indices = reference_clip(path, 4, 4.0, resize=64, crop=48)
    np.testing.assert_array_equal(got[0], want)
    assert indices == [0, 2, 5, 7]


def test_a_rotation_tag_is_not_applied_as_in_the_official_pipeline(tmp_path):
    # A phone video filmed upright: landscape frames and a display matrix saying "turn by 90".
    # torchvision's read_video takes PyAV's frames as coded, so the official evaluation sees
    # them on their side; so do we.
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (set_display_rotation)")
    path = tmp_path / "rotated.mp4"
    _write_20_indexed_frames(path, lambda container, stream: stream.set_display_rotation(90))
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).rotation == 90  # the tag is there
    got = load_views(path, ClipSpec(num_frames=4, frame_rate=4.0, resize=64, crop=48))
    want, indices = reference_clip(path, 4, 4.0, resize=64, crop=48)
    np.testing.assert_array_equal(got[0], want)
    # The landscape frames as coded, not turned: their index bars read back unrotated.
    assert [read_index(f, short=64) for f in got[0]] == indices == [0, 2, 5, 7]


def test_size_and_crop_rules():
    assert resized_size(720, 1280, 256) == (256, 455)  # int(256 * 1280 / 720) = 455
    assert resized_size(1280, 720, 256) == (455, 256)
    assert resized_size(240, 320, 256) == (256, 341)
    # int() truncates: QCIF's 256 * 176 / 144 = 312.9 -> 312, not 313.
    assert resized_size(144, 176, 256) == (256, 312)
    assert resized_size(176, 144, 256) == (312, 256)
    # Left to right, as torchvision computes it: 224 * 115 / 112 is 230 exactly, where
    # 224 * (115 / 112) gives 229.99999999999997 (the same for 256, a power of two, but not 224).
    assert resized_size(112, 115, 224) == (224, 230)
    assert resized_size(115, 112, 224) == (230, 224)
    # round() is Python's (half to even): (455 - 224) / 2 = 115.5 -> 116,
    # (341 - 224) / 2 = 58.5 -> 58.
    assert crop_offsets(256, 455, 224, "center") == (16, 116)
    assert crop_offsets(256, 341, 224, "center") == (16, 58)
    assert crop_offsets(256, 341, 224, "start") == (16, 0)
    assert crop_offsets(256, 341, 224, "end") == (16, 117)
    assert crop_offsets(341, 256, 224, "end") == (117, 16)
    # A square frame is cut as a landscape one: left, centre, right (README: top/centre/bottom
    # only for portrait frames).
    assert crop_offsets(256, 256, 224, "start") == (16, 0)
    assert crop_offsets(256, 256, 224, "end") == (16, 32)
    with pytest.raises(ValueError, match=r"position 'centre'; use one of \('start', 'cent"):
        crop_offsets(256, 341, 224, "centre")  # was taken as 'start': (16, 0)


def test_multi_view_clips_and_crops(tmp_path):
    path = write_video(tmp_path / "v.mp4", (index_frame(i, 64, 128) for i in range(200)), 10)
    spec = ClipSpec(num_frames=4, frame_rate=1.0, resize=64, crop=48, num_clips=3, num_crops=3)
    views = load_views(path, spec)
    assert views.shape == (9, 4, 48, 48, 3)
    # 20 indices (0, 10, ..., 190): clips start at 0, 8 and 16, uniformly spaced.
    centre = views.reshape(3, 3, 4, 48, 48, 3)[:, 1]
    for clip, start in zip(centre, [0, 8, 16], strict=True):
        assert [read_index(f, short=64) for f in clip] == [10 * (start + k) for k in range(4)]
    # The three crops of a frame are the left, centre and right squares of the resized frame.
    with av.open(str(path)) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    frame = np.asarray(Image.fromarray(decoded).resize((128, 64), Image.BILINEAR))
    for k, left in enumerate([0, 40, 80]):
        np.testing.assert_array_equal(views[k, 0], frame[8:56, left : left + 48])


def test_short_videos_are_dropped_or_padded(tmp_path):
    path = write_video(tmp_path / "short.mp4", (index_frame(i, 64, 64) for i in range(50)), 10)
    with pytest.raises(
        TooShortError, match=r"8 frames at 1.6 fps \(n=50, fps=10.000\); a clip needs 16"
    ):
        load_views(path, ClipSpec(num_frames=16, frame_rate=1.6, resize=64, crop=48))
    padded = load_views(
        path, ClipSpec(num_frames=16, frame_rate=1.6, resize=64, crop=48, short_videos="pad")
    )
    order = [read_index(f, short=64) for f in padded[0]]
    sampled = reference_indices(50, 10, 1.6)
    assert order == sampled + [sampled[-1]] * (16 - len(sampled))
    # Shorter than one sampling step (6.25 frames): no sampled frame, nothing to pad. The
    # reason said "a clip needs 16", as if 'pad' had not been asked for.
    path = write_video(tmp_path / "blip.mp4", (index_frame(i, 64, 64) for i in range(5)), 10)
    with pytest.raises(
        TooShortError,
        match=r"^no frame at 1.6 fps \(n=5, fps=10.000\): the video is shorter than one "
        r"sampling step of 6.25 frames, so short_videos='pad' has no frame to repeat$",
    ):
        load_views(
            path, ClipSpec(num_frames=16, frame_rate=1.6, resize=64, crop=48, short_videos="pad")
        )
    # Without 'pad', the same video is simply too short (the reason names no 'pad').
    with pytest.raises(
        TooShortError, match=r"^0 frames at 1.6 fps \(n=5, fps=10.000\); a clip needs 16$"
    ):
        load_views(path, ClipSpec(num_frames=16, frame_rate=1.6, resize=64, crop=48))


def test_unreadable_files(tmp_path):
    good = write_video(tmp_path / "good.mp4", (index_frame(i, 64, 64) for i in range(60)), 10)
    data = good.read_bytes()
    cases = {
        "empty.mp4": b"",
        "garbage.mp4": b"not a video at all" * 100,
        "truncated.mp4": data[: len(data) // 3],
    }
    spec = ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(VideoError):
            load_views(tmp_path / name, spec)
    with pytest.raises(VideoError, match="no video stream"):
        _write_audio_only(tmp_path / "audio.mp4")
        load_views(tmp_path / "audio.mp4", spec)
    os.symlink("../moved/clip.mp4", tmp_path / "link.mp4")  # the linked file was moved
    with pytest.raises(VideoError, match=r"^a link to \.\./moved/clip\.mp4, which does not exist$"):
        load_views(tmp_path / "link.mp4", spec)


def _write_audio_only(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_clip_spec_validation():
    with pytest.raises(ValueError, match=r"num_crops=2; use 1 \(official\) or 3"):
        ClipSpec(num_crops=2)
    with pytest.raises(ValueError, match=r"short_videos='skip'; use 'official' or 'pad'"):
        ClipSpec(short_videos="skip")
    with pytest.raises(ValueError, match=r"crop=300 is larger than resize=256"):
        ClipSpec(crop=300)
    # NaN and infinity used to pass, and every video then "failed to decode".
    # 1e9 made index arrays of gigabytes per video: a MemoryError each, the run going on.
    for rate in (0, -1.6, float("nan"), float("inf"), 1e9):
        with pytest.raises(
            ValueError,
            match=rf"frame_rate={rate}; use a number of frames per second in \(0, 1000\] "
            r"\(1\.6 for stam_16, 6\.4 for stam_64\)\.",
        ):
            ClipSpec(frame_rate=rate)
    assert ClipSpec(frame_rate=1000.0).frame_rate == 1000.0
    with pytest.raises(ValueError, match=r"resize=1000000; use a side of 1 to 4096 pixels"):
        ClipSpec(resize=1_000_000)  # frames of 10^12 pixels: the process was killed
    with pytest.raises(ValueError, match=r"crop=0; use a side of 1 to 4096"):
        ClipSpec(crop=0)
    with pytest.raises(ValueError, match=r"train_min_area=0; use an area fraction in \(0, 1\]"):
        ClipSpec(train_min_area=0)
    # Sizes as floats passed and failed in numpy at the first video, strings failed in a
    # comparison that named no field, and a truthy train_flip='no' flipped clips.
    bad = [
        ("num_frames", 8.0, "an int"),
        ("crop", 224.5, "an int"),
        ("num_clips", "2", "an int"),
        ("num_frames", True, "an int"),
        ("frame_rate", "1.6", "a number"),
        ("train_flip", "no", "True or False"),
    ]
    for name, value, want in bad:
        with pytest.raises(ValueError, match=rf"^{name}={re.escape(repr(value))}; use {want}\."):
            ClipSpec(**{name: value})
    ClipSpec(num_frames=np.int64(8), frame_rate=2, resize=np.int32(64), crop=48)  # valid
    # The bounds themselves are valid: the largest side, a crop of the whole resized frame, the
    # whole frame as the training crop's area.
    ClipSpec(resize=4096, crop=4096, train_min_area=1.0)
    ClipSpec(resize=48, crop=48)
    with pytest.raises(ValueError, match=r"^resize=4097; use a side of 1 to 4096 pixels"):
        ClipSpec(resize=4097)
    with pytest.raises(ValueError, match=r"^num_clips=0, num_frames=16: use >= 1\.$"):
        ClipSpec(num_clips=0)
    with pytest.raises(ValueError, match=r"^num_clips=1, num_frames=0: use >= 1\.$"):
        ClipSpec(num_frames=0)


def test_training_clips_are_reproducible_and_respect_the_switches(tmp_path):
    path = write_video(tmp_path / "v.mp4", (index_frame(i, 64, 64) for i in range(80)), 10)
    spec = ClipSpec(num_frames=4, frame_rate=2.0, resize=36, crop=32)
    a = load_train_clip(path, spec, (0, 1, 2))
    np.testing.assert_array_equal(a, load_train_clip(path, spec, (0, 1, 2)))
    assert not np.array_equal(a, load_train_clip(path, spec, (0, 1, 3)))
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    # One int failed with "'int' object is not iterable", a float was truncated to 0.
    for seed in (7, (0, 0.5), (0, -1)):
        with pytest.raises(ValueError, match=r"seed=.*; pass a sequence of ints >= 0 that differs"):
            load_train_clip(path, spec, seed)
    np.testing.assert_array_equal(a, load_train_clip(path, spec, np.array([0, 1, 2])))
    # No crop (the whole square frame, resized) and no flip: the frames themselves, resized.
    whole = ClipSpec(
        num_frames=4, frame_rate=2.0, resize=36, crop=32, train_flip=False, train_min_area=1.0
    )
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for seed in range(5):
        clip = load_train_clip(path, whole, (seed,))
        first = [
            i
            for i in range(len(decoded))
            if np.array_equal(
                np.asarray(
                    Image.fromarray(decoded[i]).resize((32, 32), Image.BILINEAR, box=(0, 0, 64, 64))
                ),
                clip[0],
            )
        ]
        assert first, "the first frame is an unflipped resize of a decoded frame"
        expected = [first[0] + 5 * k for k in range(4)]  # every 5th frame (10 fps -> 2 fps)
        for k, index in enumerate(expected):
            want = np.asarray(
                Image.fromarray(decoded[index]).resize((32, 32), Image.BILINEAR, box=(0, 0, 64, 64))
            )
            np.testing.assert_array_equal(clip[k], want)


def test_resampling_keeps_the_official_float_order():
    # 3750 frames at 24000/1001 fps resampled to 6.4 fps: exactly 1001 frames' worth, but
    # torchvision computes total = n * frame_rate / fps left to right in float64, which gives
    # 1000.9999999999999, so it keeps 1000 frames (n / (fps / frame_rate) gives 1001.0).
    fps = 24000 / 1001
    indices = resample_indices(3750, fps, 6.4)
    assert len(indices) == 1000
    assert indices.tolist() == reference_indices(3750, fps, 6.4)
    assert len(resample_indices(15000, fps, 1.6)) == 1000  # the same for stam_16's rate


def test_clip_starts_are_the_first_clip_or_uniformly_spaced():
    # One clip: the first T sampled frames (the official evaluation), however long the video.
    assert clip_starts(100, ClipSpec(num_frames=16)) == [0]
    # Several: from the first to the last possible start, each the nearest integer to its
    # uniform position (10 / 3 = 3.33 -> 3, 20 / 3 = 6.67 -> 7).
    assert clip_starts(26, ClipSpec(num_frames=16, num_clips=4)) == [0, 3, 7, 10]
    # A video shorter than a clip (padded): every clip starts at 0.
    assert clip_starts(5, ClipSpec(num_frames=16, num_clips=3, short_videos="pad")) == [0, 0, 0]


def test_a_video_stream_without_frames_fails_rather_than_being_too_short(tmp_path):
    # An AVI cut right after its header: a video stream with a frame rate and no packet. A
    # broken file, reported as failed, not dropped as a short video.
    full = write_video(tmp_path / "full.avi", (index_frame(i, 48, 64) for i in range(20)), 10)
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: data.index(b"movi") + 4])
    spec = ClipSpec(num_frames=4, frame_rate=4.0, resize=64, crop=48)
    with pytest.raises(VideoError, match=r"^the video stream has no frames$") as error:
        load_views(cut, spec)
    assert not isinstance(error.value, TooShortError)


def test_sampled_frames_are_resized_not_cropped(tmp_path):
    # What a `train` prepared dataset stores: every sampled frame, shorter side to `resize`
    # (PIL bilinear, longer side int(resize * long / short)), in sampling order.
    path = write_video(tmp_path / "v.mp4", (index_frame(i, 48, 64) for i in range(20)), 10)
    spec = ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32)
    got = load_sampled_frames(path, spec)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    indices = reference_indices(20, 10, 4.0)
    assert indices == [0, 2, 5, 7, 10, 12, 15, 17]
    assert got.shape == (8, 36, 48, 3) and got.dtype == np.uint8
    for frame, index in zip(got, indices, strict=True):
        want = np.asarray(Image.fromarray(decoded[index]).resize((48, 36), Image.BILINEAR))
        np.testing.assert_array_equal(frame, want)


def _fetch_flat(count: int):
    """A `fetch` of `count` frames where frame k is flat grey 10 * k (it reads back through any
    resize, crop or flip)."""
    frames = [np.full((12, 16, 3), 10 * k, np.uint8) for k in range(count)]
    return lambda slots: [frames[s] for s in slots]


def test_training_offsets_cover_every_clip_and_short_videos_repeat_their_last_frame():
    spec = ClipSpec(num_frames=4, frame_rate=1.0, resize=12, crop=8, train_flip=False)
    for count, clips in [(6, [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]), (2, [[0, 1, 1, 1]])]:
        fetch, seen = _fetch_flat(count), set()
        for seed in range(60):
            clip = augment_clip(count, fetch, spec, np.random.default_rng(seed))
            seen.add(tuple(int(v) // 10 for v in clip[:, 0, 0, 0]))
        assert sorted(seen) == [tuple(c) for c in clips], count


def test_a_training_clip_is_its_frames_in_the_random_box_flipped_as_drawn():
    # The draws come in the documented order (offset, box, flip) from the clip's rng; every
    # frame of the clip gets the same box and flip.
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(7)]
    spec = ClipSpec(num_frames=3, frame_rate=1.0, resize=30, crop=16, train_min_area=0.3)
    flips = set()
    for seed in range(12):
        clip = augment_clip(
            7, lambda slots: [frames[s] for s in slots], spec, np.random.default_rng(seed)
        )
        draws = np.random.default_rng(seed)
        start = int(draws.integers(0, 7 - 3 + 1))
        box = _random_box(draws, 30, 40, 0.3)
        flip = bool(draws.random() < 0.5)
        flips.add(flip)
        for k in range(3):
            image = Image.fromarray(frames[start + k]).resize((16, 16), Image.BILINEAR, box=box)
            want = np.asarray(image)[:, ::-1] if flip else np.asarray(image)
            np.testing.assert_array_equal(clip[k], want)
    assert flips == {False, True}


def test_training_flips_are_left_right_and_half_of_the_time_unless_switched_off():
    half = np.zeros((16, 16, 3), np.uint8)
    half[:, 8:] = 255  # dark left, bright right
    for flip, want in [(True, range(40, 61)), (False, [0])]:
        spec = ClipSpec(
            num_frames=2, frame_rate=1.0, resize=16, crop=16, train_flip=flip, train_min_area=1.0
        )
        flipped = 0
        for seed in range(100):
            clip = augment_clip(1, lambda s: [half] * len(s), spec, np.random.default_rng(seed))
            if clip[0, 0, 0, 0] == 255:  # bright on the left: mirrored
                np.testing.assert_array_equal(clip[0], half[:, ::-1])
                flipped += 1
            else:
                np.testing.assert_array_equal(clip[0], half)
        assert flipped in want, (flip, flipped)


def test_random_boxes_stay_in_the_area_and_aspect_ranges_and_reach_every_edge():
    height, width = 60, 80
    boxes = [_random_box(np.random.default_rng(seed), height, width, 0.25) for seed in range(400)]
    areas, aspects = [], []
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # Sides are rounded to whole pixels: area and aspect within that rounding.
        areas.append(w * h / (height * width))
        aspects.append(w / h)
    assert 0.24 <= min(areas) < 0.3 and 0.9 < max(areas) <= 1.0
    assert 0.73 <= min(aspects) < 0.8 and 1.25 < max(aspects) <= 1.37
    # Every position is drawn, the right and bottom edges included.
    assert any(r == width and r - x < width for x, _, r, _ in boxes)
    assert any(b == height and b - t < height for _, t, _, b in boxes)
    assert any(x == 0 for x, *_ in boxes) and any(t == 0 for _, t, *_ in boxes)
    # A 2:1 frame has no box of the whole area within the aspect range: the centre square.
    for seed in range(3):
        assert _random_box(np.random.default_rng(seed), 40, 80, 1.0) == (20, 0, 60, 40)
        assert _random_box(np.random.default_rng(seed), 80, 40, 1.0) == (0, 20, 40, 60)


def test_a_variable_rate_video_is_sampled_at_its_average_rate(tmp_path):
    # As phones record: 30 frames 33 ms apart, then 30 frames 100 ms apart. The stream's
    # nominal rate is 30 fps, its average rate 60 frames in 3.8 s (300/19 fps); the official
    # rule takes the average (torchvision's video_fps), so frames 0, 9, 19, 29 at 1.6 fps.
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", 48, 64
        stream.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(index_frame(i, 48, 64), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 33 if i < 30 else 100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        rates = container.streams.video[0].average_rate, container.streams.video[0].guessed_rate
    assert rates == (Fraction(300, 19), 30)
    got = load_views(path, ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48))
    want, indices = reference_clip(path, 4, 1.6, resize=64, crop=48)
    np.testing.assert_array_equal(got[0], want)
    assert [read_index(f, short=64) for f in got[0]] == indices == [0, 9, 19, 29]


class _Wrapped:
    """An opened file whose `decode` goes through `decode(container, stream)` (a stand-in for a
    decoder that misbehaves), and whose other attributes are the file's."""

    def __init__(self, container, decode):
        self.container, self._decode = container, decode

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    def decode(self, stream):
        return self._decode(self.container, stream)


def test_a_decoder_giving_fewer_frames_than_the_stream_lists_fails_the_video(tmp_path, monkeypatch):
    # A decoder may drop frames it cannot decode: the clip would then lack frames the sampling
    # named. The file fails with a reason rather than a KeyError (or a shifted clip). (MPEG-4
    # in AVI: every frame is decoded in order; the skipping decoder's case is below.)
    path = write_video(tmp_path / "v.avi", (index_frame(i, 48, 64) for i in range(20)), 10)
    opened = video._open

    def drops_the_end(container, stream):  # the decoder stops after 12 frames
        return itertools.islice(container.decode(stream), 12)

    monkeypatch.setattr(video, "_open", lambda path: _Wrapped(opened(path), drops_the_end))
    spec = ClipSpec(num_frames=16, frame_rate=10.0, resize=64, crop=48)
    with pytest.raises(
        VideoError, match=r"^decoded fewer frames than the stream lists \(frame 12 is missing\)$"
    ):
        load_views(path, spec)


def test_a_decoder_error_mid_stream_fails_the_video_naming_the_error(tmp_path, monkeypatch):
    # The file opens and its packets are counted, then the decoder raises on frame 3: the
    # caller gets a VideoError (counted as a failed video), not PyAV's own error type.
    path = write_video(tmp_path / "v.avi", (index_frame(i, 48, 64) for i in range(20)), 10)
    opened = video._open

    def fails_at_3(container, stream):
        for position, frame in enumerate(container.decode(stream)):
            if position == 3:
                raise av.error.InvalidDataError(1094995529, "Invalid data found")
            yield frame

    monkeypatch.setattr(video, "_open", lambda p: _Wrapped(opened(p), fails_at_3))
    spec = ClipSpec(num_frames=4, frame_rate=4.0, resize=64, crop=48)
    with pytest.raises(VideoError, match=r"^InvalidDataError: \[Errno 1094995529\] Invalid data"):
        load_views(path, spec)


def test_decoding_stops_at_the_last_wanted_frame(tmp_path, monkeypatch):
    # A clip from the start of a long video decodes that start, not the whole file (in order,
    # as MPEG-4 in AVI is decoded; the skipping decoder's case is below).
    path = write_video(tmp_path / "v.avi", (index_frame(i, 48, 64) for i in range(20)), 10)
    opened, pulled = video._open, []

    def counted(container, stream):
        for frame in container.decode(stream):
            pulled.append(1)
            yield frame

    monkeypatch.setattr(video, "_open", lambda p: _Wrapped(opened(p), counted))
    got = load_views(path, ClipSpec(num_frames=4, frame_rate=5.0, resize=64, crop=48))
    assert [read_index(f, short=64) for f in got[0]] == [0, 2, 4, 6]
    assert len(pulled) == 7  # frames 0 to 6


B_FRAMES = {
    "libx264": {"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"},
    "libx265": {"x265-params": "bframes=3:b-adapt=0:b-pyramid=1:log-level=error"},
}


def _b_frame_video(path, codec, count=90, fps=30, size=(72, 128)):
    """`count` index frames with a B-frame in every slot the encoder allows (2 of every 4
    frames are then non-reference B-frames, which x264's defaults give real footage too)."""
    frames = (index_frame(i, *size) for i in range(count))
    return write_video(path, frames, fps, codec=codec, options=B_FRAMES[codec])


@pytest.mark.parametrize(
    "name,codec",
    [("h264.mp4", "libx264"), ("h264.mkv", "libx264"), ("hevc.mp4", "libx265")],
)
def test_skipping_non_reference_frames_changes_no_frame_taken(tmp_path, monkeypatch, name, codec):
    # H.264 and HEVC: the non-reference frames the clips do not take are not decoded, and the
    # model inputs are still the official pipeline's (which decodes every frame) to the bit.
    # With 8 frame threads: each packet's discard setting reaches the thread that decodes it.
    monkeypatch.setattr(video, "_decoder_threads", 8)
    path = _b_frame_video(tmp_path / name, codec)
    probed = video.probe_stream(path)
    assert probed.count == 90 and probed.stamps.size == 90 and (np.diff(probed.stamps) > 0).all()
    spec = ClipSpec(num_frames=4, frame_rate=10.0, resize=64, crop=48, num_clips=3, num_crops=3)
    got = load_views(path, spec)
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    indices = resample_indices(90, 30.0, 10.0)
    for c, start in enumerate(video.clip_starts(len(indices), spec)):
        clip = indices[start : start + 4].tolist()
        want = np.stack([reference_transform(every[i], 64, 48) for i in clip])
        np.testing.assert_array_equal(got[3 * c + 1], want)  # the centre crops
        assert [read_index(f, short=64) for f in got[3 * c + 1]] == clip
    # The skipping really happens: of frames 0-87, half are non-reference B-frames, and only
    # the 12 taken are decoded of those.
    wanted = set(resample_indices(90, 30.0, 10.0)[[0, 1, 2, 3, 13, 14, 15, 16, 26, 27, 28, 29]])
    with video._open(path) as container:
        frames, decoded = video._decode_skipping(container, wanted, probed.stamps)
    assert frames.keys() == wanted
    assert decoded < 60
    with video._open(path) as container:
        in_order = video._decode_in_order(container, wanted)
    for position, frame in frames.items():
        np.testing.assert_array_equal(frame, in_order[position])


def _remuxed(source, path, options=None):
    """`source`'s video packets copied into `path` (its container, with muxer `options`)."""
    with av.open(str(source)) as src, av.open(str(path), "w", options=options or {}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                dst.mux(packet)
    return path


# Encoder settings and containers the skipping decoder must give the same frames under: long
# B-frame runs, B-frames as references (pyramid), open GOPs, interlaced coding, many reference
# frames with weighted prediction, slices, intra refresh instead of keyframes, all-intra, HEVC's
# pyramid; and a fragmented mp4 (as DASH downloads are), a mov and a Matroska copy of a file.
SKIPPING_CASES = [
    ("a.mp4", "libx264", "bframes=16:b-adapt=0:b-pyramid=normal"),
    ("b.mkv", "libx264", "bframes=3:open-gop=1:keyint=12"),
    ("c.mp4", "libx264", "bframes=3:interlaced=1:tff=1"),
    ("d.mov", "libx264", "bframes=5:ref=16:weightb=1:slices=4"),
    ("e.mp4", "libx264", "bframes=4:intra-refresh=1"),
    ("f.mkv", "libx264", "keyint=1"),
    ("g.mp4", "libx265", "bframes=8:b-adapt=2:b-pyramid=1:log-level=error"),
]


def test_the_skipping_decoder_gives_every_encodings_frames(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, codec, params in SKIPPING_CASES:
        key = "x264-params" if codec == "libx264" else "x265-params"
        frames = (index_frame(i, 48, 64) for i in range(60))
        paths.append(write_video(tmp_path / name, frames, 25, codec=codec, options={key: params}))
    fragmented = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
    paths.append(_remuxed(paths[0], tmp_path / "fragmented.mp4", fragmented))
    paths.append(_remuxed(paths[0], tmp_path / "copy.mkv"))
    for path in paths:
        probed = video.probe_stream(path)
        assert probed.count == 60 and probed.stamps is not None, path.name
        for size in (1, 5, 16):
            wanted = sorted(rng.choice(60, size, replace=False).tolist())
            with video._open(path) as container:
                got, _ = video._decode_skipping(container, set(wanted), probed.stamps)
            want = video.decode_frames(path, wanted)  # every frame, in order
            assert got.keys() == want.keys(), path.name
            for i in wanted:
                np.testing.assert_array_equal(got[i], want[i], err_msg=f"{path.name} {i}")
            assert [read_index(want[i]) for i in wanted] == wanted, path.name


def test_frames_are_decoded_in_order_where_skipping_is_not_known_safe(tmp_path):
    # MPEG-4 in AVI (timestamps may be out of order there) and VP8: every frame in order.
    for name in ("v.avi", "v.webm"):
        path = write_video(tmp_path / name, (index_frame(i, 48, 64) for i in range(20)), 10)
        assert video.probe_stream(path).stamps is None
    # A frame whose timestamp the probe did not list: decoded again, in order.
    path = _b_frame_video(tmp_path / "v.mp4", "libx264", count=30)
    shifted = video.probe_stream(path).stamps + 1
    with video._open(path) as container:
        assert video._decode_skipping(container, {5, 20}, shifted)[0] is None
    frames = video.decode_frames(path, [20, 5], shifted)
    assert [read_index(frames[i], short=72) for i in (5, 20)] == [5, 20]


def test_an_open_gop_cut_without_re_encoding_is_decoded_in_order(tmp_path):
    # `ffmpeg -ss T -c copy cut.mkv` from an open-GOP stream: the cut starts at a keyframe
    # whose leading B-frames refer to frames left out, so the decoder never outputs them, yet
    # the container lists their packets. The skipping decoder, finding frames by timestamp,
    # missed the first positions and failed the video; it is decoded again in order.
    source = write_video(
        tmp_path / "source.mkv",
        (index_frame(i, 48, 64) for i in range(90)),
        25,
        options={"x264-params": "open-gop=1:keyint=30:min-keyint=30:scenecut=0:bframes=2"},
    )
    with av.open(str(source)) as src:
        packets = [p for p in src.demux(src.streams.video[0]) if p.size]
    start = [i for i, p in enumerate(packets) if p.is_keyframe][1]
    base = min(p.pts for p in packets[start:])
    cut = tmp_path / "cut.mkv"
    with av.open(str(source)) as src, av.open(str(cut), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in packets[start:]:
            packet.stream, packet.pts, packet.dts = stream, packet.pts - base, packet.dts - base
            dst.mux(packet)
    probed = video.probe_stream(cut)
    wanted = [0, 1, 5, 40]
    assert probed.stamps is not None and probed.count == len(packets) - start
    with video._open(cut) as container:
        skipped, _ = video._decode_skipping(container, set(wanted), probed.stamps)
    assert not {0, 1} & skipped.keys()  # never output
    frames = video.decode_frames(cut, wanted, probed.stamps)
    in_order = video.decode_frames(cut, wanted)  # every frame, in order
    for i in wanted:
        np.testing.assert_array_equal(frames[i], in_order[i], err_msg=str(i))
    # The first frame output is the keyframe the cut starts at.
    assert read_index(frames[0], short=48) == 30
    assert video.load_views(
        cut, ClipSpec(num_frames=4, frame_rate=5.0, resize=48, crop=48)
    ).shape == (1, 4, 48, 48, 3)


def test_the_skipping_decoder_fails_a_video_that_ends_early_or_breaks(tmp_path, monkeypatch):
    path = _b_frame_video(tmp_path / "v.mkv", "libx264", count=20)
    stamps = video.probe_stream(path).stamps
    with pytest.raises(
        VideoError, match=r"^decoded fewer frames than the stream lists \(frame 25 is missing\)$"
    ):
        video.decode_frames(path, [3, 25], stamps)
    opened = video._open

    class Breaks(_Wrapped):
        def demux(self, stream):
            for i, packet in enumerate(self.container.demux(stream)):
                if i == 5:
                    raise av.error.InvalidDataError(1094995529, "Invalid data found")
                yield packet

    monkeypatch.setattr(video, "_open", lambda p: Breaks(opened(p), None))
    with pytest.raises(VideoError, match=r"^InvalidDataError: \[Errno 1094995529\] Invalid data"):
        video.decode_frames(path, [3, 12], stamps)


def test_decode_frames_takes_positions_in_any_order(tmp_path):
    path = write_video(tmp_path / "v.mkv", (index_frame(i, 48, 64) for i in range(20)), 10)
    frames = video.decode_frames(path, [7, 2])
    assert sorted(frames) == [2, 7]
    assert [read_index(frames[i], short=48) for i in (2, 7)] == [2, 7]


def test_only_the_first_video_stream_is_read(tmp_path):
    # As torchvision reads video stream 0: a file with a second video stream (a preview, another
    # angle; here 8 frames at 4 fps, in reverse order) is counted and sampled from its first.
    path = tmp_path / "two.mkv"
    with av.open(str(path), mode="w") as container:
        streams = [
            (container.add_stream("libx264", rate=rate), rate, n) for rate, n in [(10, 20), (4, 8)]
        ]
        for stream, _, _ in streams:
            stream.pix_fmt, stream.height, stream.width = "yuv420p", 48, 64
        for stream, rate, count in streams:  # all streams are added before the first packet
            for i in range(count):
                index = i if rate == 10 else 19 - i
                frame = av.VideoFrame.from_ndarray(index_frame(index, 48, 64), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, rate)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    with av.open(str(path)) as container:
        assert [float(s.average_rate) for s in container.streams.video] == [10.0, 4.0]
    got = load_views(path, ClipSpec(num_frames=4, frame_rate=4.0, resize=64, crop=48))
    assert [read_index(f, short=64) for f in got[0]] == [0, 2, 5, 7]


def test_a_link_to_a_damaged_file_is_reported_as_damaged_not_missing(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    os.symlink("garbage.mp4", tmp_path / "link.mp4")
    spec = ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48)
    with pytest.raises(VideoError, match=r"^InvalidDataError: ") as error:
        load_views(tmp_path / "link.mp4", spec)
    assert "does not exist" not in str(error.value)


@pytest.mark.parametrize("rate", [None, Fraction(0, 1)])
def test_a_stream_without_a_frame_rate_fails_saying_so(tmp_path, monkeypatch, rate):
    path = write_video(tmp_path / "v.mkv", (index_frame(i, 48, 64) for i in range(20)), 10)
    opened = video._open

    class NoRate(_Wrapped):
        """The file, opened, whose video stream has no (or a zero) average frame rate."""

        streams = types.SimpleNamespace(video=[types.SimpleNamespace(average_rate=rate)])

    monkeypatch.setattr(video, "_open", lambda p: NoRate(opened(p), None))
    spec = ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48)
    with pytest.raises(VideoError, match=r"^the video stream has no average frame rate$"):
        load_views(path, spec)


def test_no_sampled_frame_is_too_short_for_every_loader(tmp_path):
    # 5 frames at 10 fps: shorter than one sampling step at 1.6 fps (6.25 frames).
    path = write_video(tmp_path / "blip.mp4", (index_frame(i, 48, 64) for i in range(5)), 10)
    spec = ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48)
    want = r"^no frames at 1.6 fps \(n=5, fps=10.000\)$"
    with pytest.raises(TooShortError, match=want):
        load_sampled_frames(path, spec)
    with pytest.raises(TooShortError, match=want):
        load_train_clip(path, spec, (0, 1))


def test_a_file_without_a_video_stream_is_named_so(tmp_path):
    _write_audio_only(tmp_path / "audio.mp4")
    spec = ClipSpec(num_frames=4, frame_rate=1.6, resize=64, crop=48)
    with pytest.raises(VideoError, match=r"^no video stream$"):
        load_views(tmp_path / "audio.mp4", spec)
