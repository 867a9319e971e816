"""Writing real video files with PyAV, and frames whose index survives lossy compression.

Used by the tests (and the demo) to make Kinetics-style folders without downloading anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx"}
INDEX_BITS = 10  # frames up to 1023 are identifiable


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    codec: str | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encodes RGB uint8 frames `(H, W, 3)` (even H and W) into a video file.

    Args:
      path: output file; the extension picks the container (mp4, mkv, avi, webm).
      frames: the frames, in order.
      fps: frame rate; a Fraction (e.g. Fraction(30000, 1001)) for NTSC rates.
      codec: encoder; default by extension (H.264 for mp4/mkv, MPEG-4 part 2 for avi, VP8
        for webm).
      options: encoder options, e.g. `{"x264-params": "bframes=3:b-adapt=0"}` for a B-frame
        in every slot x264 allows.

    Returns:
      The path written.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec or CODECS[path.suffix], rate=rate)
        stream.pix_fmt = "yuv420p"
        if options:
            stream.options = options
        first = True
        for frame in frames:
            if first:
                stream.height, stream.width = frame.shape[:2]
                first = False
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _bar_area(height: int, width: int, short: float) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of the bar area: the upper part of the central square."""
    cy, cx = height / 2, width / 2
    return cy - 0.4 * short, cy - 0.1 * short, cx - 0.4 * short, cx + 0.4 * short


def index_frame(index: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured frame whose central square shows `index` as black/white bars.

    The bars lie inside the central 80% of the shorter side, so they survive any resize and
    centre crop of the official transform, and lossy codecs (see `read_index`); the texture gives
    the encoder, the resize and the crop real detail to reproduce exactly.
    """
    rng = np.random.default_rng(seed * 100_003 + index)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    frame = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width].copy()
    top, bottom, left, right = _bar_area(height, width, min(height, width))
    edges = np.linspace(left, right, INDEX_BITS + 1).astype(int)
    for b in range(INDEX_BITS):
        frame[int(top) : int(bottom), edges[b] : edges[b + 1]] = 255 * ((index >> b) & 1)
    return frame


def write_index_video(
    path: str | Path, seed: int = 0, height: int = 256, width: int = 340, frames: int = 300
) -> Path:
    """`frames` `index_frame`s (texture `seed`) at 30 fps: by default a 10-s 340x256 H.264 clip,
    Kinetics-like in length and size (the benchmarks' test video)."""
    return write_video(path, (index_frame(j, height, width, seed=seed) for j in range(frames)), 30)


def read_index(frame: np.ndarray, short: float | None = None) -> int:
    """Recovers the index of an `index_frame` after resizing and centre cropping.

    Args:
      frame: the frame, `(H, W, 3)`.
      short: the original frame's shorter side in this frame's pixels (default: the shorter side
        of `frame`; pass the resize target, e.g. 256, for a centre crop of a resized frame).

    Returns:
      The encoded index.
    """
    height, width = frame.shape[:2]
    top, bottom, left, right = _bar_area(height, width, short or min(height, width))
    rows = frame[int(top + 0.25 * (bottom - top)) : int(bottom - 0.25 * (bottom - top))]
    levels = rows.astype(np.float32).mean(axis=(0, 2))
    step = (right - left) / INDEX_BITS
    index = 0
    for b in range(INDEX_BITS):
        lo, hi = int(left + (b + 0.25) * step), int(left + (b + 0.75) * step)
        index |= int(levels[lo:hi].mean() > 127) << b
    return index
