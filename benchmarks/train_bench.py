"""Training-step throughput and peak memory, without the input pipeline.

    python benchmarks/train_bench.py --model stam_tiny --batch 8 --steps 20
    python benchmarks/train_bench.py --model stam_16 --batch 1 --steps 3 [--last-block all]
    python benchmarks/train_bench.py --model stam_16 --batch 1 --steps 3 --freeze vit
    python benchmarks/train_bench.py --model stam_16 --batch 16 --dtype bfloat16 --remat   # GPU

Times the jitted train step of `run_train.py` (`stam_jax.train`: forward and backward with dropout
and stochastic depth as configured, AdamW with the decay mask, global-norm clipping, EMA; float32
master params, `--dtype` compute; `--freeze` as `train.freeze`) on random uint8 videos already on
the device, so the figure is the model and optimizer alone. Reports compile time, steps/s and
videos/s (median over `--steps` timed steps after one warm-up step), XLA's FLOP count of a step
(counted with all frames in one step of the spatial ViT) and the achieved TFLOP/s, and the process's
peak memory (RSS on CPU; device peak on GPU). The FLOPs are model FLOPs (remat's recompute not
counted), from the step lowered for the CPU (see `step_flops`); where no backend gives a count,
three times the forward's matmul FLOPs (`STAM.macs_per_video`) stand in ('flop_source').
Needs jax, flax, optax, numpy and ml_collections (plus this repository). Run one configuration
per process so that the peak memory is that configuration's.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import jax
import numpy as np
from _args import MODEL_DTYPES, add_triton_gemm, number, one_of, variant, whole
from flop_count import xla_flops

from configs.common import base_config
from stam_jax import sharding
from stam_jax.cli import ArgumentParser
from stam_jax.configs import model_from_run_config
from stam_jax.model import ATTENTION_IMPLS
from stam_jax.train_step import frozen_paths, initial_state, make_optimizer, make_train_step


def step_flops(model, tx, schedule, train_config, *step_args) -> tuple[float, str]:
    """The model FLOPs of one train step and where the count came from.

    XLA's count ('xla') of the step's HLO before optimisation, which is the same for every
    backend: lowered for the CPU, which gives a count where jax 0.11's GPU backend gives none
    (else for the default device). It is counted on a clone of the model that computes the
    same: all frames in one ViT step (XLA counts a loop's body once), the all-XLA attention (a
    cuDNN call's FLOPs are not counted) and no remat (its recompute is not model work). Where
    no backend gives a count: three times the forward's matmuls ('3x_forward_matmuls').
    """
    counting = model.clone(frame_chunk=0, attention_impl="heads_first", remat=False)
    step = make_train_step(counting, tx, schedule, train_config, 0, model.num_classes)
    flops = xla_flops(step, *step_args)  # see flop_count
    if flops:
        return flops, "xla"
    batch = step_args[1].shape[0]
    return 3 * 2.0 * model.macs_per_video() * batch, "3x_forward_matmuls"


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object with the measurement."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_tiny", action=variant())
    parser.add_argument("--batch", default=8, action=whole(1))
    parser.add_argument("--steps", default=10, action=whole(1), help="timed steps")
    parser.add_argument("--dtype", default="float32", action=one_of(MODEL_DTYPES))
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", default="auto", action=one_of(ATTENTION_IMPLS))
    parser.add_argument(
        "--drop-path",
        default=0.1,
        action=number(0, inclusive=True, below=1, what="a probability; 0: off"),
        help="stochastic depth rate",
    )
    parser.add_argument(
        "--frame-chunk",
        default=None,
        action=whole(0),
        help="frames per ViT step, 0: all at once; default: automatic",
    )
    parser.add_argument(
        "--last-block",
        choices=("cls", "all"),
        default="cls",
        help="the last ViT block on the cls token only (default) or on every token (official)",
    )
    parser.add_argument(
        "--freeze",
        default="",
        help="params held fixed (run_train.py's --config.train.freeze: 'vit', 'temporal', "
        "patterns over param paths)",
    )
    add_triton_gemm(parser)
    parser.add_argument(
        "--no-donate",
        action="store_true",
        help="keep the input train state alive during the step (run_train.py donates it)",
    )
    args = parser.parse_args(argv)
    sharding.enable_compilation_cache("")  # compile_s is a cold compile's, whatever the env says
    config = base_config(args.model)
    config.dtype, config.remat, config.batch_size = args.dtype, args.remat, args.batch
    config.attention_impl, config.frame_chunk = args.attention, args.frame_chunk
    config.triton_gemm = args.triton_gemm
    config.model_overrides.drop_path_rate = args.drop_path
    config.train.steps, config.train.freeze = 1000, args.freeze
    model = model_from_run_config(config).clone(last_block_cls_only=args.last_block == "cls")
    t, s = model.num_frames, model.image_size
    try:
        model.frames_per_step(args.batch * t)
    except ValueError as e:
        parser.error(f"--frame-chunk={args.frame_chunk}: {e}")
    if args.freeze:  # checked on the params' shapes, before anything is compiled
        video = jax.ShapeDtypeStruct((1, t, s, s, 3), np.uint8)
        shapes = jax.eval_shape(model.init, jax.random.key(0), video)["params"]
        try:
            frozen_paths(config.train, shapes)
        except ValueError as e:
            text = str(e).replace("train.freeze=", "--freeze=", 1)
            parser.error(text.replace("fix --config.train.freeze.", "fix --freeze."))
    rng = np.random.default_rng(0)
    mesh = sharding.data_mesh()
    batch_sharding = sharding.batch_sharded(mesh)
    videos = jax.device_put(
        rng.integers(0, 256, (args.batch, t, s, s, 3), dtype=np.uint8), batch_sharding
    )
    labels = jax.device_put(
        rng.integers(0, model.num_classes, args.batch).astype(np.int32), batch_sharding
    )
    weights = jax.device_put(np.ones(args.batch, np.float32), batch_sharding)
    params = jax.jit(model.init)(jax.random.key(0), videos[:1])["params"]
    tx, schedule = make_optimizer(config.train, params)
    replicated = sharding.replicated(mesh)
    state = jax.jit(lambda p: initial_state(model, tx, config.train, p), out_shardings=replicated)(
        params
    )
    del params

    def jit_step(model):
        return jax.jit(
            make_train_step(model, tx, schedule, config.train, 0, model.num_classes),
            in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=() if args.no_donate else 0,
            compiler_options=sharding.compiler_options(config.triton_gemm),
        )

    lowered = jit_step(model).lower(state, videos, labels, weights)
    flops, flop_source = step_flops(
        model, tx, schedule, config.train, state, videos, labels, weights
    )
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, videos, labels, weights)  # warm-up
    jax.block_until_ready(metrics)
    samples = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, videos, labels, weights)
        jax.block_until_ready(metrics)
        samples.append(time.perf_counter() - start)
    per_step = statistics.median(samples)
    result = {
        "device": str(jax.devices()[0]),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "remat": args.remat,
        "donate": not args.no_donate,
        "triton_gemm": args.triton_gemm,
        "last_block": args.last_block,
        "freeze": args.freeze,
        "attention": args.attention,
        "frames_per_step": model.frames_per_step(args.batch * t),
        "compile_s": round(compile_s, 2),
        "steps_per_s": round(1 / per_step, 4),
        "videos_per_s": round(args.batch / per_step, 3),
        "tflop_per_step": round(flops / 1e12, 4),
        "gflop_per_step": round(flops / 1e9, 4),
        "tflops": round(flops / per_step / 1e12, 3),
        "flop_source": flop_source,
        "loss": float(metrics["loss"]),
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        result["device_peak_MiB"] = round(stats.get("peak_bytes_in_use", 0) / 2**20)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
