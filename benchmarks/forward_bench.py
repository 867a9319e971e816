r"""Model forward throughput: stam-jax against the PyTorch reference, side by side in one run.

    python benchmarks/forward_bench.py --models stam_16,stam_64 --batches 1,2 --repeats 3
    python benchmarks/forward_bench.py --dtype bfloat16 --batches 8,32 --attention auto,xla \
        --torch-sdpa --torch-compile                      # a GPU
    python benchmarks/forward_bench.py --batches 1,2 --last-block cls,all --no-torch
    python benchmarks/forward_bench.py --smoke          # tiny sizes, seconds (CI)

`--smoke` adds PyTorch's SDPA and sets what the command line leaves unset to tiny sizes (the
tiny model, batch 2, one repeat, a 256 matmul, more stam-jax paths); options given explicitly
win over it.

Needs only jax, flax, numpy and torch (plus this repository), so it runs on a lent GPU machine too.
For each model and batch size it times the jit-compiled stam-jax forward (one runner per
`--attention` path, each also with XLA's Triton GEMMs where `--triton-gemm off,on` asks; 'off',
cuBLAS for every matmul, is how run_eval.py compiles on GPU) and the PyTorch reference
(`convert/torch_reference.py`: eager with the official explicit attention, optionally with PyTorch's
fused `scaled_dot_product_attention`, and `torch.compile`), under autocast for half precision,
alternating all runners `--repeats` times so drift hits each, and reports the median videos/s of
each and the ratios to stam-jax's first path. FLOPs per video are what stam-jax runs (its last ViT
block computes the cls token only: 525.8 GFLOP per STAM-16 video, where the official computation of
every token takes 564.9), from XLA's cost analysis of the all-XLA ('heads_first') forward with all
frames in one step (the analysis counts a loop's body once), so that a fused cuDNN kernel, which the
analysis cannot see into, does not shrink the count; it is lowered for the CPU (the count is of the
HLO before optimisation, and jax 0.11's GPU backend gives none), and only where no backend gives
one, `STAM.macs_per_video` stands in (matmuls only, 0.3% under XLA; 'flop_source'). The matmul rate
is an n x n x n product on random data in the same dtype, jax's and torch's, timed in the same
alternation as the models; model FLOP utilisation is achieved FLOP/s over the faster of the two.
Also: jit compile time and the process's peak memory (RSS on CPU, device peak on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _args import (
    cache_folder,
    checked,
    default_help,
    fill_unset,
    one_of,
    one_of_list,
    variants,
    whole,
    whole_list,
)
from flop_count import xla_flops

from convert.torch_reference import Attention, reference_from_config
from stam_jax import create_model, model_config, sharding
from stam_jax.cli import ArgumentParser
from stam_jax.model import ATTENTION_IMPLS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_runners(dtype: str, n: int, with_torch: bool) -> tuple[dict, float]:
    """n x n x n matmul runners on random `dtype` data (jax's; torch's too) and one call's FLOPs.

    They are timed in the same alternation as the models, so the rate sees the same drift.
    """
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys)
    f = jax.jit(lambda x, y: x @ y)
    on_gpu = jax.default_backend() == "gpu"
    inner = max(1, int(2e13 // (2 * n**3))) if on_gpu else 1  # ~20 TFLOP per call on a GPU

    def run_jax():
        for _ in range(inner):
            out = f(a, b)
        out.block_until_ready()

    runners = {"matmul_jax": run_jax}
    if with_torch:
        device = "cuda" if on_gpu else "cpu"
        ta, tb = (
            torch.from_numpy(np.array(x, np.float32)).to(device, DTYPES[dtype]) for x in (a, b)
        )

        def run_torch():
            for _ in range(inner):
                torch.matmul(ta, tb)
            if on_gpu:
                torch.cuda.synchronize()

        runners["matmul_torch"] = run_torch
    return runners, 2.0 * n**3 * inner


def torch_reference(model, videos: np.ndarray, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The PyTorch reference of `model` on `device`, and `videos` as its `(B*T, 3, H, W)` float
    frames in [0, 1]."""
    s = model.image_size
    reference = reference_from_config(model_config(model)).eval().to(device)
    frames = torch.from_numpy(videos).to(device).reshape(-1, s, s, 3).permute(0, 3, 1, 2)
    return reference, frames.float().div(255)


