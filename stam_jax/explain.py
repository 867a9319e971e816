"""What STAM looks at in one video: temporal and spatial attention, as one picture (PNG by default).

    python -m stam_jax.explain --checkpoint CKPT_DIR VIDEO [--out FILE.png] [--classes FILE]
        [--frame-rate FPS]

The video is sampled and transformed exactly as the evaluation does. The picture shows the
sampled frames as a strip with the spatial attention rollout of each frame's ViT overlaid, the
weight each frame gets from the temporal cls token (per layer, heads averaged, and rolled out
across layers), and the top-5 classes with their probabilities. A model that averages its frames
(`aggregate='mean'`, no temporal transformer) has no temporal attention: that panel then shows
the equal weight 1/T of every frame, labelled as such.

The frames are sampled at `--frame-rate` (default T / 10 s: T frames over the first 10 s, as the
released models were evaluated); `--out` is a .png, .pdf, .svg or .jpg file (no suffix: .png),
its missing folders are created, and an existing file of that name is replaced. A bad video
path, flag or `--out` is refused before the checkpoint is loaded; params holding NaN or Inf (a
run that diverged), or probabilities or attention that come out NaN or Inf, are refused too:
nothing is drawn.

Attention rollout (Abnar & Zuidema, 2020): per layer, the heads' mean attention plus the identity
(the residual path), rows renormalised; the product over layers; the cls token's row of it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser
from stam_jax.paths import new_folders_removed_on_failure, staged, unwritable

# Frame rate per clip length of the released models: T frames over the first 10 s.
SECONDS = 10.0
# What --out may end with (matplotlib writes these; .png when there is no suffix).
SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def rollout(layers: list[np.ndarray]) -> np.ndarray:
    """Attention rollout over layers.

    Args:
      layers: per layer, attention probabilities `(..., heads, tokens, tokens)` in layer order.

    Returns:
      `(..., tokens, tokens)`: how much each token's final state draws on each input token.
    """
    result = None
    for weights in layers:
        mean = weights.mean(axis=-3)
        tokens = mean.shape[-1]
        mixed = 0.5 * mean + 0.5 * np.eye(tokens, dtype=mean.dtype)
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        result = mixed if result is None else mixed @ result
    if result is None:
        raise ValueError("rollout needs at least one layer")
    return result


def check_frame_rate(frame_rate: float | None, name: str = "frame_rate") -> None:
    """Refuses a sampling rate outside (0, `MAX_FRAME_RATE`] (None: the default).

    Raises:
      ValueError: naming `name` (the flag, for the CLI) and the default.
    """
    from stam_jax.data.video import MAX_FRAME_RATE

    if frame_rate is not None and not (
        math.isfinite(frame_rate) and 0 < frame_rate <= MAX_FRAME_RATE
    ):
        raise ValueError(
            f"{name} {frame_rate:g}: use a number of frames per second in (0, "
            f"{MAX_FRAME_RATE:g}], or leave it out for the default T / {SECONDS:g} s (T frames "
            f"over the first {SECONDS:g} s)."
        )


def check_video(video: str | Path) -> Path:
    """The video path, refused unless it is a file that can be opened.

    Raises:
      ValueError: missing, a directory, or unreadable; the message names the path.
    """
    path = Path(video)
    if not path.exists():
        raise ValueError(f"video {path} does not exist; pass the path of a video file.")
    if not path.is_file():
        raise ValueError(f"video {path} is a directory, not a video file; pass one video.")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"video {path} cannot be opened ({e.strerror or e}).") from None
    return path


def output_path(out: str | Path | None, video: str | Path) -> Path:
    """The file the picture goes to, checked before any work.

    Args:
      out: `--out`: a .png/.pdf/.svg/.jpg file, `.png` appended when it has no suffix; None for
        VIDEO's name + `.explain.png` in the current folder.
      video: the video path (for the default name).

    Returns:
      The path that will be written (missing parent folders are created when it is).

    Raises:
      ValueError: a directory, an unsupported suffix, or a parent that is not a writable folder.
    """
    default = f"{Path(video).name}.explain.png"
    if out is None:
        path = Path(default)
    else:
        text = str(out)
        path = Path(text)
        if path.is_dir() or text.endswith(("/", os.sep)):
            raise ValueError(
                f"--out {text} is a directory; name the picture file, e.g. {path / default}."
            )
        if not path.suffix and path.name.lower() in SUFFIXES:  # "out/.png": a suffix, no name
            raise ValueError(
                f"--out {text} is only a suffix, with no name before it; name the picture, "
                f"e.g. {path.parent / default}."
            )
        if not path.suffix:
            path = path.with_name(path.name + ".png")
        elif path.suffix.lower() not in SUFFIXES:
            raise ValueError(
                f"--out {text}: pictures cannot be written as {path.suffix!r}; end it with "
                f"{', '.join(SUFFIXES[:-1])} (no suffix: .png)."
            )
        if path.is_dir():
            raise ValueError(f"--out {path} is a directory; name the picture file.")
    problem = unwritable(path)
    if problem:
        raise ValueError(f"cannot write --out {path}: {problem}; choose another path.")
    return path


def _video_error(video: Path, error: Exception) -> str:
    """One readable line for a file PyAV cannot read (no errno, no repeated path)."""
    text = re.sub(r"\[Errno -?\d+\] ", "", str(error))
    text = text.replace(f": '{video}'", "").replace(f": {video}", "")
    return f"cannot read {video} as a video: {text}"


def _sampling(video: Path, num_frames: int, frame_rate: float | None) -> float:
    """The clip spec's rate, refused (with the rate that would fit) when the video is too short.

    Returns:
      The sampling rate.

    Raises:
      VideoError: the file cannot be read. TooShortError: fewer than `num_frames` frames.
    """
    from stam_jax.data.video import TooShortError, VideoError, probe, resample_indices

    rate = frame_rate if frame_rate is not None else num_frames / SECONDS
    try:
        count, fps = probe(video)
    except VideoError as e:
        raise VideoError(_video_error(video, e)) from None
    got = len(resample_indices(count, fps, rate))
    if got >= num_frames:
        return rate
    which = (
        f"the default: T / {SECONDS:g} s, T = {num_frames}"
        if frame_rate is None
        else "--frame-rate"
    )
    frames = "frame" if got == 1 else "frames"
    where = f"{video} gives only {got} {frames} at {rate:g} fps ({which})"
    have = (
        f"it has {count} {'frame' if count == 1 else 'frames'} at {fps:g} fps, {count / fps:.1f} s"
    )
    fit = math.ceil(num_frames * fps / count * 100) / 100
    while len(resample_indices(count, fps, fit)) < num_frames:
        fit = round(fit + 0.01, 2)
    if fit <= fps:
        fix = f"pass --frame-rate {fit:g} (or more) or use a longer video"
    elif count >= num_frames and len(resample_indices(count, fps, fps)) >= num_frames:
        # Exactly enough frames at an NTSC rate (29.97002997...): the 0.01 grid passes fps.
        fix = f"pass --frame-rate {fps!r} (the video's own rate) or use a longer video"
    else:  # fewer frames than the clip: only repeated frames would fill it
        fix = "use a longer video"
    raise TooShortError(f"{where}; a clip needs {num_frames} ({have}): {fix}.")


def explain_video(
    checkpoint: str | Path, video: str | Path, frame_rate: float | None = None
) -> dict[str, Any]:
    """Runs the model on one video and returns everything the picture shows.

    The video path, the rate and whether the video is long enough are checked before the
    checkpoint's params are loaded.

    Args:
      checkpoint: a stam-jax checkpoint directory.
      video: a video file.
      frame_rate: sampling rate; default (None) T / 10 s (the released models' protocol).

    Returns:
      A dict: `frames` (T, S, S, 3) uint8, `probabilities` (classes,), `aggregate` (the model's:
      'transformer' or 'mean'), `temporal_layers` (layers, T) cls-to-frame weights with heads
      averaged (no layers for 'mean'), `temporal_rollout` (T,) (for 'mean': 1/T each, the
      average's weights), `spatial_rollout` (T, grid, grid).

    Raises:
      ValueError: a bad rate or video path; params holding NaN or Inf, or probabilities or
        attention that come out NaN or Inf (nothing to draw). CheckpointError: an unreadable
        checkpoint. VideoError: a video that cannot be decoded or is too short for a clip.
    """
    import jax
    import jax.numpy as jnp

    from stam_jax import checkpoints
    from stam_jax.data.video import ClipSpec, TooShortError, VideoError, load_views
    from stam_jax.variants import model_from_config

    check_frame_rate(frame_rate)
    video = check_video(video)
    stored = checkpoints.read_config(checkpoint)
    model = model_from_config(stored["model"])
    model = model.clone(spatial_attention_layers=tuple(range(model.depth)), temporal_attention=True)
    rate = _sampling(video, model.num_frames, frame_rate)  # the video checked before the read
    params = checkpoints.read_params(checkpoint, model, config=stored)
    _check_finite_params(checkpoint, params)
    params = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
    spec = ClipSpec(
        num_frames=model.num_frames,
        frame_rate=rate,
        resize=int(model.image_size / 0.875),
        crop=model.image_size,
    )
    try:
        views = load_views(video, spec)
    except TooShortError:
        raise
    except VideoError as e:
        raise VideoError(_video_error(video, e)) from None
    logits, state = jax.jit(lambda p, v: model.apply({"params": p}, v, mutable="intermediates"))(
        params, views
    )
    found = state["intermediates"]
    out: dict[str, Any] = {"frames": views[0], "aggregate": model.aggregate}
    out["probabilities"] = np.asarray(jax.nn.softmax(logits[0]))
    if model.aggregate == "transformer":
        encoder = found["aggregate"]["transformer_enc"]
        temporal = [
            np.asarray(encoder[f"layers_{i}"]["self_attn"]["attention_weights"][0][0])
            for i in range(model.temporal_depth)
        ]
        out["temporal_layers"] = np.stack([w.mean(axis=0)[0, 1:] for w in temporal])
        out["temporal_rollout"] = rollout(temporal)[0, 1:]
    else:  # frame averaging: no attention, every frame weighs 1/T
        out["temporal_layers"] = np.zeros((0, model.num_frames))
        out["temporal_rollout"] = np.full(model.num_frames, 1.0 / model.num_frames)
    spatial = [
        np.asarray(found[f"blocks_{i}"]["attn"]["attention_weights"][0]) for i in range(model.depth)
    ]
    grid = model.image_size // model.patch_size
    out["spatial_rollout"] = rollout(spatial)[:, 0, 1:].reshape(-1, grid, grid)
    shown = {
        "class probabilities": out["probabilities"],
        "temporal attention": out["temporal_layers"],
        "spatial attention": out["spatial_rollout"],
    }
    bad = [name for name, values in shown.items() if not np.isfinite(values).all()]
    if bad:
        raise ValueError(
            f"the model of {checkpoint} gave NaN or Inf {' and '.join(bad)} for {video} (its "
            "params are finite: a value overflowed float32), so nothing was drawn; explain a "
            "checkpoint whose params are of sound magnitude."
        )
    return out


def _check_finite_params(checkpoint: str | Path, params: dict[str, Any]) -> None:
    """Refuses params holding NaN or Inf: every value drawn from them would be NaN.

    Raises:
      ValueError: naming the checkpoint and the params (the first five, and how many).
    """
    from stam_jax import checkpoints

    bad = checkpoints.non_finite_params(params)
    if bad:
        raise ValueError(
            f"{checkpoints.non_finite_message(checkpoint, bad)}, so the model's probabilities "
            "and attention would be NaN and nothing was drawn; explain a checkpoint with finite "
            f"params ({checkpoints.EARLIER_STEP})."
        )


def figure(result: dict[str, Any], classes: list[str] | None = None) -> Any:
    """The matplotlib figure of `explain_video`'s result.

    A `matplotlib.figure.Figure` outside pyplot: the caller's backend is left as it was, and
    the figure is freed with its last reference (`fig.savefig(path)` writes it).

    Args:
      result: what `explain_video` returned.
      classes: the model's class names in label order (`read_class_list`), one per class;
        None: the top-5 are named by their label.

    Raises:
      ValueError: `classes` does not name one class per probability.
    """
    probs = result["probabilities"]
    if classes is not None and len(classes) != len(probs):
        raise ValueError(
            f"classes names {len(classes)} classes; the model has {len(probs)}: pass its class "
            "names in label order, or None."
        )
    from stam_jax.plot import new_figure

    frames, heat = result["frames"], result["spatial_rollout"]
    averaged = result.get("aggregate") == "mean"
    t = frames.shape[0]
    cols = min(t, 8)
    rows = -(-t // cols)
    fig = new_figure(figsize=(2.0 * cols, 2.1 * rows + 4.2), dpi=100)
    grid = fig.add_gridspec(rows + 2, cols, height_ratios=[2.1] * rows + [2.4, 1.8])
    for i in range(t):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(frames[i])
        side = frames.shape[1]
        ax.imshow(
            heat[i] / heat[i].max(),
            cmap="inferno",
            alpha=0.45,
            extent=(0, side, side, 0),
            interpolation="bilinear",
        )
        ax.set_title(f"frame {i}: {result['temporal_rollout'][i]:.2f}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[rows, :])
    x = np.arange(t)
    if averaged:
        ax.bar(x, result["temporal_rollout"], color="#999999", alpha=0.5)
        ax.set_title(
            f"frame averaging (no temporal transformer): every frame weighs 1/T = 1/{t}",
            fontsize=9,
        )
        ax.set_ylabel("weight in the average")
    else:
        ax.bar(x, result["temporal_rollout"], color="#4c72b0", alpha=0.5, label="rollout")
        for layer, weights in enumerate(result["temporal_layers"]):
            ax.plot(x, weights, marker="o", markersize=3, linewidth=1, label=f"layer {layer}")
        ax.set_ylabel("weight from the temporal cls token")
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.set_xticks(x)
    ax.set_xlabel("sampled frame")
    ax = fig.add_subplot(grid[rows + 1, :])
    top = np.argsort(-probs)[:5]
    names = [classes[c] if classes else f"class {c}" for c in top]
    ax.barh(range(len(top))[::-1], probs[top], color="#55a868")
    ax.set_yticks(
        range(len(top))[::-1], [f"{n} ({probs[c]:.1%})" for n, c in zip(names, top, strict=True)]
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (top 5)")
    fig.tight_layout()
    return fig


def draw(result: dict[str, Any], path: str | Path, classes: list[str] | None = None) -> Path:
    """Writes the picture of `explain_video`'s result to `path` (format from its suffix).

    Missing parent folders are created. A write that fails leaves no half-written file (and an
    existing `path` unchanged), and no folder made for it.

    Args:
      result: what `explain_video` returned.
      path: the picture file, ending in one of `SUFFIXES` (`output_path` makes one of any
        `--out`).
      classes: see `figure`.

    Returns:
      `path`.

    Raises:
      ValueError: a suffix not in `SUFFIXES` (none included), `classes` that do not fit, or
        a file that cannot be written; the message names it.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(
            f"cannot write {path}: pictures are written as {', '.join(SUFFIXES)}, chosen by the "
            f"file's suffix; end it with one (e.g. {path.with_name(path.name + '.png')})."
        )
    fig = figure(result, classes)
    try:
        with new_folders_removed_on_failure(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            with staged(path) as temp:
                fig.savefig(temp)
    except OSError as e:
        raise ValueError(
            f"cannot write {path} ({e.strerror or e}); choose another --out."
        ) from None
    return path


def main(argv: list[str] | None = None, *, ends_process: bool = False) -> int:
    """CLI entry point; returns the exit status.

    With `ends_process` (`python -m stam_jax.explain`), a Ctrl-C ends the process instead,
    with that status: one during XLA's compilation ends it without the interpreter's
    shutdown, which crashed under the compiling thread (`interrupts.exit_interrupted`). A
    Python caller interrupted so keeps a process with that compilation going on.
    """
    parser = ArgumentParser(
        prog="python -m stam_jax.explain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("video", help="video file")
    parser.add_argument("--checkpoint", required=True, help="stam-jax checkpoint directory")
    parser.add_argument(
        "--out",
        help="picture to write: .png, .pdf, .svg or .jpg (no suffix: .png); missing folders are "
        "created, an existing file is replaced (default: VIDEO's name + .explain.png)",
    )
    parser.add_argument("--classes", help="class names, one per line, in label order")
    parser.add_argument(
        "--frame-rate",
        type=float,
        help=f"frames per second to sample (default: T / {SECONDS:g} s)",
    )
    args = parser.parse_args(argv)
    from stam_jax.data.folder import DatasetError, read_class_list
    from stam_jax.data.video import VideoError
    from stam_jax.interrupts import exit_interrupted, interrupts_unwrapped, keep_interrupts

    keep_interrupts()
    try:
        # The flags and paths first: no jax import, no checkpoint read before they are fine.
        check_frame_rate(args.frame_rate, "--frame-rate")
        check_video(args.video)
        out = output_path(args.out, args.video)
        classes = (
            read_class_list(args.classes, f"--classes {args.classes}") if args.classes else None
        )
        if classes:
            from stam_jax import checkpoints

            expected = checkpoints.read_config(args.checkpoint)["model"]["num_classes"]
            if len(classes) != expected:
                raise DatasetError(
                    f"--classes {args.classes} names {len(classes)} classes; the model has "
                    f"{expected}: give one class name per line for each of them, in label order."
                )
        with interrupts_unwrapped():  # a Ctrl-C that C code wrapped is one all the same
            result = explain_video(args.checkpoint, args.video, args.frame_rate)
            out = draw(result, out, classes)
    except (DatasetError, VideoError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt as e:  # the picture is written whole or not at all (paths.staged)
        print("interrupted: nothing was written.", file=sys.stderr)
        if ends_process:
            exit_interrupted(e, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ends_process=True))
