"""What STAM looks at in one video: temporal and spatial attention, as one PNG.

    python -m stam_jax.explain --checkpoint CKPT_DIR VIDEO [--out FILE.png] [--classes FILE]

The video is sampled and transformed exactly as the evaluation does. The picture shows the
sampled frames as a strip with the spatial attention rollout of each frame's ViT overlaid, the
weight each frame gets from the temporal cls token (per layer, heads averaged, and rolled out
across layers), and the top-5 classes with their probabilities.

Attention rollout (Abnar & Zuidema, 2020): per layer, the heads' mean attention plus the identity
(the residual path), rows renormalised; the product over layers; the cls token's row of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Frame rate per clip length of the released models: T frames over the first 10 s.
SECONDS = 10.0


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


def explain_video(checkpoint: str | Path, video: str | Path, frame_rate: float | None = None):
    """Runs the model on one video and returns everything the picture shows.

    Args:
      checkpoint: a stam-jax checkpoint directory.
      video: a video file.
      frame_rate: sampling rate; default T / 10 s (the released models' protocol).

    Returns:
      A dict: `frames` (T, S, S, 3) uint8, `probabilities` (classes,), `temporal_layers`
      (layers, T) cls-to-frame weights with heads averaged, `temporal_rollout` (T,),
      `spatial_rollout` (T, grid, grid).
    """
    import jax

    from stam_jax import checkpoints
    from stam_jax.data.video import ClipSpec, load_views

    model, params = checkpoints.load(checkpoint)
    model = model.clone(spatial_attention_layers=tuple(range(model.depth)), temporal_attention=True)
    spec = ClipSpec(
        num_frames=model.num_frames,
        frame_rate=frame_rate or model.num_frames / SECONDS,
        resize=int(model.image_size / 0.875),
        crop=model.image_size,
    )
    views = load_views(video, spec)
    logits, state = jax.jit(lambda p, v: model.apply({"params": p}, v, mutable="intermediates"))(
        params, views
    )
    found = state["intermediates"]
    out: dict[str, Any] = {"frames": views[0]}
    out["probabilities"] = np.asarray(jax.nn.softmax(logits[0]))
    if model.aggregate == "transformer":
        encoder = found["aggregate"]["transformer_enc"]
        temporal = [
            np.asarray(encoder[f"layers_{i}"]["self_attn"]["attention_weights"][0][0])
            for i in range(model.temporal_depth)
        ]
        out["temporal_layers"] = np.stack([w.mean(axis=0)[0, 1:] for w in temporal])
        out["temporal_rollout"] = rollout(temporal)[0, 1:]
    else:  # frame averaging: every frame weighs the same
        uniform = np.full(model.num_frames, 1.0 / model.num_frames)
        out["temporal_layers"], out["temporal_rollout"] = uniform[None], uniform
    spatial = [
        np.asarray(found[f"blocks_{i}"]["attn"]["attention_weights"][0]) for i in range(model.depth)
    ]
    grid = model.image_size // model.patch_size
    out["spatial_rollout"] = rollout(spatial)[:, 0, 1:].reshape(-1, grid, grid)
    return out


def draw(result: dict[str, Any], path: str | Path, classes: list[str] | None = None) -> Path:
    """Writes the picture of `explain_video`'s result as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, heat = result["frames"], result["spatial_rollout"]
    t = frames.shape[0]
    cols = min(t, 8)
    rows = -(-t // cols)
    fig = plt.figure(figsize=(2.0 * cols, 2.1 * rows + 4.2), dpi=100)
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
    ax.bar(x, result["temporal_rollout"], color="#4c72b0", alpha=0.5, label="rollout over layers")
    for layer, weights in enumerate(result["temporal_layers"]):
        ax.plot(x, weights, marker="o", markersize=3, linewidth=1, label=f"layer {layer}")
    ax.set_xticks(x)
    ax.set_xlabel("sampled frame")
    ax.set_ylabel("weight from the temporal cls token")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax = fig.add_subplot(grid[rows + 1, :])
    probs = result["probabilities"]
    top = np.argsort(-probs)[:5]
    names = [classes[c] if classes else f"class {c}" for c in top]
    ax.barh(range(len(top))[::-1], probs[top], color="#55a868")
    ax.set_yticks(
        range(len(top))[::-1], [f"{n} ({probs[c]:.1%})" for n, c in zip(names, top, strict=True)]
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (top 5)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m stam_jax.explain", description=__doc__)
    parser.add_argument("video", help="video file")
    parser.add_argument("--checkpoint", required=True, help="stam-jax checkpoint directory")
    parser.add_argument("--out", help="PNG to write (default: VIDEO's name + .explain.png)")
    parser.add_argument("--classes", help="class names, one per line, in label order")
    parser.add_argument("--frame-rate", type=float, help="default: T / 10 s")
    args = parser.parse_args(argv)
    from stam_jax.checkpoints import CheckpointError
    from stam_jax.data.folder import DatasetError, read_class_list
    from stam_jax.data.video import VideoError

    try:
        classes = read_class_list(args.classes) if args.classes else None
        result = explain_video(args.checkpoint, args.video, args.frame_rate)
        if classes and len(classes) != result["probabilities"].size:
            raise DatasetError(
                f"{args.classes} names {len(classes)} classes; the model has "
                f"{result['probabilities'].size}."
            )
    except (CheckpointError, DatasetError, VideoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = draw(result, args.out or f"{Path(args.video).name}.explain.png", classes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
