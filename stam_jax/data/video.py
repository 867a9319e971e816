"""Clip sampling and the frame transform of the official STAM evaluation, on PyAV.

The official pipeline is torchvision's `Kinetics400`/`VideoClips` with `frame_rate` resampling,
then per frame `ToPILImage -> Resize(256) -> CenterCrop(224) -> ToTensor`. This module produces
the same uint8 frames (the `/255` of `ToTensor` happens on the device):

- files are opened as torchvision's `read_video` opens them, ignoring metadata (titles, tags)
  that is not UTF-8;
- a rotation tag (display matrix, as phones write for video filmed upright) is not applied:
  frames are taken as coded, as torchvision takes them from PyAV, so such a video reaches the
  model on its side, in the official evaluation as here;
- the frame list is the video stream's packets with a timestamp, in presentation order; `fps` is
  the stream's average frame rate;
- `step = fps / frame_rate`, `total = floor(n * frame_rate / fps)`; indices are every step-th
  frame when `step` is whole, else `floor(i * step)` for i < total in float32 arithmetic;
- a clip is T consecutive indices; the official evaluation takes the first;
- frames are decoded to RGB by PyAV (`to_ndarray(format='rgb24')`, as torchvision does), resized
  by PIL bilinear (shorter side to 256, longer side `int(256 * long / short)`) and centre-cropped
  with `round((size - 224) / 2)` offsets (Python's round).

Where the official pipeline decodes every frame, H.264 and HEVC streams (not in AVI) are
decoded here without the non-reference frames that no clip takes: no frame is predicted from
those, so every frame taken is the same to the bit (`decode_frames`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CROPS = {1: ("center",), 3: ("start", "center", "end")}


class VideoError(Exception):
    """A file that cannot be decoded (corrupt, truncated, no video stream, ...)."""


class TooShortError(VideoError):
    """A video with fewer sampled frames than the clip length."""


# The longest frame side a clip may be resized to: past it, frames take gigabytes each.
MAX_SIDE = 4096
# Sampled frames per second, at most: above any video's own rate (a rate above a video's
# repeats its frames, as the official sampling does).
MAX_FRAME_RATE = 1000.0


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How clips are sampled and transformed.

    Attributes:
      num_frames: T, frames per clip.
      frame_rate: sampled frames per second (1.6 for stam_16, 6.4 for stam_64).
      resize: shorter side after resizing (256 officially; 1 to `MAX_SIDE`).
      crop: side of the square crop (224 officially; at most `resize`).
      num_clips: temporal clips per video, uniformly spaced (1 officially: the first T frames).
      num_crops: spatial crops per clip, 1 (centre, official) or 3 (both ends and centre of the
        longer side).
      short_videos: 'official' (a video with fewer than T sampled frames is dropped, as the
        official code does) or 'pad' (kept: its last sampled frame is repeated up to T).
      train_flip: training clips are flipped horizontally half of the time (turn it off where
        left and right are different classes).
      train_min_area: smallest area fraction of a training clip's random resized crop (1.0:
        the whole frame, resized).

    Raises:
      ValueError: on construction, a field of the wrong type or out of the ranges above
        (naming the field).
    """

    num_frames: int = 16
    frame_rate: float = 1.6
    resize: int = 256
    crop: int = 224
    num_clips: int = 1
    num_crops: int = 1
    short_videos: str = "official"
    train_flip: bool = True
    train_min_area: float = 0.25

    def __post_init__(self) -> None:
        # Types first: a float size failed in numpy at the first video, a string in a
        # comparison, and train_flip='no' (truthy) flipped clips.
        for name in ("num_frames", "resize", "crop", "num_clips", "num_crops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r}; use an int.")
        for name in ("frame_rate", "train_min_area"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r}; use a number.")
        if not isinstance(self.train_flip, bool | np.bool_):
            raise ValueError(f"train_flip={self.train_flip!r}; use True or False.")
        if self.num_crops not in CROPS:
            raise ValueError(f"num_crops={self.num_crops}; use 1 (official) or 3.")
        if self.num_clips < 1 or self.num_frames < 1:
            raise ValueError(f"num_clips={self.num_clips}, num_frames={self.num_frames}: use >= 1.")
        if self.short_videos not in ("official", "pad"):
            raise ValueError(f"short_videos={self.short_videos!r}; use 'official' or 'pad'.")
        for name in ("resize", "crop"):
            side = getattr(self, name)
            if not 1 <= side <= MAX_SIDE:
                raise ValueError(
                    f"{name}={side}; use a side of 1 to {MAX_SIDE} pixels (256 and 224 officially)."
                )
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} is larger than resize={self.resize}.")
        if not (math.isfinite(self.frame_rate) and 0 < self.frame_rate <= MAX_FRAME_RATE):
            # A rate far above any video's made index arrays of n * rate / fps entries: 1e9
            # asked for gigabytes per video, a MemoryError each, the run going on for nothing.
            raise ValueError(
                f"frame_rate={self.frame_rate}; use a number of frames per second in (0, "
                f"{MAX_FRAME_RATE:g}] (1.6 for stam_16, 6.4 for stam_64)."
            )
        if not 0 < self.train_min_area <= 1:
            raise ValueError(
                f"train_min_area={self.train_min_area}; use an area fraction in (0, 1] "
                "(1.0: the whole frame)."
            )

    @property
    def num_views(self) -> int:
        """Model inputs per video: num_clips * num_crops."""
        return self.num_clips * self.num_crops


