"""Numerical parity of converted checkpoints with the PyTorch reference of the official model."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY_CONFIGS,
    USER_XLA_FLAGS,
    cli_args,
    convert_kwargs,
    random_videos,
    torch_logits,
)

from convert import convert_checkpoint
from convert.__main__ import main as convert_main
from convert.torch_reference import reference_from_config
from stam_jax import checkpoints, create_model, model_config

TOLERANCE = 1e-4  # float32: max |jax - torch| relative to the logits' scale


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_parity_through_cli(name, official_pth, tmp_path):
    config = TINY_CONFIGS[name]
    pth, reference = official_pth(config, seed=1)
    assert convert_main([str(pth), str(tmp_path / "ckpt"), *cli_args(config)]) == 0

    model, params = checkpoints.load(tmp_path / "ckpt")
    assert model_config(model) == config
    videos = random_videos(config, batch=3)
    want = torch_logits(reference, videos)
    got = jax.jit(model.apply)({"params": params}, videos)
    assert got.shape == (3, config["num_classes"])
    assert relative_error(got, want) <= TOLERANCE
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


def test_float_input_in_unit_range_matches_uint8(official_pth, tmp_path):
    config = TINY_CONFIGS["tiny"]
    pth, reference = official_pth(config)
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(config))
    model, params = checkpoints.load(tmp_path / "ckpt")
    videos = random_videos(config, batch=2)
    as_float = videos.astype(np.float32) / 255.0
    np.testing.assert_array_equal(
        model.apply({"params": params}, videos), model.apply({"params": params}, as_float)
    )
    assert (
        relative_error(model.apply({"params": params}, as_float), torch_logits(reference, videos))
        <= TOLERANCE
    )


def test_reference_follows_a_models_layer_norm_eps():
    """A model trained with another eps gets a reference with that eps, not the official 1e-5
    (`test_model.py` checks the models' norms against the reference's, one by one)."""
    import torch

    for aggregate in ("transformer", "mean"):
        config = {**TINY_CONFIGS["tiny"], "layer_norm_eps": 0.5, "aggregate": aggregate}
        norms = [
            m for m in reference_from_config(config).modules() if isinstance(m, torch.nn.LayerNorm)
        ]
        assert len(norms) == (10 if aggregate == "transformer" else 5)
        assert {m.eps for m in norms} == {0.5}


LOGITS = """
import sys
import jax
import numpy as np
from stam_jax import checkpoints
model, params = checkpoints.load(sys.argv[1])
videos = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(jax.jit(model.apply)({"params": params}, videos)))
"""


def logits_as_users_compile(checkpoint, videos: np.ndarray, tmp_path) -> np.ndarray:
    """A checkpoint's logits from a process with the user's XLA flags (the default optimisation
    level), not this session's (conftest.py compiles at level 0 to save time)."""
    np.save(tmp_path / "videos.npy", videos)
    env = {**os.environ, "XLA_FLAGS": USER_XLA_FLAGS, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", LOGITS, str(checkpoint), str(tmp_path / "videos.npy")]
    result = subprocess.run(
        [*command, str(tmp_path / "logits.npy")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "logits.npy")


@pytest.mark.slow
def test_full_size_stam_16_parity(official_pth, tmp_path):
    """The one full-size test: official stam_16 shapes, default head counts, 119M params."""
    config = model_config(create_model("stam_16"))
    pth, reference = official_pth(config, seed=3)
    path, inferred, report = convert_checkpoint(pth, tmp_path / "ckpt")  # heads from defaults
    assert inferred == {k: config[k] for k in inferred}
    assert report.warnings() == []

    model, params = checkpoints.load(path)
    assert model_config(model) == config
    assert sum(x.size for x in jax.tree.leaves(params)) == 119_205_520
    videos = random_videos(config, batch=2, seed=5)
    want = torch_logits(reference, videos)
    got = logits_as_users_compile(path, videos, tmp_path)
    assert got.shape == (2, 400)
    assert relative_error(got, want) <= TOLERANCE
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