def torch_forward(module, frames: torch.Tensor, dtype: str, sdpa: bool) -> Callable[[], None]:
    """One forward of the reference `module` (inference mode, autocast for half precision, the
    official attention or PyTorch's fused SDPA), waited for on a GPU."""
    device = frames.device.type

    def run() -> None:
        Attention.use_sdpa = sdpa
        with (
            torch.inference_mode(),
            torch.autocast(device, DTYPES[dtype], enabled=dtype != "float32"),
        ):
            module(frames)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def flops_per_video(
    name: str, dtype: str, params, videos: np.ndarray, last_block_cls_only: bool = True
) -> tuple[float, str]:
    """XLA's FLOP count for one video, from the all-XLA forward (no opaque custom calls), and
    where it came from ('xla', or 'macs_per_video' where no backend gave a count)."""
    # All frames in one step: XLA counts a loop's body once, not once per step.
    model = create_model(
        name,
        dtype=dtype,
        attention_impl="heads_first",
        frame_chunk=0,
        last_block_cls_only=last_block_cls_only,
    )
    flops = xla_flops(model.apply, {"params": params}, videos)  # see flop_count
    if flops:
        return flops / videos.shape[0], "xla"
    return 2.0 * model.macs_per_video(), "macs_per_video"  # the matmuls only, 0.3% under


def _paths(args: argparse.Namespace) -> dict[str, dict]:
    """stam-jax runners by label: each attention path at each `--frame-chunk` and `--last-block`.

    A path at the defaults (chunking 'auto', last block 'cls') is labelled by its attention
    alone ('auto', 'xla'); others get the setting appended ('auto_chunk0': all frames at once;
    'auto_lastall': the last block on every token).
    """
    paths = {}
    for gemm in args.triton_gemm.split(","):
        for last in args.last_block.split(","):
            for chunk in args.frame_chunk.split(","):
                for impl in args.attention.split(","):
                    label = impl if chunk == "auto" else f"{impl}_chunk{chunk}"
                    label += "" if last == "cls" else "_lastall"
                    label += "" if gemm == "off" else "_triton_gemm"
                    paths[label] = dict(
                        attention_impl=impl,
                        frame_chunk=None if chunk == "auto" else int(chunk),
                        last_block_cls_only=last == "cls",
                    )
                    paths[label][_TRITON] = gemm == "on"
    return paths


# A `_paths` entry's key that is the compiler setting (`config.triton_gemm`), not the model's.
_TRITON = "triton_gemm"


def _model_settings(path: dict) -> dict:
    """A `_paths` entry's model settings (without its compiler setting)."""
    return {k: v for k, v in path.items() if k != _TRITON}


