"""Where the time goes: one ViT-B block and its parts, stam-jax against PyTorch, on 16 frames.

    python benchmarks/block_profile.py

Median wall seconds of 5 calls (after a warm-up) on a (16, 197, 768) input, i.e. one STAM-16
video's frames through one of the 12 blocks, and the dense matmul rate of each library, all in
one run so that the machine's drift hits both.
"""

from __future__ import annotations

import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.torch_reference import Block as TorchBlock
from stam_jax.model import Block, FusedQKVAttention, Mlp


def median_seconds(fn, repeats: int = 5) -> float:
    """Median of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Gelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.gelu(x, approximate=False)


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3072)(x)


def jax_seconds(module: nn.Module, x: np.ndarray) -> float:
    """Median seconds of the jitted module on `x`."""
    variables = module.init(jax.random.key(0), x)
    fn, device_x = jax.jit(module.apply), jnp.asarray(x)
    return median_seconds(lambda: fn(variables, device_x).block_until_ready())


def main() -> None:
    """Prints one JSON object: seconds per part for each library."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 197, 768), dtype=np.float32)
    hidden = rng.standard_normal((16, 197, 3072), dtype=np.float32)
    out = {"jax": {}, "torch": {}}
    out["jax"]["block"] = jax_seconds(Block(12, 3072), x)
    out["jax"]["attention"] = jax_seconds(FusedQKVAttention(12), x)
    out["jax"]["mlp"] = jax_seconds(Mlp(3072), x)
    out["jax"]["gelu"] = jax_seconds(_Gelu(), hidden)
    out["jax"]["dense_768_3072"] = jax_seconds(_Dense(), x)
    block, tx, th = TorchBlock(768, 12, 3072).eval(), torch.from_numpy(x), torch.from_numpy(hidden)
    linear = torch.nn.Linear(768, 3072)
    with torch.inference_mode():
        out["torch"]["block"] = median_seconds(lambda: block(tx))
        out["torch"]["attention"] = median_seconds(lambda: block.attn(tx))
        out["torch"]["mlp"] = median_seconds(lambda: block.mlp(tx))
        out["torch"]["gelu"] = median_seconds(lambda: torch.nn.functional.gelu(th))
        out["torch"]["dense_768_3072"] = median_seconds(lambda: linear(tx))
    n = 2048
    a, ta = jnp.ones((n, n)), torch.ones(n, n)
    matmul = jax.jit(lambda m: m @ m)
    out["jax"]["matmul_gflops"] = 2 * n**3 / median_seconds(lambda: matmul(a).block_until_ready())
    out["torch"]["matmul_gflops"] = 2 * n**3 / median_seconds(lambda: ta @ ta)
    for lib in out.values():
        lib["matmul_gflops"] /= 1e9
    print(json.dumps({k: {p: round(v, 4) for p, v in d.items()} for k, d in out.items()}, indent=1))


if __name__ == "__main__":
    main()
