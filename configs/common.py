"""Shared defaults for the configs in this folder: one place for every field's meaning."""

from __future__ import annotations

import os

import ml_collections


def compilation_cache_default() -> str:
    """`stam_jax/xla` in the user's cache folder: `$XDG_CACHE_HOME` where it is set to an
    absolute path (a relative one is ignored, as the XDG base directory rules ask), else
    `~/.cache`. Clusters often point XDG_CACHE_HOME at scratch space to spare a small home quota.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(base if os.path.isabs(base) else "~/.cache", "stam_jax", "xla")


def base_config(model: str) -> ml_collections.ConfigDict:
    """The fields every run has; variant files change `model` and a few sizes.

    Args:
      model: a registered variant of `stam_jax.VARIANTS` (e.g. 'stam_16').

    Returns:
      A ConfigDict; override fields on the command line (`--config.dtype=bfloat16`).
    """
    config = ml_collections.ConfigDict()
    config.model = model
    # Overrides of the variant's architecture fields; None keeps the variant's value.
    # e.g. --config.model_overrides.num_classes=600
    config.model_overrides = ml_collections.ConfigDict()
    for name, kind in [
        ("num_classes", int),
        ("num_frames", int),
        ("aggregate", str),
        ("dropout_rate", float),
        ("drop_path_rate", float),
        ("temporal_dropout_rate", float),
    ]:
        config.model_overrides[name] = ml_collections.config_dict.placeholder(kind)
    # A stam-jax checkpoint directory (python -m convert makes one). Evaluation: the params to
    # evaluate. Training: the initialisation; it may differ from the model in frame count, image
    # size, class count or aggregate (position embeddings resampled, head re-initialised,
    # everything reported by name in WORKDIR/init_report.txt).
    config.checkpoint = ""
    config.dtype = "float32"  # compute dtype: float32, bfloat16 or float16
    config.param_dtype = "float32"
    # auto (cuDNN for half precision on GPU, else heads_first), xla, cudnn (GPU only), heads_first
    config.attention_impl = "auto"
    config.remat = False  # activation checkpointing of the ViT blocks (training memory)
    # XLA's Triton GEMM fusions on GPU (no effect elsewhere). False: every matmul through cuBLAS,
    # its bias add fused in (STAM-16 bf16 forward 1.15x and a 2.8x faster compile on an H200,
    # BENCHMARKS.md); True: XLA's default.
    config.triton_gemm = False
    # Frames per step of the spatial ViT (must divide batch x T); None: automatic (all at once,
    # but ~4 ViT-B frames per device on CPU, which runs faster); 0: all frames at once.
    config.frame_chunk = ml_collections.config_dict.placeholder(int)
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
    config.data.train_flip = True  # random horizontal flips of training clips
    config.data.train_min_area = 0.25  # random resized crops keep 25-100% of the frame

    config.eval = ml_collections.ConfigDict()
    config.eval.average = "logits"  # multi-view: average 'logits' or 'softmax' per video
    # WORKDIR/features.npz beside the predictions: 'video' (the head's input, views averaged),
    # 'frames' (that and each view's per-frame ViT features), or '' (none).
    config.eval.features = ""
    # False: the root's classes need not be the model's (another dataset's folder, or one folder
    # of unlabelled videos, for features or predictions): no accuracy is computed, and the
    # labels in predictions.jsonl and features.npz are the root's classes.
    config.eval.accuracy = True

    # Multi-host: every process runs the same command with its own process_id.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator = ""  # 'host:port' of process 0
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    # Seconds the processes are given to join; one still waiting then ends saying what to check.
    config.distributed.join_timeout = 300

    # Training (run_train.py).
    config.train = ml_collections.ConfigDict()
    config.train.root = ""  # training videos, root/<class>/<video>
    # Batches in the whole run (loop steps, as checkpoints count them); warm-up and cosine
    # decay span them. With accumulate=k the optimizer updates every k batches.
    config.train.steps = 1000
    config.train.optimizer = "adamw"  # adamw or sgd (with momentum)
    config.train.learning_rate = 1e-4  # peak, after linear warm-up; cosine decay to the end
    config.train.warmup_steps = 100  # linear from 0; 0: none (the full rate at step 1)
    config.train.weight_decay = 0.05  # not on biases, norms, position embeddings, cls tokens
    config.train.momentum = 0.9  # sgd only
    config.train.grad_clip = 1.0  # global-norm clipping (0: off)
    config.train.accumulate = 1  # batches per optimizer update (must divide train.steps)
    config.train.label_smoothing = 0.1
    # Mixup / CutMix (0: off): one draw per batch, the same CutMix box in every frame.
    config.train.mixup_alpha = 0.0
    config.train.cutmix_alpha = 0.0
    config.train.mix_switch_prob = 0.5  # with both on: probability of CutMix
    # Knowledge distillation: a stam-jax checkpoint (same frames, size, classes) run in the same
    # jitted step; loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher_T || student_T).
    config.train.teacher = ""
    config.train.distill_weight = 0.5
    config.train.distill_temperature = 1.0
    # float16 only: dynamic loss scaling (a step with non-finite gradients is skipped, the scale
    # halved; doubled after this many good steps).
    config.train.loss_scale_initial = 2.0**15
    config.train.loss_scale_period = 2000
    # EMA of the params: WORKDIR/final_ema, the EMA set of the periodic evaluation, export --ema.
    # 0: none of these (the train state then carries a copy of the params in its place).
    config.train.ema_decay = 0.999
    # Params held fixed: comma-separated 'vit' (the spatial ViT), 'temporal' (the temporal
    # transformer), or patterns over param paths ('blocks_[0-5]', 'blocks_*/attn'); '': none.
    # Frozen params get no gradient, update, weight decay or optimizer state.
    config.train.freeze = ""
    # Layer-wise learning-rate decay of the ViT (1: off): block i learns at
    # layer_decay^(depth - i) of the rate, the patch embedding at layer_decay^(depth + 1).
    config.train.layer_decay = 1.0
    config.train.log_every = 10
    # Periodic evaluation (0: off) of the params and their EMA on eval_root through run_eval's
    # code; the best by top-1 is kept in WORKDIR/best (WORKDIR/best.json says which).
    config.train.eval_every = 0
    config.train.eval_root = ""
    config.train.save_every = 100  # checkpoint interval in steps (async, atomic)
    config.train.keep = 3  # checkpoints kept
    # Std of a temporal position embedding that training creates (not read from
    # config.checkpoint); 0 keeps the official 0.02 init. Pre-trained frame features have unit
    # scale, next to which 0.02 makes frame order slow to learn: the demo uses 1.0.
    config.train.temporal_pos_embed_std = 0.0

    config.progress = True  # progress bar with ETA on stderr (process 0)
    # JAX's persistent compilation cache: a second start skips XLA compilation ('' disables).
    config.compilation_cache_dir = compilation_cache_default()
    return config