def bench_model(name: str, batch: int, dtype: str, args: argparse.Namespace) -> dict:
    """One model at one batch size: every runner, alternating."""
    paths = _paths(args)
    impls = list(paths)
    model = create_model(name, dtype=dtype)
    t, s = model.num_frames, model.image_size
    videos = np.random.default_rng(0).integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), videos[:1])["params"]
    device_videos = jax.device_put(videos)
    runners, compile_s, errors = {}, {}, {}
    for impl in list(impls):
        forward = jax.jit(create_model(name, dtype=dtype, **_model_settings(paths[impl])).apply)
        start = time.perf_counter()
        try:
            lowered = forward.lower({"params": params}, device_videos)
            compiled = lowered.compile(
                compiler_options=sharding.compiler_options(paths[impl][_TRITON])
            )
        except Exception as e:  # a path this device lacks is reported, not fatal
            errors[impl] = f"{type(e).__name__}: {str(e)[:300]}"
            impls.remove(impl)
            continue
        compile_s[impl] = round(time.perf_counter() - start, 2)

        def run_jax(compiled=compiled):
            compiled({"params": params}, device_videos).block_until_ready()

        runners[f"jax_{impl}"] = run_jax

    if not args.no_torch:
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        reference, frames = torch_reference(model, videos, device)
        runners["torch_eager"] = torch_forward(reference, frames, dtype, sdpa=False)
        if args.torch_sdpa:
            runners["torch_sdpa"] = torch_forward(reference, frames, dtype, sdpa=True)
        if args.torch_compile:
            compiled_ref = torch.compile(reference)
            start = time.perf_counter()
            try:  # compiles on the first call; a failure is reported, the other runners run
                torch_forward(compiled_ref, frames, dtype, sdpa=False)()
            except Exception as e:
                errors["torch_compile"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                compile_s["torch_compile"] = round(time.perf_counter() - start, 2)
                runners["torch_compile"] = torch_forward(compiled_ref, frames, dtype, sdpa=False)
    matmuls, matmul_flops = matmul_runners(dtype, args.matmul_size, not args.no_torch)
    runners.update(matmuls)
    for run in runners.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            for _ in range(args.inner):
                run()
            times[key].append((time.perf_counter() - start) / args.inner)
    Attention.use_sdpa = False
    result = {"model": name, "batch": batch, "dtype": dtype, "attention": impls}
    result["frames_per_step"] = {
        label: create_model(name, **_model_settings(path)).frames_per_step(batch * t)
        for label, path in paths.items()
        if label in impls
    }
    result["compile_s"] = compile_s
    if errors:
        result["errors"] = errors
    rates = {k: matmul_flops / statistics.median(times.pop(k)) for k in matmuls}
    result["matmul_tflops"] = {k: round(v / 1e12, 4) for k, v in rates.items()}
    for key, samples in times.items():
        result[f"{key}_videos_per_s"] = round(batch / statistics.median(samples), 4)
    first = f"jax_{impls[0]}"
    for key in times:
        if key != first:
            ratio = result[f"{first}_videos_per_s"] / result[f"{key}_videos_per_s"]
            result[f"{first}_over_{key}"] = round(ratio, 3)
    counted = {
        last: flops_per_video(name, dtype, params, videos, last)
        for last in {paths[impl]["last_block_cls_only"] for impl in impls}
    }
    flops = {last: count for last, (count, _) in counted.items()}
    result["flop_source"] = ",".join(sorted({source for _, source in counted.values()}))
    result["gflop_per_video"] = round(flops[paths[impls[0]]["last_block_cls_only"]] / 1e9, 3)
    if len(flops) > 1:
        result["gflop_per_video_lastall"] = round(flops[False] / 1e9, 3)
    for impl in impls:
        achieved = flops[paths[impl]["last_block_cls_only"]] * result[f"jax_{impl}_videos_per_s"]
        result[f"jax_{impl}_tflops"] = round(achieved / 1e12, 3)
        # Model FLOP utilisation against the faster library's matmul in this alternation.
        result[f"jax_{impl}_mfu_vs_matmul"] = round(achieved / max(rates.values()), 3)
    return result


# The options the command line leaves unset: these, or with --smoke SMOKE (given ones win).
DEFAULTS = {
    "models": "stam_16",
    "batches": "1",
    "repeats": 3,
    "matmul_size": 2048,
    "attention": "auto",
    "frame_chunk": "auto",
    "last_block": "cls",
    "triton_gemm": "off",
}
SMOKE = {
    "models": "stam_tiny",
    "batches": "2",
    "repeats": 1,
    "matmul_size": 256,
    "attention": "auto,xla",
    "frame_chunk": "auto,2",
    "last_block": "cls,all",
    "triton_gemm": "off",
}


def check_frame_chunks(text: str) -> str:
    """`--frame-chunk` as given: a comma list of 'auto' and whole numbers >= 0.

    Raises:
      ValueError: anything else, saying what to use.
    """
    for item in text.split(","):
        if item != "auto" and not (item.isdigit() and item.isascii()):
            raise ValueError(
                f"{item!r} is not a setting; use a comma list of 'auto', 0 (all frames at once) "
                "or frames per step"
            )
    return text


def chunk_problem(args: argparse.Namespace) -> str | None:
    """Why a `--frame-chunk` number does not fit a model at a batch size (it must divide the
    batch's frames), or None."""
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for chunk in args.frame_chunk.split(","):
                if chunk == "auto":
                    continue
                model = create_model(name, frame_chunk=int(chunk))
                try:
                    model.frames_per_step(batch * model.num_frames)
                except ValueError as e:
                    return f"with {name} at batch {batch}, {e}"
    return None


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object per measurement, then the peak memory."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models",
        action=variants(),
        help=default_help(DEFAULTS, SMOKE, "models", "comma-separated"),
    )
    parser.add_argument(
        "--batches",
        action=whole_list(1),
        help=default_help(DEFAULTS, SMOKE, "batches", "comma-separated"),
    )
    parser.add_argument("--dtype", default="float32", action=one_of(DTYPES))
    parser.add_argument("--repeats", action=whole(1), help=default_help(DEFAULTS, SMOKE, "repeats"))
    parser.add_argument("--inner", default=1, action=whole(1), help="calls per timed sample")
    parser.add_argument(
        "--matmul-size", action=whole(1), help=default_help(DEFAULTS, SMOKE, "matmul_size")
    )
    parser.add_argument(
        "--attention",
        action=one_of_list(ATTENTION_IMPLS),
        help=default_help(
            DEFAULTS, SMOKE, "attention", "stam-jax attention paths, comma-separated"
        ),
    )
    parser.add_argument(
        "--frame-chunk",
        action=checked(check_frame_chunks),
        help=default_help(
            DEFAULTS,
            SMOKE,
            "frame_chunk",
            "stam-jax frame_chunk settings, comma-separated: 'auto' (the default rule), 0 "
            "(all frames at once), or frames per step",
        ),
    )
    for flag, choices, text in (
        (
            "--last-block",
            ("cls", "all"),
            "stam-jax last ViT block: 'cls' (the cls token only), 'all' (every token, as the "
            "official code), or 'cls,all'",
        ),
        (
            "--triton-gemm",
            ("on", "off"),
            "XLA's Triton GEMMs for the stam-jax runners (GPU only, `config.triton_gemm`): 'off' "
            "(cuBLAS for every matmul, as run_eval.py and run_train.py compile by default), 'on' "
            "(XLA's default), or 'off,on' (both, side by side)",
        ),
    ):
        key = flag[2:].replace("-", "_")
        parser.add_argument(
            flag, action=one_of_list(choices), help=default_help(DEFAULTS, SMOKE, key, text)
        )
    parser.add_argument("--no-torch", action="store_true", help="time stam-jax only")
    parser.add_argument("--torch-sdpa", action="store_true", help="also PyTorch's fused SDPA")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, one repeat, with PyTorch's SDPA (CI); options given explicitly win",
    )
    parser.add_argument(
        "--cache-dir",
        default="",
        action=cache_folder(),
        help="JAX's persistent compilation cache ('' off: cold compiles)",
    )
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    args.torch_sdpa = args.torch_sdpa or args.smoke
    problem = chunk_problem(args)
    if problem:
        parser.error(f"--frame-chunk={args.frame_chunk}: {problem}")
    sharding.enable_compilation_cache(args.cache_dir)  # '' is off, whatever the env says
    print(
        json.dumps(
            {
                "device": str(jax.devices()[0]),
                "jax": jax.__version__,
                "torch": torch.__version__,
                "dtype": args.dtype,
                "matmul_size": args.matmul_size,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
            }
        ),
        flush=True,
    )
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            print(json.dumps(bench_model(name, batch, args.dtype, args)), flush=True)
    memory: dict[str, int] = {
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    }
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        memory["jax_device_peak_MiB"] = round(stats.get("peak_bytes_in_use", 0) / 2**20)
        memory["torch_device_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(memory))


if __name__ == "__main__":
    main()