def resample_indices(num_frames: int, fps: float, frame_rate: float) -> np.ndarray:
    """Indices of the frames kept when resampling `num_frames` at `fps` to `frame_rate`.

    Args:
      num_frames: frames in the stream (n).
      fps: the stream's average frame rate.
      frame_rate: target rate.

    Returns:
      int64 indices into the stream's frames, in order.
    """
    step = fps / frame_rate
    if float(step).is_integer():
        return np.arange(0, num_frames, int(step), dtype=np.int64)
    total = math.floor(num_frames * frame_rate / fps)
    # float32 products, as torch.arange(float32) * step computes them.
    products = np.arange(total, dtype=np.float32) * np.float32(step)
    return np.floor(products).astype(np.int64)


def clip_starts(num_indices: int, spec: ClipSpec) -> list[int]:
    """Start positions (into the resampled indices) of the clips of one video."""
    last = max(num_indices - spec.num_frames, 0)
    if spec.num_clips == 1:
        return [0]
    return [round(i * last / (spec.num_clips - 1)) for i in range(spec.num_clips)]


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after `Resize(short)`: the shorter side becomes `short`."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def crop_offsets(height: int, width: int, crop: int, position: str) -> tuple[int, int]:
    """(top, left) of a `crop` square at `position` 'center', 'start' or 'end' (`CROPS`).

    'start'/'end' move along the longer side only; the other side is centred.

    Raises:
      ValueError: another `position` (e.g. 'centre'), which would be taken as 'start'.
    """
    if position not in CROPS[3]:
        raise ValueError(f"crop position {position!r}; use one of {CROPS[3]}.")
    top, left = round((height - crop) / 2.0), round((width - crop) / 2.0)
    if position == "center":
        return top, left
    end = position == "end"
    if width >= height:
        return top, (width - crop) if end else 0
    return (height - crop) if end else 0, left


def transform_frame(frame: np.ndarray, spec: ClipSpec) -> list[np.ndarray]:
    """Resize + crops of one RGB uint8 frame `(H, W, 3)`; one array per spatial crop."""
    from PIL import Image

    h, w = resized_size(frame.shape[0], frame.shape[1], spec.resize)
    resized = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
    out = []
    for position in CROPS[spec.num_crops]:
        top, left = crop_offsets(h, w, spec.crop, position)
        out.append(resized[top : top + spec.crop, left : left + spec.crop])
    return out


def _open(path: str | Path) -> Any:
    """The file opened for reading as torchvision opens it: metadata (titles, tags) that is not
    UTF-8 is ignored, where PyAV's default refused the whole file."""
    import av

    return av.open(str(path), metadata_errors="ignore")


# Threads each video's decoder may use (FFmpeg's thread_count; 0: one per core). Decoding
# processes that share the cores each take their share (`set_decoder_threads`).
_decoder_threads = 0


def set_decoder_threads(count: int) -> None:
    """Sets how many threads each video's decoder uses in this process: 0 lets FFmpeg take one
    per core (for a process decoding alone), 1 none besides the caller's (for one of as many
    decoding processes as cores: frame threads there only contend)."""
    global _decoder_threads
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"decoder threads {count!r}: use 0 (one per core) or a count >= 1.")
    _decoder_threads = count


