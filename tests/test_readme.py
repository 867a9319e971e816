"""The README's Python example runs as printed, on a tiny checkpoint, and gives what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import TINY_CONFIGS, random_params

from stam_jax import checkpoints, create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The python block of the README's "Use it from Python" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in the section, found {len(blocks)}"
    return blocks[0]


def test_the_python_example_runs_as_printed(tmp_path):
    code = python_example()
    # The full-size model becomes the tiny one: only the checkpoint path and the input size
    # change, so the calls, dtypes and names are the README's own.
    tiny = TINY_CONFIGS["tiny"]
    t, s = tiny["num_frames"], tiny["image_size"]
    substitutions = {
        '"ckpt/stam_16"': repr(str(tmp_path / "ckpt")),
        "np.zeros((2, 16, 224, 224, 3), np.uint8)": f"np.zeros((2, {t}, {s}, {s}, 3), np.uint8)",
    }
    for old, new in substitutions.items():
        assert code.count(old) == 1, f"the README example no longer contains {old}"
        code = code.replace(old, new)
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
