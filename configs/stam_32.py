r"""STAM-32 on Kinetics-400: 32 frames sampled at 3.2 fps (the first 10 s of each video).

    python run_eval.py --config configs/stam_32.py --config.checkpoint=CKPT_DIR \
        --config.data.root=VAL_DIR --config.dtype=bfloat16 --workdir OUT_DIR
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the stam_32 config."""
    config = base_config("stam_32")
    config.data.frame_rate = 3.2
    return config