def _threaded(stream: Any) -> None:
    """Lets `stream`'s decoder decode frames in parallel, in `_decoder_threads` threads."""
    stream.thread_type = "AUTO"
    stream.thread_count = _decoder_threads


# Codecs whose decoders leave out a non-reference frame when told to (AVDISCARD_NONREF), giving
# each frame they do decode its packet's timestamp.
SKIPPING_CODECS = frozenset({"h264", "hevc"})


@dataclasses.dataclass(frozen=True)
class Probed:
    """What `probe_stream` reads of a file's first video stream.

    Attributes:
      count: frames in the stream (its packets with a timestamp).
      fps: the stream's average frame rate.
      stamps: the packets' timestamps, sorted (int64; a frame's position in presentation
        order is its timestamp's index), when the decoder may skip frames (`decode_frames`):
        an H.264 or HEVC stream, not in AVI, whose packets each have a timestamp of their own
        and are neither marked to discard nor corrupt. Else None.
    """

    count: int
    fps: float
    stamps: np.ndarray | None


def probe_stream(path: str | Path) -> Probed:
    """The frame count, frame rate and packet timestamps of the first video stream, from its
    packets (nothing is decoded).

    Raises:
      VideoError: a file that cannot be opened or demuxed (missing, a broken link, damaged),
        or with no video stream, no frame rate or no frames.
    """
    try:
        with _open(path) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            if stream.average_rate is None or float(stream.average_rate) <= 0:
                raise VideoError("the video stream has no average frame rate")
            fps = float(stream.average_rate)
            skippable = stream.codec_context.name in SKIPPING_CODECS and not any(
                "avi" in name for name in container.format.name.split(",")
            )
            stamps = []
            for packet in container.demux(stream):
                if packet.pts is None:
                    skippable = skippable and not packet.size  # only the final empty one
                    continue
                stamps.append(packet.pts)
                skippable = skippable and packet.size > 0
                skippable = skippable and not (packet.is_discard or packet.is_corrupt)
    except VideoError:
        raise
    except Exception as e:  # PyAV raises many error types for damaged files
        if os.path.islink(path) and not os.path.exists(path):
            raise VideoError(f"a link to {os.readlink(path)}, which does not exist") from None
        raise VideoError(f"{type(e).__name__}: {e}") from None
    if not stamps:
        raise VideoError("the video stream has no frames")
    sorted_stamps = np.unique(np.asarray(stamps, np.int64))  # 8 bytes a frame, for long videos
    unique = sorted_stamps.size == len(stamps)
    return Probed(len(stamps), fps, sorted_stamps if skippable and unique else None)


def probe(path: str | Path) -> tuple[int, float]:
    """(number of frames, average fps) of the first video stream, from packet timestamps.

    Raises:
      VideoError: as `probe_stream`.
    """
    probed = probe_stream(path)
    return probed.count, probed.fps


