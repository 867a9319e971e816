"""Where a whole forward's device time goes: stam-jax's kernels against PyTorch's, by kind.

    python benchmarks/kernel_profile.py --dtype bfloat16 --batch 32     # a GPU
    python benchmarks/kernel_profile.py --smoke                         # tiny sizes (CI, CPU)

Runs `--calls` forwards of the model (after warm-up) under each library's profiler: stam-jax's
jitted forward under `jax.profiler` (its XSpace read back with `jax.profiler.ProfileData`), the
PyTorch reference (`convert/torch_reference.py`, autocast for half precision, with its fused
`scaled_dot_product_attention` unless `--torch-eager`) under `torch.profiler`. Each kernel's
device time is summed by kind - matmul, attention, convolution, other (LayerNorm, GELU, residual
adds, casts, copies) - and reported per forward, with the wall time per forward, so the gap
between the two libraries can be read off kind by kind, and the top kernels of each (stam-jax's
with the JAX operation each came from, read from the compiled HLO's metadata). On a CPU
(smoke mode) the same is done with XLA's CPU thunks and PyTorch's aten ops, to exercise the code.
`--smoke` sets what the command line leaves unset to the tiny model, batch 2, 2 calls and
float32; options given explicitly win over it.
Needs only jax, flax, numpy and torch (plus this repository).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import tempfile
import time

import jax
import numpy as np
import torch
from _args import add_triton_gemm, default_help, fill_unset, one_of, variant, whole  # this folder's
from forward_bench import DTYPES, torch_forward, torch_reference  # this folder's

from stam_jax import create_model, sharding
from stam_jax.cli import ArgumentParser
from stam_jax.model import ATTENTION_IMPLS

# Patterns (regular expressions) searched in kernel (or HLO op) names, lower-cased, in this
# order. 'conv' is not followed by 'ert': XLA names its type conversions 'convert' (the
# GELU's and LayerNorms' fusions among them), which are not convolutions.
KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "softmax")),
    ("convolution", ("conv(?!ert)", "fprop", "implicit_gemm")),
    (
        "matmul",
        ("gemm", "nvjet", "xmma", "cutlass", "dot", "matmul", "addmm", "aten::mm", "aten::bmm"),
    ),
)
# XSpace lines that repeat the per-stream kernel events as aggregates.
_AGGREGATE_LINES = {"XLA Modules", "XLA Ops", "Launch Stats", "Steps", "TraceMe", "Source code"}


def kind_of(name: str) -> str:
    """The kind of one kernel (or op) from its name: attention, matmul, convolution or other."""
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(re.search(needle, lowered) for needle in needles):
            return kind
    return "other"


def summarise(kernels: list[tuple[str, float]], calls: int, wall_s: float, top: int) -> dict:
    """Per-forward milliseconds by kind and for the `top` kernels, from (name, seconds) pairs."""
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    for name, seconds in kernels:
        by_kind[kind_of(name)] += seconds
        by_name[name] += seconds
    busy = sum(by_kind.values())
    ms = lambda s: round(1e3 * s / calls, 3)  # noqa: E731
    return {
        "wall_ms_per_forward": ms(wall_s),
        "kernel_ms_per_forward": ms(busy),
        "kernels_per_forward": round(len(kernels) / calls, 1),
        "ms_by_kind": {kind: ms(s) for kind, s in sorted(by_kind.items(), key=lambda x: -x[1])},
        "top_kernels_ms": {
            name[:120]: ms(s) for name, s in sorted(by_name.items(), key=lambda x: -x[1])[:top]
        },
    }


_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{.*?op_name="([^"]*)"', re.M)


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Each instruction's JAX source (`op_name` metadata) by name, '.' written '_' as in
    kernel names (a fusion's kernel is named after the fusion; identical fusions share one)."""
    return {name.replace(".", "_"): op for name, op in _HLO_OP.findall(hlo_text)}


def _xspace_kernels(path: pathlib.Path) -> list[tuple[str, float]]:
    """(name, seconds) of every device kernel in a jax profile; XLA's CPU thunks on a CPU."""
    data = jax.profiler.ProfileData.from_file(str(path))
    kernels = []
    devices = [p for p in data.planes if p.name.startswith("/device:GPU")]
    for plane in devices:
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
        if not lines:
            lines = [line for line in plane.lines if line.name not in _AGGREGATE_LINES]
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                # The HLO op names the kind where the kernel's name does not (a fusion's
                # kernel is named after the fusion; a custom call after its library's kernel).
                op = stats.get("hlo_op", "")
                label = f"{event.name} [{op}]" if op and op != event.name else event.name
                kernels.append((label, event.duration_ns * 1e-9))
    if not devices:  # CPU: thunks carry their HLO op in the stats
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if "hlo_op" in dict(event.stats):
                        kernels.append((event.name, event.duration_ns * 1e-9))
    return kernels


