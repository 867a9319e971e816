"""A generated video task that no single frame can solve: is the object approaching or receding?

Each video shows one object (a disc, a square or a diamond, of a random bright colour, at a
random place) over a random dark textured background; the object grows steadily (`approaching`)
or shrinks steadily (`receding`). Every random choice is drawn from the same distribution for both
classes, and a receding video is an approaching video played backwards: the set of frames of a
video, taken without their order, has the same distribution in both classes, so any model that
treats the frames as an unordered set (frame averaging included) is at chance, while the order
of the frames gives the answer. (A frame together with its place in the clip is order
information: the first frame of an approaching video tends to show a smaller object than the
first frame of a receding one.) The videos are real H.264 mp4 files in the Kinetics folder
layout, at random frame rates (8-25 fps); each one is as long as the clip the demo samples from
it (`num_frames` at `frame_rate`, plus less than one sampled frame), so training and evaluation
see the same frames.

A second set, `frames/`, holds one-second still videos of the same objects labelled by size
(four classes): the demo pre-trains the frame model on it first, as STAM's ViT is pre-trained on
images before the temporal transformer is trained on videos.

    python -m stam_jax.data.demo --out DIR [--train 400 --val 200 --seed 0]

Layout: `DIR/videos/{train,val}/{approaching,receding}/*.mp4` and
`DIR/frames/{train,val}/{size_1_tiny,...}/*.mp4`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from stam_jax.cli import ArgumentParser
from stam_jax.data.synthetic import write_video
from stam_jax.paths import unwritable
from stam_jax.progress import progress_bar

MOTION_CLASSES = ("approaching", "receding")
SIZE_CLASSES = ("size_1_tiny", "size_2_small", "size_3_medium", "size_4_large")
SHAPES = ("disc", "square", "diamond")
FRAME_RATES = (8.0, 10.0, 12.5, 15.0, 24.0, 25.0)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes of the generated task.

    Attributes:
      size: frame side in pixels (square frames; the demo resizes to 36 and crops 32).
      num_frames: frames the demo samples per clip.
      frame_rate: the demo's sampling rate (frames per second).
      min_radius: smallest object radius (pixels).
      max_radius: largest object radius (pixels).
      min_change: smallest radius change over a clip (pixels).
    """

    size: int = 40
    num_frames: int = 8
    frame_rate: float = 4.0
    min_radius: float = 2.5
    max_radius: float = 16.0
    min_change: float = 4.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """What stays fixed within one video."""

    shape: str
    colour: tuple[int, int, int]
    background: np.ndarray  # (size, size, 3) uint8
    centre: tuple[float, float]  # (y, x) pixels


