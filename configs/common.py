"""Shared defaults for the configs in this folder: one place for every field's meaning."""

from __future__ import annotations

import ml_collections


def base_config(model: str) -> ml_collections.ConfigDict:
    """The fields every run has; variant files change `model` and a few sizes.

    Args:
      model: a registered variant of `stam_jax.VARIANTS` (e.g. 'stam_16').

    Returns:
      A ConfigDict; override fields on the command line (`--config.dtype=bfloat16`).
    """
    config = ml_collections.ConfigDict()
    config.model = model
    # Overrides of the variant's architecture fields (e.g. num_classes, drop_path_rate).
    config.model_overrides = ml_collections.ConfigDict()
    config.checkpoint = ""  # a stam-jax checkpoint directory (python -m convert makes one)
    config.dtype = "float32"  # compute dtype: float32, bfloat16 or float16
    config.param_dtype = "float32"
    config.attention_impl = "auto"  # auto (cuDNN for half precision on GPU), xla, cudnn
    config.batch_size = 6  # videos per global batch; the official evaluation uses 6
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.root = ""  # root/<class name>/<video>
    config.data.frame_rate = 1.6  # sampled frames per second (T / 10 s)
    config.data.resize = 256
    config.data.crop = 224
    config.data.class_list = ""  # optional file: class names in label order, one per line
    config.data.num_clips = 1  # temporal clips per video (1: the official first clip)
    config.data.num_crops = 1  # spatial crops per clip: 1 (centre, official) or 3
    config.data.short_videos = "official"  # 'official': drop videos shorter than T; 'pad'
    config.data.workers = -1  # decoding processes; -1: one per CPU core, 0: in-process
    config.data.prefetch = 0  # videos decoded ahead; 0: twice the per-process batch

    config.eval = ml_collections.ConfigDict()
    config.eval.average = "logits"  # multi-view: average 'logits' or 'softmax' per video

    # Multi-host: every process runs the same command with its own process_id.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator = ""  # 'host:port' of process 0
    config.distributed.num_processes = 1
    config.distributed.process_id = 0

    config.progress = True  # progress bar with ETA on stderr (process 0)
    # JAX's persistent compilation cache: a second start skips XLA compilation ('' disables).
    config.compilation_cache_dir = "~/.cache/stam_jax/xla"
    return config
