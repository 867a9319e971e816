"""The demo's three runs (`make demo`, `python -m stam_jax.demo`), on generated videos.

    python run_train.py --config configs/demo.py:frames --config.train.root=DATA/frames/train ...
    python run_train.py --config configs/demo.py:stam --config.checkpoint=FRAMES_RUN/final ...
    python run_train.py --config configs/demo.py:mean --config.checkpoint=FRAMES_RUN/final ...

- `frames`: the frame model (STAM's ViT, one frame, mean aggregate) pre-trained to tell object
  sizes on still frames, as STAM's ViT is pre-trained on images;
- `stam`: STAM (that ViT + the temporal transformer) trained from it on approaching/receding;
- `mean`: the same ViT with frame averaging instead of the temporal transformer, trained the
  same way: the baseline.
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config

RUNS = ("frames", "stam", "mean")


def get_config(run: str = "stam") -> ml_collections.ConfigDict:
    """Returns the config of one demo run: 'frames', 'stam' or 'mean'."""
    if run not in RUNS:
        raise ValueError(f"configs/demo.py:{run}: use one of {', '.join(RUNS)}.")
    config = base_config("stam_demo")
    config.batch_size = 16
    config.data.frame_rate = 4.0
    config.data.resize = 36
    config.data.crop = 32
    config.data.train_min_area = 0.8
    config.compilation_cache_dir = ""  # demo runs compile in seconds; keep ~/.cache clean
    train = config.train
    train.steps = 300
    train.warmup_steps = 50
    train.learning_rate = 3e-4
    train.ema_decay = 0.99
    train.log_every = 10
    train.save_every = 100
    train.keep = 1
    if run == "frames":
        config.batch_size = 32
        config.model_overrides.num_frames = 1
        config.model_overrides.aggregate = "mean"
        config.model_overrides.num_classes = 4
        train.steps = 600
        train.learning_rate = 1e-3
    else:
        # New temporal position embeddings at the scale of the pre-trained frame features.
        train.temporal_pos_embed_std = 1.0
        if run == "mean":
            config.model_overrides.aggregate = "mean"
    return config