def profile_jax(forward, params, videos, calls: int, top: int) -> dict:
    """Device kernels of `calls` stam-jax forwards, summarised, with the JAX source of each of
    the top kernels that the compiled HLO names."""
    forward = forward.lower(params, videos).compile()  # compiled once: timed and read
    sources = hlo_sources(forward.as_text())
    for _ in range(2):
        forward(params, videos).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(calls):
            out = forward(params, videos)
        out.block_until_ready()
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        paths = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
        if not paths:
            raise SystemExit(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
        kernels = _xspace_kernels(paths[-1])
    if not kernels:  # jax < 0.7.2 on a CPU: its thunks carry no HLO op
        raise SystemExit(
            f"jax {jax.__version__}'s profile names no kernel of the forward; on a CPU, jax >= "
            "0.7.2 names each of XLA's thunks"
        )
    result = summarise(kernels, calls, wall, top)
    result["top_kernels_source"] = {
        name: sources[base]
        for name in result["top_kernels_ms"]
        if (base := name.split(" [")[0].replace(".", "_")) in sources
    }
    return result


def profile_torch(run, on_gpu: bool, calls: int, top: int) -> dict:
    """Device kernels (aten ops' own CPU time on a CPU) of `calls` PyTorch forwards."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            run()
        wall = time.perf_counter() - start
    kernels = []
    if on_gpu:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels.append((event.name, event.time_range.elapsed_us() * 1e-6))
    else:
        for event in prof.key_averages():
            if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                kernels.append((event.key, event.self_cpu_time_total * 1e-6))
    return summarise(kernels, calls, wall, top)


# The options the command line leaves unset: these, or with --smoke SMOKE (given ones win).
DEFAULTS = {"model": "stam_16", "batch": 32, "dtype": "bfloat16", "calls": 5}
SMOKE = {"model": "stam_tiny", "batch": 2, "dtype": "float32", "calls": 2}


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object: per-forward kernel time by kind for each library."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", action=variant(), help=default_help(DEFAULTS, SMOKE, "model"))
    parser.add_argument("--batch", action=whole(1), help=default_help(DEFAULTS, SMOKE, "batch"))
    parser.add_argument(
        "--dtype", action=one_of(DTYPES), help=default_help(DEFAULTS, SMOKE, "dtype")
    )
    parser.add_argument(
        "--attention",
        default="auto",
        action=one_of(ATTENTION_IMPLS),
        help="stam-jax attention_impl",
    )
    parser.add_argument(
        "--calls",
        action=whole(1),
        help=default_help(DEFAULTS, SMOKE, "calls", "profiled forwards per library"),
    )
    add_triton_gemm(parser)
    parser.add_argument("--top", default=12, action=whole(1), help="kernels listed per library")
    parser.add_argument("--torch-eager", action="store_true", help="official explicit attention")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, CPU-sized (CI); explicit options win"
    )
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    on_gpu = jax.default_backend() == "gpu"
    model = create_model(args.model, dtype=args.dtype, attention_impl=args.attention)
    t, s = model.num_frames, model.image_size
    videos = np.random.default_rng(0).integers(0, 256, (args.batch, t, s, s, 3), dtype=np.uint8)
    params = {"params": jax.jit(model.init)(jax.random.key(0), videos[:1])["params"]}
    out = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "calls": args.calls,
        "triton_gemm": args.triton_gemm,
    }
    forward = jax.jit(model.apply, compiler_options=sharding.compiler_options(args.triton_gemm))
    out["jax_" + args.attention] = profile_jax(
        forward, params, jax.device_put(videos), args.calls, args.top
    )
    if not args.no_torch:
        reference, frames = torch_reference(model, videos, "cuda" if on_gpu else "cpu")
        run = torch_forward(reference, frames, args.dtype, sdpa=not args.torch_eager)
        label = "torch_eager" if args.torch_eager else "torch_sdpa"
        out[label] = profile_torch(run, on_gpu, args.calls, args.top)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
