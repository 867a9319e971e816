"""Run configs build the models they name, with overrides from the command line."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from stam_jax.configs import model_from_run_config
from stam_jax.variants import variant_name

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"stam_16": 16, "stam_32": 32, "stam_64": 64, "tiny": 4}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_builds_its_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = model_from_run_config(config)
    assert model.num_frames == CONFIGS[name]
    assert variant_name(model) == config.model
    # T frames at frame_rate cover the first 10 s of a video, as in the official protocol.
    if name != "tiny":
        assert config.data.frame_rate * 10 == pytest.approx(model.num_frames)


def test_overrides_reach_the_model():
    config = importlib.import_module("configs.stam_16").get_config()
    config.dtype = "bfloat16"
    config.model_overrides.num_classes = 600
    model = model_from_run_config(config)
    assert model.num_classes == 600 and model.dtype.__name__ == "bfloat16"


def test_run_train_without_data_is_refused():
    result = subprocess.run(
        [sys.executable, "run_train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/unused"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "no training data: pass --config.train.root=VIDEO_ROOT" in result.stderr
