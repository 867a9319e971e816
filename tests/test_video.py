"""Clip sampling and frame transform against an independent implementation of the official rule."""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stam_jax.data.synthetic import index_frame, read_index, write_video
from stam_jax.data.video import (
    ClipSpec,
    TooShortError,
    VideoError,
    crop_offsets,
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
    # round() is Python's (half to even): (455 - 224) / 2 = 115.5 -> 116,
    # (341 - 224) / 2 = 58.5 -> 58.
    assert crop_offsets(256, 455, 224, "center") == (16, 116)
    assert crop_offsets(256, 341, 224, "center") == (16, 58)
    assert crop_offsets(256, 341, 224, "start") == (16, 0)
    assert crop_offsets(256, 341, 224, "end") == (16, 117)
    assert crop_offsets(341, 256, 224, "end") == (117, 16)
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
    for rate in (0, -1.6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"frame_rate={rate}; use a positive number"):
            ClipSpec(frame_rate=rate)
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