def random_scene(rng: np.random.Generator, geometry: Geometry) -> Scene:
    """A random shape, bright colour, dark textured background and centre."""
    s = geometry.size
    level = rng.integers(0, 80, 3)
    texture = rng.integers(-20, 21, (s // 4 + 1, s // 4 + 1, 3))
    texture = np.repeat(np.repeat(texture, 4, 0), 4, 1)[:s, :s]
    background = np.clip(level + texture, 0, 255).astype(np.uint8)
    margin = 0.3 * s
    centre = tuple(float(c) for c in rng.uniform(margin, s - margin, 2))
    colour = tuple(int(c) for c in rng.integers(140, 256, 3))
    return Scene(SHAPES[int(rng.integers(len(SHAPES)))], colour, background, centre)


def draw(scene: Scene, radius: float) -> np.ndarray:
    """One frame: the scene's object at `radius` (equal areas for every shape)."""
    s = scene.background.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    dy, dx = yy - scene.centre[0], xx - scene.centre[1]
    if scene.shape == "disc":
        mask = dy**2 + dx**2 <= radius**2
    elif scene.shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    else:
        mask = np.abs(dy) + np.abs(dx) <= radius * math.sqrt(math.pi / 2)
    frame = scene.background.copy()
    frame[mask] = scene.colour
    return frame


def motion_radii(
    rng: np.random.Generator, geometry: Geometry, label: int, count: int, fps: float
) -> np.ndarray:
    """Object radius per written frame: a linear ramp, up for label 0, down for label 1.

    The two end radii are drawn the same way for both classes; receding is approaching reversed.
    """
    low = rng.uniform(geometry.min_radius, geometry.max_radius - geometry.min_change)
    high = rng.uniform(low + geometry.min_change, geometry.max_radius)
    clip_seconds = (geometry.num_frames - 1) / geometry.frame_rate
    progress = np.clip(np.arange(count) / fps / clip_seconds, 0.0, 1.0)
    if label == 1:
        progress = 1.0 - progress
    return low + (high - low) * progress


def write_motion_video(
    path: Path, rng: np.random.Generator, geometry: Geometry, label: int
) -> dict[str, float]:
    """Writes one approaching (0) or receding (1) video; returns its parameters."""
    fps = float(FRAME_RATES[int(rng.integers(len(FRAME_RATES)))])
    # Exactly enough frames for one clip at the demo's sampling rate: n * rate / fps >= T.
    count = math.ceil(geometry.num_frames * fps / geometry.frame_rate)
    scene = random_scene(rng, geometry)
    radii = motion_radii(rng, geometry, label, count, fps)
    write_video(path, (draw(scene, r) for r in radii), Fraction(fps).limit_denominator(100))
    return {"fps": fps, "frames": count, "first_radius": radii[0], "last_radius": radii[-1]}


def size_class_radius(rng: np.random.Generator, geometry: Geometry, label: int) -> float:
    """A radius inside size class `label` (equal-width bins of the radius range)."""
    width = (geometry.max_radius - geometry.min_radius) / len(SIZE_CLASSES)
    return float(
        rng.uniform(geometry.min_radius + label * width, geometry.min_radius + (label + 1) * width)
    )


def write_dataset(
    out: str | Path,
    train: int = 400,
    val: int = 200,
    frames_train: int = 800,
    frames_val: int = 200,
    seed: int = 0,
    geometry: Geometry = Geometry(),
    progress: bool = True,
) -> dict[str, str]:
    """Writes the motion task and the frame pre-training set under `out` (see the module doc).

    Video i of a split has class i mod the class count (balanced when the count divides by
    it: 2 motion classes, 4 size classes); file names carry the index. Reproducible: the same
    arguments write the same files (every video has its own seed derived from (seed, split,
    index)).

    Args:
      out: the dataset folder (created; files already there are overwritten).
      train: approaching/receding videos in `videos/train`.
      val: approaching/receding videos in `videos/val`.
      frames_train: still videos labelled by size in `frames/train`.
      frames_val: still videos labelled by size in `frames/val`.
      seed: the seed every video's own seed derives from.
      geometry: frame size, clip length and object sizes.
      progress: a progress bar on stderr.

    Returns:
      The four split folders, by name ('videos/train', ...).
    """
    out = Path(out)
    jobs = []
    for split, count, salt in (("train", train, 1), ("val", val, 2)):
        for i in range(count):
            jobs.append(("videos", split, i, salt, MOTION_CLASSES[i % 2], i % 2))
    for split, count, salt in (("train", frames_train, 3), ("val", frames_val, 4)):
        for i in range(count):
            label = i % len(SIZE_CLASSES)
            jobs.append(("frames", split, i, salt, SIZE_CLASSES[label], label))
    # A folder written before with more videos keeps them otherwise, and a run would list them
    # with these: the generator's own file names in its class folders that this call does not
    # write are removed (nothing else is touched).
    planned = {out / j[0] / j[1] / j[4] / f"{j[4]}_{j[2]:05d}.mp4" for j in jobs}
    for kind, classes in (("videos", MOTION_CLASSES), ("frames", SIZE_CLASSES)):
        for split, name in ((s, c) for s in ("train", "val") for c in classes):
            for path in (out / kind / split / name).glob(f"{name}_{'[0-9]' * 5}.mp4"):
                if path not in planned:
                    path.unlink()
    bar = progress_bar(len(jobs), "generate", "video", progress)
    for kind, split, i, salt, name, label in jobs:
        rng = np.random.default_rng([seed, salt, i])
        path = out / kind / split / name / f"{name}_{i:05d}.mp4"
        if kind == "videos":
            write_motion_video(path, rng, geometry, label)
        else:
            scene = random_scene(rng, geometry)
            frame = draw(scene, size_class_radius(rng, geometry, label))
            fps = float(FRAME_RATES[int(rng.integers(len(FRAME_RATES)))])
            write_video(path, [frame] * math.ceil(fps), Fraction(fps).limit_denominator(100))
        bar.update(1)
    bar.close()
    info = {"seed": seed, "geometry": dataclasses.asdict(geometry), "train": train, "val": val}
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    return {f"{k}/{s}": str(out / k / s) for k in ("videos", "frames") for s in ("train", "val")}


def main(argv: list[str] | None = None) -> int:
    """Command line: writes the dataset and prints where."""
    parser = ArgumentParser(
        prog="python -m stam_jax.data.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="the folder to write (created if missing)")
    parser.add_argument("--train", type=int, default=400, help="motion videos for training")
    parser.add_argument("--val", type=int, default=200, help="motion videos for evaluation")
    parser.add_argument("--frames-train", type=int, default=800)
    parser.add_argument("--frames-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, classes in [
        ("train", MOTION_CLASSES),
        ("val", MOTION_CLASSES),
        ("frames_train", SIZE_CLASSES),
        ("frames_val", SIZE_CLASSES),
    ]:
        value = getattr(args, name)
        if value < len(classes):
            parser.error(
                f"--{name.replace('_', '-')}={value}: need at least {len(classes)} (one per "
                f"class: {', '.join(classes)})"
            )
    if args.seed < 0:
        parser.error(f"--seed={args.seed}: use a whole number >= 0")
    if not args.out.strip():  # it would be the current folder
        parser.error("--out is empty: name the folder to write the videos in")
    problem = unwritable(args.out, into=True)
    if problem:
        parser.error(f"--out={args.out}: {problem}; name a folder (created if missing)")
    folders = write_dataset(
        args.out, args.train, args.val, args.frames_train, args.frames_val, args.seed
    )
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
