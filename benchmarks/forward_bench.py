"""Model forward throughput: stam-jax against the PyTorch reference, side by side in one run.

    python benchmarks/forward_bench.py --models stam_16,stam_64 --batches 1,2 --repeats 3
    python benchmarks/forward_bench.py --smoke          # tiny sizes, seconds (CI)

Needs only jax, flax, numpy and torch (plus this repository), so it runs on a lent GPU machine
too. For each model and batch size it times the jit-compiled stam-jax forward and the PyTorch
reference (`convert/torch_reference.py`, eager, and `torch.compile` with `--torch-compile`),
alternating them `--repeats` times so drift hits both, and reports the median videos/s of each
and their ratio. It also reports XLA's FLOP count per video, a dense matmul rate measured in the
same run with the same library, the model FLOP utilisation against it, jit compile time, and the
process's peak memory (RSS on CPU, device peak on GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.torch_reference import reference_from_config
from stam_jax import create_model, model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_rate(dtype: str, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted n x n x n matmul in `dtype` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_model(name: str, batch: int, dtype: str, repeats: int, torch_compile: bool) -> dict:
    """One model at one batch size: both frameworks, alternating."""
    model = create_model(name, dtype=dtype)
    t, s = model.num_frames, model.image_size
    videos = np.random.default_rng(0).integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), videos[:1])["params"]
    forward = jax.jit(model.apply)
    start = time.perf_counter()
    compiled = forward.lower({"params": params}, videos).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_video = float(cost.get("flops", 0.0)) / batch
    device_videos = jax.device_put(videos)

    def run_jax():
        compiled({"params": params}, device_videos).block_until_ready()

    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu else "cpu"
    reference = reference_from_config(model_config(model)).eval().to(device)
    frames = torch.from_numpy(videos).to(device).reshape(-1, s, s, 3).permute(0, 3, 1, 2)
    frames = frames.float().div(255)
    autocast = dtype != "float32"

    def torch_runner(module):
        def run():
            with torch.inference_mode(), torch.autocast(device, DTYPES[dtype], enabled=autocast):
                module(frames)
            if on_gpu:
                torch.cuda.synchronize()

        return run

    runners = {"jax": run_jax, "torch_eager": torch_runner(reference)}
    if torch_compile:
        runners["torch_compile"] = torch_runner(torch.compile(reference))
    for run in runners.values():
        run()  # warm-up (and torch.compile's compilation)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    result = {"model": name, "batch": batch, "dtype": dtype, "compile_s": round(compile_s, 2)}
    for key, samples in times.items():
        result[f"{key}_videos_per_s"] = round(batch / statistics.median(samples), 4)
    for key in runners:
        if key != "jax":
            ratio = result["jax_videos_per_s"] / result[f"{key}_videos_per_s"]
            result[f"jax_over_{key}"] = round(ratio, 3)
    result["gflop_per_video"] = round(flops_per_video / 1e9, 1)
    result["jax_tflops"] = round(flops_per_video * result["jax_videos_per_s"] / 1e12, 4)
    return result


def main() -> None:
    """Prints one JSON object per measurement, then a summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="stam_16")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batches, args.repeats, args.matmul_size = "stam_tiny", "2", 1, 256
    rate = matmul_rate(args.dtype, args.matmul_size)
    print(json.dumps({"device": str(jax.devices()[0]), "matmul_tflops": round(rate / 1e12, 4)}))
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            result = bench_model(name, batch, args.dtype, args.repeats, args.torch_compile)
            result["mfu_vs_matmul"] = round(result["jax_tflops"] * 1e12 / rate, 3)
            print(json.dumps(result))
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", 0) / 2**20
        print(json.dumps({"device_peak_MiB": round(peak)}))
    print(
        json.dumps(
            {"peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        )
    )


if __name__ == "__main__":
    main()