def decode_frames(
    path: str | Path, wanted: Sequence[int], stamps: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """Decodes the frames at `wanted` positions (presentation order) as RGB uint8 arrays.

    Every frame up to the last wanted one is decoded, except, given `stamps`
    (`probe_stream`'s), the non-reference frames that are not wanted: no other frame is
    predicted from one, so the frames decoded are the same to the bit, and the clip's
    frames are found by their timestamps. Should a decoded frame's timestamp not be one of
    `stamps`, or a wanted one never be decoded (the leading B-frames of an open GOP cut
    from a stream without re-encoding, which refer to frames left out), the frames are
    decoded again without skipping, positions counted in decoding order.

    Returns:
      position -> `(H, W, 3)` uint8 frame, for every position in `wanted`.

    Raises:
      VideoError: a file that cannot be decoded, or that ends before a wanted position.
    """
    wanted_set = set(int(i) for i in wanted)
    frames: dict[int, np.ndarray] | None = None
    try:
        if stamps is not None:
            with _open(path) as container:
                frames, _ = _decode_skipping(container, wanted_set, stamps)
            if frames is not None and not wanted_set <= frames.keys():
                frames = None  # positions by timestamp are not those of the frames decoded
        if frames is None:
            with _open(path) as container:
                frames = _decode_in_order(container, wanted_set)
    except Exception as e:
        raise VideoError(f"{type(e).__name__}: {e}") from None
    missing = wanted_set - frames.keys()
    if missing:
        raise VideoError(
            f"decoded fewer frames than the stream lists (frame {min(missing)} is missing)"
        )
    return frames


def _decode_in_order(container: Any, wanted: set[int]) -> dict[int, np.ndarray]:
    """The `wanted` frames, every frame decoded up to the last of them."""
    stream = container.streams.video[0]
    _threaded(stream)
    frames = {}
    last = max(wanted)
    # Decoders emit frames in presentation order: position = index in the frame list.
    for position, frame in enumerate(container.decode(stream)):
        if position in wanted:
            frames[position] = frame.to_ndarray(format="rgb24")
        if position >= last:
            break
    return frames


def _position(stamps: np.ndarray, stamp: int | None) -> int | None:
    """The index of `stamp` in the sorted `stamps`, or None where it is not one of them."""
    if stamp is None:
        return None
    index = int(np.searchsorted(stamps, stamp))
    return index if index < stamps.size and stamps[index] == stamp else None


def _decode_skipping(
    container: Any, wanted: set[int], stamps: np.ndarray
) -> tuple[dict[int, np.ndarray] | None, int]:
    """The `wanted` frames, the decoder skipping the non-reference frames of the packets whose
    frames are not wanted (None: a frame whose timestamp `stamps` lacks), and how many
    frames were decoded."""
    stream = container.streams.video[0]
    _threaded(stream)
    context = stream.codec_context
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    for packet in container.demux(stream):
        if packet.size:  # the empty packet at the end flushes the decoder
            # Read by the decoder for the next packet it is sent (its threads included).
            taken = _position(stamps, packet.pts) in wanted
            context.skip_frame = "DEFAULT" if taken else "NONREF"
        for frame in packet.decode():
            decoded += 1
            position = _position(stamps, frame.pts)
            if position is None:
                return None, decoded
            if position in wanted:
                frames[position] = frame.to_ndarray(format="rgb24")
        if len(frames) == len(wanted):
            break
    return frames, decoded


def load_views(path: str | Path, spec: ClipSpec) -> np.ndarray:
    """Samples, decodes and transforms one video.

    Args:
      path: a video file.
      spec: sampling and transform.

    Returns:
      uint8 `(num_views, T, crop, crop, 3)`, views ordered clip-major then crop.

    Raises:
      TooShortError: fewer than T sampled frames and `spec.short_videos == 'official'`, or
        none at all.
      VideoError: the file cannot be read.
    """
    probed = probe_stream(path)
    count, fps = probed.count, probed.fps
    indices = resample_indices(count, fps, spec.frame_rate)
    t = spec.num_frames
    if len(indices) < t:
        if len(indices) == 0 and spec.short_videos == "pad":
            raise TooShortError(
                f"no frame at {spec.frame_rate} fps (n={count}, fps={fps:.3f}): the video is "
                f"shorter than one sampling step of {fps / spec.frame_rate:g} frames, so "
                "short_videos='pad' has no frame to repeat"
            )
        if spec.short_videos == "official":
            raise TooShortError(
                f"{len(indices)} frames at {spec.frame_rate} fps (n={count}, fps={fps:.3f}); "
                f"a clip needs {t}"
            )
        indices = np.concatenate([indices, np.full(t - len(indices), indices[-1])])
    clips = [indices[s : s + t] for s in clip_starts(len(indices), spec)]
    frames = decode_frames(path, np.concatenate(clips), probed.stamps)
    views = np.empty((spec.num_clips, spec.num_crops, t, spec.crop, spec.crop, 3), np.uint8)
    cache: dict[int, list[np.ndarray]] = {}
    for c, clip in enumerate(clips):
        for f, index in enumerate(clip):
            if index not in cache:
                cache[int(index)] = transform_frame(frames[int(index)], spec)
            for k, crop in enumerate(cache[int(index)]):
                views[c, k, f] = crop
    return views.reshape(spec.num_views, t, spec.crop, spec.crop, 3)


def load_sampled_frames(path: str | Path, spec: ClipSpec) -> np.ndarray:
    """Every frame the sampling rate keeps, resized (shorter side `spec.resize`), not cropped.

    Returns:
      uint8 `(n, H, W, 3)`, n the number of sampled frames (>= 1).

    Raises:
      TooShortError: the sampling keeps no frame.
      VideoError: the file cannot be read.
    """
    from PIL import Image

    probed = probe_stream(path)
    count, fps = probed.count, probed.fps
    indices = resample_indices(count, fps, spec.frame_rate)
    if len(indices) == 0:
        raise TooShortError(f"no frames at {spec.frame_rate} fps (n={count}, fps={fps:.3f})")
    frames = decode_frames(path, indices, probed.stamps)
    height, width = frames[int(indices[0])].shape[:2]
    h, w = resized_size(height, width, spec.resize)
    out = np.empty((len(indices), h, w, 3), np.uint8)
    for f, index in enumerate(indices):
        out[f] = np.asarray(Image.fromarray(frames[int(index)]).resize((w, h), Image.BILINEAR))
    return out


def load_train_clip(path: str | Path, spec: ClipSpec, seed: Sequence[int]) -> np.ndarray:
    """Samples one augmented training clip from a video file, reproducibly from `seed`.

    See `augment_clip`; the crop is taken from the full-resolution frames.

    Args:
      path: a video file.
      spec: sampling (`num_frames`, `frame_rate`) and output size (`crop`).
      seed: integers that fix every random choice (e.g. (run seed, epoch, position)).

    Returns:
      uint8 `(T, crop, crop, 3)`.

    Raises:
      ValueError: `seed` is not a sequence of ints >= 0 (one int, a float).
      TooShortError: the sampling keeps no frame.
      VideoError: the file cannot be read.
    """
    if np.ndim(seed) != 1 or not all(isinstance(s, numbers.Integral) and s >= 0 for s in seed):
        # One int failed with "'int' object is not iterable"; floats were truncated.
        raise ValueError(
            f"seed={seed!r}; pass a sequence of ints >= 0 that differs per clip, e.g. "
            "(run_seed, step, index)."
        )
    rng = np.random.default_rng([int(s) for s in seed])
    probed = probe_stream(path)
    count, fps = probed.count, probed.fps
    indices = resample_indices(count, fps, spec.frame_rate)
    if len(indices) == 0:
        raise TooShortError(f"no frames at {spec.frame_rate} fps (n={count}, fps={fps:.3f})")

    def fetch(slots: list[int]) -> list[np.ndarray]:
        wanted = indices[slots]
        frames = decode_frames(path, wanted, probed.stamps)
        return [frames[int(i)] for i in wanted]

    return augment_clip(len(indices), fetch, spec, rng)


def augment_clip(
    count: int,
    fetch: Callable[[list[int]], list[np.ndarray]],
    spec: ClipSpec,
    rng: np.random.Generator,
) -> np.ndarray:
    """One augmented training clip from a video's `count` sampled frames.

    Augmentation: a random temporal offset among the clips the sampling rule allows (short
    videos repeat their last sampled frame), one random resized crop (area `train_min_area`-100%
    of the frame, aspect ratio 3/4-4/3, resized to `spec.crop` with PIL bilinear) and one random
    horizontal flip (`train_flip`), the same for every frame of the clip.

    Args:
      count: sampled frames available (>= 1).
      fetch: sampled-frame numbers -> their RGB frames, uint8 arrays or PIL images (all of one
        size).
      spec: clip length (`num_frames`), output size (`crop`), augmentation settings.
      rng: the source of every random choice (drawn in a fixed order: offset, box, flip).

    Returns:
      uint8 `(T, crop, crop, 3)`.
    """
    from PIL import Image

    t = spec.num_frames
    slots = list(range(count)) + [count - 1] * max(t - count, 0)
    start = int(rng.integers(0, len(slots) - t + 1))
    frames = [
        f if isinstance(f, Image.Image) else Image.fromarray(f)
        for f in fetch(slots[start : start + t])
    ]
    width, height = frames[0].size
    box = _random_box(rng, height, width, spec.train_min_area)
    flip = bool(rng.random() < 0.5) and spec.train_flip
    out = np.empty((t, spec.crop, spec.crop, 3), np.uint8)
    for f, frame in enumerate(frames):
        image = frame.resize((spec.crop, spec.crop), Image.BILINEAR, box=box)
        # PIL's flip: a numpy [:, ::-1] copy of 3-byte pixels costs 10x more.
        out[f] = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
    return out


def _random_box(
    rng: np.random.Generator, height: int, width: int, min_area: float
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop; the centre square as a fallback."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
