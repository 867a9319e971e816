"""The README's Python example runs as printed, on a tiny checkpoint, and gives what it says."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from conftest import TINY_CONFIGS, random_params
from test_eval import make_folder

from stam_jax import checkpoints, create_model
from stam_jax.init import init_from_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(heading: str) -> str:
    """The one python block of the README section under `heading` (to the next heading)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    blocks: list[list[str]] = []
    fence = None  # the open code block's language
    for line in lines[start:]:
        if line.startswith("```"):
            fence = None if fence is not None else line[3:]
            if fence == "python":
                blocks.append([])
        elif fence == "python":
            blocks[-1].append(line)
        elif fence is None and line.startswith("#"):
            break  # the next heading (a "#" inside a code block is a comment)
    assert len(blocks) == 1, f"expected one python block under {heading}, found {len(blocks)}"
    return "\n".join(blocks[0]) + "\n"


def substitute(code: str, substitutions: dict[str, str]) -> str:
    """`code` with each key replaced by its value; each key must occur exactly once."""
    for old, new in substitutions.items():
        assert code.count(old) == 1, f"the README example no longer contains {old}"
        code = code.replace(old, new)
    return code


def test_the_python_example_runs_as_printed(tmp_path):
    code = python_example("## Use it from Python")
    # The full-size model becomes the tiny one: only the checkpoint path and the input size
    # change, so the calls, dtypes and names are the README's own.
    tiny = TINY_CONFIGS["tiny"]
    t, s = tiny["num_frames"], tiny["image_size"]
    code = substitute(
        code,
        {
            '"ckpt/stam_16"': repr(str(tmp_path / "ckpt")),
            "(2, 16, 224, 224, 3)": f"(2, {t}, {s}, {s}, 3)",
        },
    )
    params = random_params(tiny)
    checkpoints.save(tmp_path / "ckpt", create_model("stam_tiny"), params)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)

    # "(2, 400) float32" for the full-size model, bfloat16 compute: logits come back float32.
    logits, frames = scope["logits"], scope["frames"]
    assert logits.shape == (2, tiny["num_classes"]) and logits.dtype == np.float32
    # "Per-frame features (B, T, 768)": the ViT's width for each frame.
    assert frames.shape == (2, t, tiny["hidden_size"])
    # The example's bfloat16 logits are the float32 model's to bfloat16 precision (measured:
    # 0.8% of the largest logit; another model would be off by about the logits themselves).
    model, params32 = checkpoints.load(tmp_path / "ckpt")
    exact = np.asarray(model.apply({"params": params32}, np.zeros((2, t, s, s, 3), np.uint8)))
    np.testing.assert_allclose(np.asarray(logits), exact, rtol=0, atol=0.02 * np.abs(exact).max())


def test_the_training_loop_example_trains(tmp_path):
    code = python_example("### Your own training loop")
    # A tiny T=4 checkpoint stands for stam_16 (resampled to 8 frames all the same), 10 real
    # videos for Kinetics, 3 steps for 1000.
    ckpt = tmp_path / "ckpt"
    checkpoints.save(ckpt, create_model("stam_tiny"), random_params(TINY_CONFIGS["tiny"]))
    root = make_folder(tmp_path / "videos", per_class=1)
    code = substitute(
        code,
        {
            'create_model("stam_16", num_frames=8': 'create_model("stam_tiny", num_frames=8',
            '"ckpt/stam_16"': repr(str(ckpt)),
            "steps = 1000": "steps = 3",
            '"/data/kinetics400/train"': repr(str(root)),
        },
    )
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)

    assert scope["report"][1] == (
        "aggregate/pos_embed: resampled 4 frames -> 8 frames (cls row kept, frame rows "
        "linearly along time)"
    )
    assert np.isfinite(float(scope["loss"])) and scope["videos"].shape == (8, 8, 32, 32, 3)
    # Three AdamW updates were applied: every tensor moved away from its initial value.
    model, fresh = scope["model"], scope["fresh"]
    start, _ = init_from_checkpoint(model, fresh, ckpt)
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start, scope["params"]
    )
    assert all(jax.tree.leaves(moved)), moved
    assert int(scope["opt_state"][2].count) == 3  # the schedule's step count
