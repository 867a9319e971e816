r"""A tiny STAM (4 frames of 32x32, 10 classes) for tests and CPU experiments.

    python run_eval.py --config configs/tiny.py --config.checkpoint=CKPT_DIR \
        --config.data.root=VAL_DIR --workdir OUT_DIR
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the stam_tiny config."""
    config = base_config("stam_tiny")
    config.batch_size = 8
    config.data.frame_rate = 4.0
    config.data.resize = 36
    config.data.crop = 32
    return config
