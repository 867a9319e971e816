"""Where the time goes: one ViT-B block and its parts, stam-jax against PyTorch, side by side.

    python benchmarks/block_profile.py                                   # CPU, float32, 16 frames
    python benchmarks/block_profile.py --dtype bfloat16 --frames 512 --torch-sdpa   # a GPU
    python benchmarks/block_profile.py --smoke                           # tiny sizes (CI)

`--smoke` shrinks the block (width 64, 4 heads) and sets the sizes below that the command line
leaves unset (2 frames, 1 repeat, a 128 matmul); options given explicitly win over it.

Median wall seconds of `--repeats` calls (after a warm-up) of each part on a (frames, 197, 768)
input (16 frames: one STAM-16 video through one of its 12 blocks; 512: a batch of 32), stam-jax
jitted with its model's own modules, PyTorch the reference's (`convert/torch_reference.py`,
autocast for half precision, its fused SDPA attention with `--torch-sdpa`), and each library's
n x n x n matmul rate, the parts alternating between the libraries so that drift hits both.
Parts: the whole block; attention (qkv, core, projection); the attention core alone; the MLP
(fc1, exact GELU, fc2); one LayerNorm; the GELU alone; the 768 -> 3072 Linear; the patch
embedding of the frames. Beside three of them, stam-jax's earlier form, timed in the same
alternation so each change's effect is a same-run ratio (PyTorch runs its own form again):
'gelu_erfc' (`jax.nn.gelu`, through erfc), 'patch_embed_conv' (the strided convolution),
'attention_sliced_qkv' (q, k, v sliced out of one fused matmul's output). Needs only jax, flax,
numpy and torch (plus this repository), so it runs on a lent GPU machine too.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from _args import add_triton_gemm, default_help, fill_unset, one_of, whole

from convert.torch_reference import Attention as TorchAttention
from convert.torch_reference import Block as TorchBlock
from convert.torch_reference import PatchEmbed as TorchPatchEmbed
from stam_jax import sharding
from stam_jax.cli import ArgumentParser
from stam_jax.model import (
    Block,
    FusedQKVAttention,
    Mlp,
    PatchEmbed,
    _layer_norm,
    _resolve_attention_impl,
    gelu_exact,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Gelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return gelu_exact(x)


class _GeluErfc(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.gelu(x, approximate=False)


class _PatchEmbedConv(nn.Module):
    """The patch embedding as it was: one strided convolution."""

    patch: int
    width: int
    dtype: object

    @nn.compact
    def __call__(self, images):
        p = self.patch
        y = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype)(images)
        return y.reshape(y.shape[0], -1, self.width)


class _SlicedQKVAttention(nn.Module):
    """The attention as it was on the `jax.nn.dot_product_attention` paths: one fused q|k|v
    matmul, then q, k and v sliced out of its output."""

    heads: int
    impl: str
    dtype: object

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        qkv = nn.Dense(3 * width, dtype=self.dtype)(x)
        qkv = qkv.reshape(batch, length, 3, self.heads, width // self.heads)
        out = _attention_core(self.impl, self.heads)(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return nn.Dense(width, dtype=self.dtype)(out.reshape(batch, length, width))


class _Dense(nn.Module):
    features: int
    dtype: object

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype)(x)


class _LayerNorm(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        return _layer_norm("norm", 1e-5, self.dtype, jnp.float32)(x)


def _attention_core(impl: str, heads: int) -> Callable:
    """The attention core on q, k, v of shape (frames, tokens, heads, head_dim)."""

    def core(q, k, v):
        if impl == "heads_first":
            q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
            logits = jnp.matmul(q, k.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(q.dtype)
            return jnp.matmul(probs, v).transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)

    return core


def _sync_jax(fn: Callable, *args) -> Callable[[], None]:
    return lambda: jax.block_until_ready(fn(*args))


DEFAULTS = {"frames": 16, "repeats": 5, "matmul_size": 2048}
SMOKE = {"frames": 2, "repeats": 1, "matmul_size": 128}


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object: median seconds per part for each library, and matmul rates."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", action=one_of(DTYPES))
    parser.add_argument("--frames", action=whole(1), help=default_help(DEFAULTS, SMOKE, "frames"))
    parser.add_argument("--repeats", action=whole(1), help=default_help(DEFAULTS, SMOKE, "repeats"))
    parser.add_argument(
        "--matmul-size", action=whole(1), help=default_help(DEFAULTS, SMOKE, "matmul_size")
    )
    parser.add_argument("--torch-sdpa", action="store_true", help="PyTorch's fused attention")
    add_triton_gemm(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repeat (CI); explicit options win"
    )
    args = parser.parse_args(argv)
    width, heads, hidden, tokens, patch = 768, 12, 3072, 197, 16
    if args.smoke:
        width, heads, hidden, tokens = 64, 4, 128, 17
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    side = patch * round((tokens - 1) ** 0.5)  # frames of (tokens - 1) patches
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu else "cpu"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.frames, tokens, width), dtype=np.float32)
    h = rng.standard_normal((args.frames, tokens, hidden), dtype=np.float32)
    qkv = rng.standard_normal((3, args.frames, tokens, heads, width // heads), dtype=np.float32)
    images = rng.random((args.frames, side, side, 3), dtype=np.float32)
    impl = _resolve_attention_impl("auto", dtype)

    jax_parts = {
        "block": Block(heads, hidden, dtype=dtype),
        "attention": FusedQKVAttention(heads, dtype=dtype),
        "mlp": Mlp(hidden, dtype=dtype),
        "layernorm": _LayerNorm(dtype),
        "gelu": _Gelu(),
        "dense_to_mlp": _Dense(hidden, dtype),
        "patch_embed": PatchEmbed(patch, width, dtype=dtype),
        "gelu_erfc": _GeluErfc(),
        "patch_embed_conv": _PatchEmbedConv(patch, width, dtype),
        "attention_sliced_qkv": _SlicedQKVAttention(heads, impl, dtype),
    }
    runners: dict[str, dict[str, Callable[[], None]]] = {"jax": {}, "torch": {}}
    options = sharding.compiler_options(args.triton_gemm)
    for part, module in jax_parts.items():
        data = {"gelu": h, "gelu_erfc": h, "patch_embed": images, "patch_embed_conv": images}
        data = jnp.asarray(data.get(part, x), dtype)
        variables = jax.jit(module.init)(jax.random.key(0), data)
        forward = jax.jit(module.apply, compiler_options=options)
        runners["jax"][part] = _sync_jax(forward, variables, data)
    core = jax.jit(_attention_core(impl, heads), compiler_options=options)
    runners["jax"]["attention_core"] = _sync_jax(core, *jnp.asarray(qkv, dtype))

    block = TorchBlock(width, heads, hidden).eval().to(device)
    # The GELU's and the attention core's inputs are the outputs of autocast's Linears in the
    # model, so in the compute dtype (GELU runs in its input's dtype, SDPA would cast float32
    # q, k, v); the block, attention, MLP, LayerNorm and Linear take the float32 stream.
    half = DTYPES[args.dtype]
    tx, th = torch.from_numpy(x).to(device), torch.from_numpy(h).to(device, half)
    tq, tk, tv = (torch.from_numpy(a).to(device, half).transpose(1, 2) for a in qkv)
    linear = torch.nn.Linear(width, hidden).to(device)
    norm = torch.nn.LayerNorm(width).to(device)
    patch_embed = TorchPatchEmbed(patch, width).to(device)
    timages = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    torch_parts = {
        "block": lambda: block(tx),
        "attention": lambda: block.attn(tx),
        "attention_core": (
            (lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv))
            if args.torch_sdpa
            else (lambda: ((tq @ tk.transpose(-2, -1)) * block.attn.scale).softmax(-1) @ tv)
        ),
        "mlp": lambda: block.mlp(tx),
        "layernorm": lambda: norm(tx),
        "gelu": lambda: torch.nn.functional.gelu(th),
        "dense_to_mlp": lambda: linear(tx),
        "patch_embed": lambda: patch_embed(timages),
        # PyTorch's own forms again, beside stam-jax's earlier ones.
        "gelu_erfc": lambda: torch.nn.functional.gelu(th),
        "patch_embed_conv": lambda: patch_embed(timages),
        "attention_sliced_qkv": lambda: block.attn(tx),
    }

    def torch_runner(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with (
                torch.inference_mode(),
                torch.autocast(device, DTYPES[args.dtype], enabled=args.dtype != "float32"),
            ):
                fn()
            if on_gpu:
                torch.cuda.synchronize()

        return run

    runners["torch"] = {part: torch_runner(fn) for part, fn in torch_parts.items()}
    n = args.matmul_size
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype)
    runners["jax"]["matmul"] = _sync_jax(jax.jit(lambda m: m @ m), a)
    ta = torch.from_numpy(np.array(a, np.float32)).to(device, DTYPES[args.dtype])
    runners["torch"]["matmul"] = torch_runner(lambda: ta @ ta)

    TorchAttention.use_sdpa = args.torch_sdpa
    samples: dict[str, dict[str, list[float]]] = {lib: {} for lib in runners}
    for part in runners["jax"]:
        for lib in runners:
            runners[lib][part]()  # warm-up (and compile)
        for _ in range(args.repeats):
            for lib in runners:
                start = time.perf_counter()
                runners[lib][part]()
                samples[lib].setdefault(part, []).append(time.perf_counter() - start)
    TorchAttention.use_sdpa = False
    out = {
        "device": str(jax.devices()[0]),
        "dtype": args.dtype,
        "frames": args.frames,
        "triton_gemm": args.triton_gemm,
        "jax_attention": impl,
        "torch_attention": "sdpa" if args.torch_sdpa else "explicit",
    }
    for lib, parts in samples.items():
        seconds = {part: statistics.median(times) for part, times in parts.items()}
        seconds["matmul_gflops"] = 2 * n**3 / seconds.pop("matmul") / 1e9
        out[lib] = {part: round(value, 5) for part, value in seconds.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
