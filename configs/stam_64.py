r"""STAM-64 on Kinetics-400: 64 frames sampled at 6.4 fps (the first 10 s of each video).

    python run_eval.py --config configs/stam_64.py --config.checkpoint=CKPT_DIR \
        --config.data.root=VAL_DIR --config.dtype=bfloat16 --workdir OUT_DIR
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the stam_64 config."""
    config = base_config("stam_64")
    config.data.frame_rate = 6.4
    return config
