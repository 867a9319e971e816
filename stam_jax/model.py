"""The STAM model in Flax linen: a ViT applied per frame, then a temporal transformer.

The parameter tree mirrors the official PyTorch module tree, so that the checkpoint converter
(`convert.mapping`) is a readable table:

    patch_embed/proj            Conv 16x16/16           patch_embed.proj
    cls_token, pos_embed        spatial tokens          cls_token, pos_embed
    blocks_N/{norm1,attn,norm2,mlp}   pre-norm ViT blocks      blocks.N.*
    norm                        final spatial LayerNorm norm
    aggregate/{cls_token,pos_embed}   temporal tokens          aggregate.*
    aggregate/transformer_enc/layers_L/{self_attn,linear1,linear2,norm1,norm2}
                                post-norm PyTorch TransformerEncoderLayer semantics
    aggregate/transformer_enc/norm    final temporal LayerNorm
    head                        classifier              head

Half precision: matmuls run in `dtype`; LayerNorm statistics and the attention softmax are
computed in float32 whatever `dtype` is (flax's LayerNorm reductions and
`jax.nn.dot_product_attention` both upcast).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Dtype = Any
AttentionImpl = str  # 'auto' | 'xla' | 'cudnn' | 'heads_first'
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "heads_first")
AGGREGATES = ("transformer", "mean")

# On CPU the spatial ViT runs a few frames at a time, so that a step's activations stay near
# the size of the last-level cache: steps of 4 ViT-B/16 frames ran STAM-16 1.04x / 1.26x /
# 1.35x faster at batch 1 / 2 / 4 than all frames at once, and a training step 1.29x
# (2-core AMD EPYC with 32 MiB of L3, BENCHMARKS.md).
_CPU_STEP_BYTES = 10 * 2**20
# Float frames are refused (`STAM._check_input`) beyond [0, 1] widened by _RANGE_SLACK (a
# resampling filter's overshoot), or with over _NEGATIVE_SHARE of their values below
# -_NEGATIVE (frames less their mean).
_RANGE_SLACK = 0.5
_NEGATIVE = 0.02
_NEGATIVE_SHARE = 0.25

_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_token_init = nn.initializers.truncated_normal(stddev=0.02)


def _layer_norm(name: str, eps: float, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it; statistics in float32 under half precision.
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def _resolve_attention_impl(impl: AttentionImpl, dtype: Dtype) -> str:
    """Maps the user-facing choice to the attention path run."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS}.")
    backend = jax.default_backend()
    if impl == "auto":
        # cuDNN's fused attention serves half precision on NVIDIA GPUs; elsewhere the
        # heads-first matmuls are the fastest measured path.
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and backend == "gpu" else "heads_first"
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs an NVIDIA GPU, but JAX's backend is {backend!r}; "
            "use 'auto', 'xla' or 'heads_first'."
        )
    if impl == "xla" and backend == "cpu" and jnp.dtype(dtype) == jnp.float16:
        # jax's XLA attention asks for an F16_F16_F32 dot algorithm that XLA:CPU lacks.
        return "heads_first"
    return impl


def _spatial_attention_impl(impl: AttentionImpl, dtype: Dtype, remat: bool) -> AttentionImpl:
    """The ViT blocks' attention path: 'auto' avoids cuDNN under rematerialisation.

    On an H200 (jax 0.11.2, BENCHMARKS.md) cuDNN's fused attention served the forward and the
    plain backward of the 197-token ViT attention, but refused the rematerialised backward
    ("Unsupported sequence length Q 197, KV 197") at trace time, where 'auto' cannot fall back.
    """
    if impl == "auto" and remat and _resolve_attention_impl(impl, dtype) == "cudnn":
        return "xla"
    return impl


class _ColumnDense(nn.Module):
    """`nn.Dense`'s params and arithmetic, optionally computing only some output columns.

    Declares `kernel` `(in, features)` and `bias` `(features,)` as `nn.Dense` does (same names,
    initialisers and rng streams), so it can stand in for one in a parameter tree.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
        kernel = self.param("kernel", _dense_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        kernel, bias = kernel[:, start:stop], bias[start:stop]
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, `x * (1 + erf(x / sqrt(2))) / 2`, computed in float32, returned in x's dtype.

    The formula of PyTorch's `nn.GELU()`. `jax.nn.gelu(approximate=False)` computes the same
    function through `erfc`, which jax lowers to a longer expansion (66 operations per element
    in XLA's count, which keeps `erf` as one operation). By its size, the MLPs' GELU was the
    largest non-matmul kernel of a bfloat16 forward on an H100 (10.6 of 56.8 ms, twice
    PyTorch's GELU; BENCHMARKS.md); this form ran 2.1x (bfloat16) and 1.5x (float32) faster
    on CPU.
    """
    y = x.astype(jnp.float32)
    y = y * 0.5 * (1.0 + jax.lax.erf(y * jnp.float32(0.7071067811865476)))
    return y.astype(x.dtype)


def _prepend_cls_add_pos(module: nn.Module, x: jax.Array) -> jax.Array:
    """Prepends the learned `cls_token` and adds the learned `pos_embed` (params of `module`)."""
    batch, length, width = x.shape
    cls = module.param("cls_token", _token_init, (1, 1, width), module.param_dtype)
    pos = module.param("pos_embed", _token_init, (1, length + 1, width), module.param_dtype)
    cls = jnp.broadcast_to(cls.astype(module.dtype), (batch, 1, width))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(module.dtype)


class FusedQKVAttention(nn.Module):
    """Multi-head self-attention with one fused q|k|v projection.

    Serves both the ViT blocks (`attn/qkv`, `attn/proj`) and the PyTorch
    `nn.MultiheadAttention` of the temporal layers (`self_attn/in_proj`, `self_attn/out_proj`):
    the fused weight's output rows are q, then k, then v, each split into heads contiguously.

    Attributes:
      num_heads: number of heads; the width must divide by it.
      qkv_name: name of the fused input projection.
      out_name: name of the output projection.
      dropout_rate: dropout on the attention probabilities (training only).
      attention_impl: 'auto', 'xla', 'cudnn' or 'heads_first' (see `STAM`).
      sow_weights: record the attention probabilities in 'intermediates' (heads-first path).
      first_query_only: only the first token's output is wanted: keys and values are computed
        for every token, the query for the first one only; returns `(batch, 1, width)`.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    qkv_name: str = "qkv"
    out_name: str = "proj"
    dropout_rate: float = 0.0
    attention_impl: AttentionImpl = "auto"
    sow_weights: bool = False
    first_query_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Self-attention over `x` `(batch, length, width)`, returning the same shape.

        With `first_query_only`, `(batch, 1, width)`: the first token's output only. Dropout
        on the probabilities applies when `deterministic` is False.
        """
        batch, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} does not divide into num_heads={self.num_heads}.")
        head_dim = width // self.num_heads
        dropout = self.dropout_rate > 0.0 and not deterministic
        # One fused q|k|v kernel (nn.Dense's params), of which each path computes the columns
        # it needs; the output projection.
        qkv = _ColumnDense(3 * width, self.dtype, self.param_dtype, name=self.qkv_name)
        proj = nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_dense_init,
            name=self.out_name,
        )
        if self.first_query_only:
            # One query per sequence: the attention core is a small matrix-vector product, run
            # heads-first (cuDNN's fused kernel is not made for a single query).
            q = qkv(x[:, :1], 0, width).reshape(batch, 1, self.num_heads, head_dim)
            kv = qkv(x, width).reshape(batch, length, 2, self.num_heads, head_dim)
            out = self._heads_first(q, kv[:, :, 0], kv[:, :, 1], deterministic=not dropout)
            return proj(out.reshape(batch, 1, width))
        impl = _resolve_attention_impl(self.attention_impl, self.dtype)
        if impl == "heads_first" or dropout or self.sow_weights:
            fused = qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
            q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
            out = self._heads_first(q, k, v, deterministic=not dropout)
            return proj(out.reshape(batch, length, width))
        # (B, T, heads, head_dim) for `jax.nn.dot_product_attention`: q, k and v each from its
        # own columns of the fused kernel, so that each is a matmul's output as it is. Sliced
        # out of one fused output, each was copied before the cuDNN kernel (3.4 of 56.8 ms of
        # a bfloat16 forward on an H100, BENCHMARKS.md).
        q, k, v = (
            qkv(x, i * width, (i + 1) * width).reshape(batch, length, self.num_heads, head_dim)
            for i in range(3)
        )
        if impl == "cudnn" and self.attention_impl == "auto":
            try:
                out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except NotImplementedError:  # shape, GPU or cuDNN version cuDNN cannot serve
                out = self._heads_first(q, k, v, deterministic=True)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return proj(out.reshape(batch, length, width))

    def _heads_first(
        self, q: jax.Array, k: jax.Array, v: jax.Array, deterministic: bool
    ) -> jax.Array:
        """Attention with heads as a batch axis, `(B, N, T, H)`, probabilities materialised.

        XLA:CPU runs these plain batched matmuls about 1.8x faster than the layout
        `jax.nn.dot_product_attention` uses (BENCHMARKS.md), and dropout on the probabilities
        needs them anyway. Logits and softmax are float32 whatever the compute dtype.
        """
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        logits = jnp.matmul(q, k.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)
        if self.sow_weights:  # (B, heads, queries, keys), float32, rows sum to one
            self.sow("intermediates", "attention_weights", probs)
        probs = probs.astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        return jnp.matmul(probs, v).transpose(0, 2, 1, 3)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """`x` with each sample zeroed at `rate` and the rest scaled by `1 / (1 - rate)`.

        The identity when `deterministic` or `rate` is 0; draws from the 'dropout' rng.
        """
        if self.rate == 0.0 or deterministic:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Mlp(nn.Module):
    """The ViT feed-forward: fc1 -> exact (erf) GELU -> fc2."""

    hidden_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """The feed-forward of `x` `(..., width)`, back to `width` features."""
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init)
        y = nn.Dense(self.hidden_dim, name="fc1", **dense)(x)
        y = gelu_exact(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = nn.Dense(x.shape[-1], name="fc2", **dense)(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Block(nn.Module):
    """A pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    With `first_token_only`, only the first (cls) token's output is computed, `(B, 1, D)`:
    every token still serves as a key and value, so that output is the same as the full
    block's first token (up to float rounding).
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    sow_attention: bool = False
    first_token_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Tokens `(B, T, D)` through the block: `(B, T, D)`, or `(B, 1, D)` first-token-only."""
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm("norm1", self.layer_norm_eps, **types)(x)
        y = FusedQKVAttention(
            self.num_heads,
            attention_impl=self.attention_impl,
            sow_weights=self.sow_attention,
            first_query_only=self.first_token_only,
            name="attn",
            **types,
        )(y, deterministic)
        if self.first_token_only:
            x = x[:, :1]
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x + DropPath(self.drop_path_rate)(y, deterministic)
        y = _layer_norm("norm2", self.layer_norm_eps, **types)(x)
        y = Mlp(self.mlp_dim, self.dropout_rate, name="mlp", **types)(y, deterministic)
        return x + DropPath(self.drop_path_rate)(y, deterministic)


class _PatchProjection(nn.Module):
    """`nn.Conv(features, (p, p), strides=(p, p), padding='VALID')` as one matmul over patches.

    Declares the convolution's `kernel` `(p, p, channels, features)` and `bias` (same names,
    initialisers and rng streams as `nn.Conv`), flattens each patch in the kernel's (row,
    column, channel) order and multiplies. The same sums as the strided convolution; cuDNN ran
    that convolution (3 input channels) at 4.2 ms of a 56.8 ms bfloat16 forward on an H100 for
    0.7% of its FLOPs, and XLA:CPU 1.2-1.6x slower than this matmul (BENCHMARKS.md).
    """

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        frames, height, width, channels = images.shape
        shape = (p, p, channels, self.features)
        kernel = self.param("kernel", _dense_init, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        rows, cols = height // p, width // p  # 'VALID': a partial patch at the edge is dropped
        x = x[:, : rows * p, : cols * p].reshape(frames, rows, p, cols, p, channels)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(frames, rows * cols, p * p * channels)
        y = jax.lax.dot_general(x, kernel.reshape(-1, self.features), (((2,), (0,)), ((), ())))
        return y + bias


class PatchEmbed(nn.Module):
    """Non-overlapping patches, projected (`patch_embed/proj`, the official strided conv)."""

    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """`(F, H, W, 3)` frames to `(F, patches, hidden)` tokens, patches in row-major order."""
        return _PatchProjection(
            self.hidden_size, self.patch_size, self.dtype, self.param_dtype, name="proj"
        )(images)


class TemporalEncoderLayer(nn.Module):
    """PyTorch `nn.TransformerEncoderLayer` defaults: post-norm, ReLU feed-forward, dropout.

    `x = norm1(x + dropout1(self_attn(x)))`, then
    `x = norm2(x + dropout2(linear2(dropout(relu(linear1(x))))))`; PyTorch's
    `nn.MultiheadAttention` also drops out attention probabilities at the same rate.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    sow_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Tokens `(B, T, D)` through the layer, same shape; dropout unless `deterministic`."""
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(kernel_init=_dense_init, **types)
        drop = nn.Dropout(self.dropout_rate)
        y = FusedQKVAttention(
            self.num_heads,
            qkv_name="in_proj",
            out_name="out_proj",
            dropout_rate=self.dropout_rate,
            attention_impl=self.attention_impl,
            sow_weights=self.sow_attention,
            name="self_attn",
            **types,
        )(x, deterministic)
        x = _layer_norm("norm1", self.layer_norm_eps, **types)(
            x + drop(y, deterministic=deterministic)
        )
        y = nn.Dense(self.mlp_dim, name="linear1", **dense)(x)
        y = drop(nn.relu(y), deterministic=deterministic)
        y = nn.Dense(x.shape[-1], name="linear2", **dense)(y)
        return _layer_norm("norm2", self.layer_norm_eps, **types)(
            x + drop(y, deterministic=deterministic)
        )


class TransformerEncoder(nn.Module):
    """A stack of `TemporalEncoderLayer`s and a final LayerNorm (`transformer_enc`)."""

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    sow_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Tokens `(B, T, D)` through `depth` layers and the final LayerNorm, same shape."""
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.depth):
            x = TemporalEncoderLayer(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.layer_norm_eps,
                self.attention_impl,
                self.sow_attention,
                name=f"layers_{i}",
                **types,
            )(x, deterministic)
        return _layer_norm("norm", self.layer_norm_eps, **types)(x)


class TemporalTransformer(nn.Module):
    """The official `aggregate`: cls token + position embedding + transformer over frames.

    Returns the final representation of the temporal cls token, `(B, width)`.
    """

    num_frames: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    sow_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array, deterministic: bool = True) -> jax.Array:
        """Frame features `(B, frames, D)` to the temporal cls token's output `(B, hidden)`.

        Features whose width is not `hidden_size` are first projected (`input_proj`).
        """
        x = frames
        if frames.shape[-1] != self.hidden_size:
            # Not in the official model (its temporal width equals the ViT width).
            x = nn.Dense(
                self.hidden_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_dense_init,
                name="input_proj",
            )(x)
        x = _prepend_cls_add_pos(self, x.astype(self.dtype))
        x = TransformerEncoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            self.layer_norm_eps,
            self.attention_impl,
            self.sow_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer_enc",
        )(x, deterministic)
        return x[:, 0]


class MeanAggregate(nn.Module):
    """The official parameter-free alternative: the mean of the frame features."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array, deterministic: bool = True) -> jax.Array:
        """Frame features `(B, frames, D)` to their mean over frames, `(B, D)`, in `dtype`.

        The mean is taken in float32; `deterministic` is accepted and unused.
        """
        del deterministic
        return jnp.mean(frames.astype(jnp.float32), axis=1).astype(self.dtype)


# v / 255 in float32 for every uint8 v, rounded as torchvision's ToTensor rounds it. Compiled,
# XLA turns a division by the constant 255 into a multiplication by its reciprocal, which gives
# 126 of the 256 values one ulp off; a table look-up is exact (1.13x the division's time on
# CPU, about 0.1 ms per video beside seconds of model: BENCHMARKS.md, transfer_bench.py).
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def _concrete(videos: Any) -> bool:
    """Whether `videos` holds values this process can read: not traced under jit, and not an
    array spread over several hosts (reading it would need every process to take part)."""
    if isinstance(videos, np.ndarray):
        return True
    return not isinstance(videos, jax.core.Tracer) and videos.is_fully_addressable


def uint8_to_unit(videos: jax.Array) -> jax.Array:
    """uint8 pixels as float32 in [0, 1], bit for bit the values of torchvision's `ToTensor`."""
    return jnp.take(jnp.asarray(_UINT8_TO_UNIT), videos, mode="clip")


# Fields of `STAM` that are run-time choices made when a checkpoint is loaded (dtypes, attention
# path, recording of attention weights, ...); the others describe the architecture and are
# saved in checkpoints (`variants.ARCH_FIELDS`).
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "attention_impl",
    "spatial_attention_layers",
    "temporal_attention",
    "remat",
    "frame_chunk",
    "last_block_cls_only",
)
# Fields that do not change the params' paths or shapes (how the model computes, not what it
# holds), reset to their defaults when the shapes are looked up so that every such variant
# shares one entry.
_SHAPE_NEUTRAL = (*RUNTIME_FIELDS, "temporal_dropout_rate", "dropout_rate", "drop_path_rate")


def param_shapes(model: STAM) -> dict[str, tuple[int, ...]]:
    """The '/'-joined path and shape of every param of `model`, as `model.init` makes them.

    One abstract `init` (no memory, no compute) per architecture, kept for the process: models
    that differ only in how they compute (dtype, attention path, remat, recorded attention,
    dropout) share it.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(STAM) if f.name in _SHAPE_NEUTRAL}
    key = model.clone(parent=None, name=None, **defaults)
    try:
        return _param_shapes(key)
    except TypeError:  # an unhashable field value: computed, not kept
        return _param_shapes.__wrapped__(key)


@functools.lru_cache(maxsize=32)
def _param_shapes(model: STAM) -> dict[str, tuple[int, ...]]:
    t, s = model.num_frames, model.image_size
    video = jax.ShapeDtypeStruct((1, t, s, s, 3), jnp.uint8)
    params = jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)["params"]
    return _flat_shapes(params)


def _flat_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(params, sep="/")
    return {path: tuple(getattr(leaf, "shape", ())) for path, leaf in flat.items()}


def _fitting_overrides(model: STAM, found: dict[str, tuple[int, ...]]) -> list[str]:
    """`create_model` overrides under which `model` would take params of shapes `found`."""
    overrides: list[str] = []
    if not found:  # no params at all: nothing to infer
        return overrides
    pos = found.get("aggregate/pos_embed")
    if pos is not None and len(pos) == 3 and pos[1] - 1 != model.num_frames:
        overrides.append(f"num_frames={pos[1] - 1}")
    width = found.get("cls_token")
    if width is not None and len(width) == 3 and width[2] != model.hidden_size:
        overrides.append(f"hidden_size={width[2]}")
    head = found.get("head/bias")
    if head is not None and len(head) == 1 and head[0] != model.num_classes:
        overrides.append(f"num_classes={head[0]}")
    pos = found.get("pos_embed")
    grid = math.isqrt(pos[1] - 1) if pos is not None and len(pos) == 3 else 0
    if grid and grid**2 == pos[1] - 1 and grid * model.patch_size != model.image_size:
        overrides.append(f"image_size={grid * model.patch_size}")
    depth = len({path.split("/")[0] for path in found if path.startswith("blocks_")})
    if depth and depth != model.depth:
        overrides.append(f"depth={depth}")
    temporal = any(path.startswith("aggregate/") for path in found)
    if temporal != (model.aggregate == "transformer"):
        overrides.append(f"aggregate={'transformer' if temporal else 'mean'!r}")
    return overrides


def params_misfit(model: STAM, params: Mapping[str, Any]) -> tuple[list[str], list[str]] | None:
    """How a params tree misfits `model`, or None if every path and shape fits.

    Args:
      model: the model the params are for.
      params: a params tree whose leaves have a `shape` (arrays, `jax.ShapeDtypeStruct`s, a
        checkpoint's metadata).

    Returns:
      (one line per misfit: params of another shape, six named and the rest counted, then
      missing and unexpected params, one line per top-level module; the `create_model`
      overrides under which `model` would fit them, read off their shapes, e.g.
      ["num_frames=8"], empty where none can be read off).
    """
    found = _flat_shapes(params)
    expected = param_shapes(model)
    if found == expected:
        return None
    problems = [
        f"param {k}: shape {found[k]}, this model's {expected[k]}"
        for k in sorted(expected.keys() & found.keys())
        if expected[k] != found[k]
    ]
    if len(problems) > 8:
        problems = [*problems[:6], f"... and {len(problems) - 6} more of other shapes"]
    for what, paths in (
        ("missing", expected.keys() - found.keys()),
        ("unexpected", found.keys() - expected.keys()),
    ):
        groups: dict[str, list[str]] = {}
        for path in sorted(paths):  # one line per top-level module
            groups.setdefault(path.split("/")[0], []).append(path)
        problems += [
            f"{what} params {', '.join(group)}"
            if len(group) <= 2
            else f"{what} params {top}/... ({len(group)} tensors)"
            for top, group in groups.items()
        ]
    return problems, _fitting_overrides(model, found)


def fitting_model(overrides: list[str]) -> str:
    """'build the model they were made for (`create_model(name, OVERRIDES)`)', for messages."""
    made = "build the model they were made for"
    return f"{made} (`create_model(name, {', '.join(overrides)})`)" if overrides else made


class STAM(nn.Module):
    """STAM: a ViT on every frame, a temporal transformer over the frame features, a head.

    Call it on videos `(B, T, H, W, 3)`: uint8 in [0, 255] (scaled by 1/255 on device, exactly as
    `ToTensor` does) or floating point already in [0, 1]. There is no mean/std normalisation.
    Returns logits `(B, num_classes)` in float32. The per-frame features `(B, T, hidden_size)`
    (`frame_features`) and the video feature before the head (`video_features`) are sown into
    the 'intermediates' collection (`model.apply(v, x, mutable=['intermediates'])`; each a
    1-tuple), and so are, on request (`spatial_attention_layers`, `temporal_attention`),
    attention probabilities in float32 (`attention_weights`): `(B * T, heads, 1 + patches,
    1 + patches)` under `blocks_N/attn`, frame t of video b at row b * T + t, and `(B, heads,
    1 + T, 1 + T)` under `aggregate/transformer_enc/layers_N/self_attn`, the cls token first in
    both. It is the same forward, which then takes the heads-first attention path for those
    layers (and, for the last ViT block, computes every token: logits equal up to float
    rounding).

    Attributes:
      num_classes: classifier outputs (400 for Kinetics-400).
      num_frames: T, the number of frames per video (the temporal position embedding's length).
      image_size: frame side in pixels (square frames).
      patch_size: ViT patch side.
      hidden_size: ViT width.
      depth: number of ViT blocks.
      num_heads: ViT attention heads.
      mlp_dim: ViT feed-forward width.
      aggregate: 'transformer' (STAM) or 'mean' (frame averaging, the official alternative).
      temporal_hidden_size: temporal width; None means `hidden_size` (as in the official model).
      temporal_depth: number of temporal encoder layers.
      temporal_heads: temporal attention heads.
      temporal_mlp_dim: temporal feed-forward width.
      temporal_dropout_rate: dropout of the temporal layers (training only; PyTorch's 0.1).
      dropout_rate: dropout in the ViT blocks (0 in the released models).
      drop_path_rate: stochastic depth of the ViT blocks, rising linearly to this rate.
      layer_norm_eps: LayerNorm epsilon everywhere (PyTorch's 1e-5).
      attention_impl: 'auto' (cuDNN for half precision on GPU where cuDNN supports the shapes,
        else 'heads_first'), 'xla' (`jax.nn.dot_product_attention`'s XLA path), 'cudnn' (an
        error where cuDNN cannot serve) or 'heads_first' (batched matmuls over (B, N, T, H)).
      spatial_attention_layers: ViT blocks whose attention probabilities are recorded.
      temporal_attention: record the attention probabilities of every temporal layer.
      remat: recompute each ViT block's activations in the backward pass instead of storing
        them (activation checkpointing: training memory grows with 1 block, not 12).
      frame_chunk: frames of the batch that one step of the spatial ViT takes, the steps running
        in sequence (a `scan`); it must divide batch x T. 0: all frames at once. None
        (automatic): all at once, except on CPU, where steps of about 10 MiB of activations
        (4 ViT-B/16 frames per device) run faster. Step s takes frames s, s + steps, ..., so
        a data-parallel batch stays on its devices. Outputs equal those of one step up to
        float rounding; dropout draws differ.
      last_block_cls_only: the last ViT block computes the output of the cls token only (the
        only token the model keeps; every token still serves as key and value): 6.9% fewer
        FLOPs for ViT-B/16, the same outputs up to float rounding. False computes every token,
        as the official code does (for comparisons). Recording the last block's spatial
        attention computes every token either way.
      dtype: compute dtype (float32, bfloat16 or float16).
      param_dtype: parameter dtype.
    """

    num_classes: int = 400
    num_frames: int = 16
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    aggregate: str = "transformer"
    temporal_hidden_size: int | None = None
    temporal_depth: int = 6
    temporal_heads: int = 8
    temporal_mlp_dim: int = 2048
    temporal_dropout_rate: float = 0.1
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    spatial_attention_layers: tuple[int, ...] = ()
    temporal_attention: bool = False
    remat: bool = False
    frame_chunk: int | None = None
    last_block_cls_only: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def frames_per_step(self, frames: int) -> int:
        """How many of a batch's `frames` (batch x T) one step of the spatial ViT takes.

        Raises:
          ValueError: for a `frame_chunk` that is not a non-negative int, does not divide
            `frames`, or would split frames whose spatial attention is recorded.
        """
        chunk = self.frame_chunk
        if chunk is None:
            if jax.default_backend() != "cpu" or self.spatial_attention_layers:
                return frames
            # Frames whose widest activation (tokens x max(width, MLP width), float32) fills
            # about _CPU_STEP_BYTES, per device of a batch split over all of them.
            tokens = self.num_patches + 1
            per_frame = tokens * max(self.hidden_size, self.mlp_dim) * 4
            per_device = max(1, _CPU_STEP_BYTES // per_frame)
            devices = jax.device_count()
            if per_device * devices >= frames:
                return frames
            for chunk in range(per_device * devices, 0, -devices):
                if frames % chunk == 0:
                    return chunk
            return frames
        if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 0:
            raise ValueError(
                f"frame_chunk={chunk!r}: use None (automatic), 0 (all frames at once) or a "
                "positive number of frames."
            )
        chunk = int(chunk)  # a numpy int (from a config's arithmetic) counts the same
        if chunk == 0:
            return frames
        if frames % chunk:
            raise ValueError(
                f"frame_chunk={chunk} does not divide the batch's {frames} frames (batch x "
                f"{self.num_frames}); use a divisor of {frames}, or 0 for all frames at once."
            )
        if self.spatial_attention_layers and chunk != frames:
            raise ValueError(
                f"frame_chunk={chunk} cannot record spatial attention (spatial_attention_layers="
                f"{self.spatial_attention_layers}); use frame_chunk=0 or None."
            )
        return chunk

    @nn.nowrap
    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """`nn.Module.apply`, refusing params passed without their `{'params': ...}` wrapper.

        Flax would say only that the first argument must be a dict of collections.
        """
        if (
            isinstance(variables, Mapping)
            and "params" not in variables
            and {"patch_embed", "head"} & set(variables)
        ):
            raise TypeError(
                f"model.apply got the params themselves (keys {sorted(variables)[:4]}...), not "
                "the variables that hold them; call model.apply({'params': params}, videos)."
            )
        return super().apply(variables, *args, **kwargs)

    def _check_fields(self) -> None:
        """Refuses sizes that are not ints, head counts that do not divide their width and rates
        outside [0, 1), before they meet shapes.

        Out of range, a dropout or drop-path rate silently zeroed every activation or rescaled
        them all; a size given as a float or a string failed inside jax, or as a videos shape
        that looked right (`num_frames='4'`).
        """
        sizes = {
            "num_classes": 1,
            "num_frames": 1,
            "image_size": 1,
            "patch_size": 1,
            "hidden_size": 1,
            "depth": 0,
            "num_heads": 1,
            "mlp_dim": 1,
            "temporal_depth": 0,
            "temporal_heads": 1,
            "temporal_mlp_dim": 1,
        }
        if self.temporal_hidden_size is not None:
            sizes["temporal_hidden_size"] = 1
        for name, least in sizes.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise ValueError(f"{name}={value!r}: use an int >= {least}.")
        # Each head takes an equal share of the width (of layers that exist); the attention's own
        # check named neither the field (`temporal_heads` was called num_heads) nor the fix.
        widths = (
            ("num_heads", self.num_heads, "hidden_size", self.hidden_size, self.depth),
            (
                "temporal_heads",
                self.temporal_heads,
                "temporal_hidden_size" if self.temporal_hidden_size else "hidden_size",
                self.temporal_hidden_size or self.hidden_size,
                self.temporal_depth if self.aggregate == "transformer" else 0,
            ),
        )
        for heads_name, heads, width_name, width, layers in widths:
            if layers and width % heads:
                raise ValueError(
                    f"{heads_name}={heads} does not divide {width_name}={width}; use a number "
                    f"of heads that divides {width} (or another width)."
                )
        for name in ("dropout_rate", "drop_path_rate", "temporal_dropout_rate"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"{name}={value!r}: use a probability in [0, 1) (0: off).")
        eps = self.layer_norm_eps  # any real number: np.float32(1e-5) is one, as for the rates
        if not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r}: use a number > 0.")

    def _check_input(self, videos: jax.Array) -> None:
        if self.image_size % self.patch_size:
            size, patch = self.image_size, self.patch_size
            nearest = max(patch, round(size / patch) * patch)
            raise ValueError(
                f"image_size={size} is not a multiple of patch_size={patch}; use a multiple of "
                f"{patch} (e.g. {nearest}), or a patch_size that divides {size}."
            )
        expected = (self.num_frames, self.image_size, self.image_size, 3)
        if not isinstance(videos, np.ndarray | jax.Array):
            # A torch tensor has ndim and dtype too, but jnp cannot read its dtype.
            fix = (
                "videos.numpy() for a torch tensor"
                if type(videos).__module__.startswith("torch")
                else "np.stack(frames) for a list"
                if isinstance(videos, list | tuple)
                else "np.asarray(videos)"
            )
            raise TypeError(
                f"videos is a {type(videos).__module__}.{type(videos).__qualname__}; pass an "
                f"array (numpy or jax) of shape (batch, {', '.join(map(str, expected))}), e.g. "
                f"{fix}."
            )
        if videos.ndim != 5 or tuple(videos.shape[1:]) != expected:
            raise ValueError(
                f"videos have shape {tuple(videos.shape)}; this model expects "
                f"(batch, {', '.join(map(str, expected))}) = (B, T, H, W, RGB). Sample "
                f"{self.num_frames} frames of {self.image_size}x{self.image_size}, channels last."
            )
        if videos.dtype != jnp.uint8 and not jnp.issubdtype(videos.dtype, jnp.floating):
            raise ValueError(
                f"videos have dtype {videos.dtype}; pass uint8 in [0, 255] or float in [0, 1]."
            )
        if videos.dtype != np.uint8 and videos.size and _concrete(videos):
            # Frames given as values (numpy, or a jax array outside jit): read here (3 passes).
            # NaN would pass the range check below (it compares False, and XLA's min and max
            # may skip it), giving NaN logits.
            xp = np if isinstance(videos, np.ndarray) else jnp
            if not bool(xp.isfinite(videos).all()):
                raise ValueError(
                    "float videos hold NaN or Inf values; STAM takes float frames in [0, 1]: "
                    "check the decoding or the arithmetic that made them."
                )
            low, high = float(videos.min()), float(videos.max())
            # Below 0: the undershoot of a resampling filter is found at sharp edges only (a
            # bicubic resize of a small dark spot: -0.41, of a bright one 1.41), while a frame
            # less its mean is below 0 wherever it is darker than that mean (about half of
            # it; x - 0.45 stays within [-0.45, 0.55], inside any margin for the filter).
            below = float((videos < -_NEGATIVE).mean()) if low < -_NEGATIVE else 0.0
            if high > 1 + _RANGE_SLACK or low < -_RANGE_SLACK or below > _NEGATIVE_SHARE:
                looks = (
                    "0-255 pixel values"
                    if high > 1 + _RANGE_SLACK and low >= -_RANGE_SLACK
                    else "mean-subtracted or normalised values (x - mean, (x - mean) / std, "
                    f"2x - 1): {below:.0%} of them are below 0"
                )
                raise ValueError(
                    f"float videos range over [{low:g}, {high:g}], which looks like {looks}; "
                    "STAM takes float frames in [0, 1] with no mean/std normalisation, as the "
                    "official transform makes them: pass the uint8 frames as they are, or "
                    "divide them by 255."
                )

    def _check_params(self) -> None:
        """Refuses params made for another architecture, naming each misfit and the fix, and
        no params at all.

        Runs where the model is traced (once under `jit`), from shapes only; the expected shapes
        come from one abstract `init` per architecture, kept. Flax itself would refuse the first
        misfit without saying what to do, and would ignore params the model does not have
        (blocks of a deeper ViT, a temporal transformer given to a mean model).
        """
        if self.is_initializing() or self.is_mutable_collection("params"):
            return  # params being made (init, or an apply that creates them: flax's lazy way)
        found = _flat_shapes(self.variables.get("params", {}))
        if not found:  # not params of another model: none at all
            raise ValueError(
                "the model was given no params; make them with "
                "model.init(jax.random.key(0), videos)['params'] or read a checkpoint's with "
                "stam_jax.checkpoints.load, then call model.apply({'params': params}, videos)."
            )
        misfit = params_misfit(self, self.variables["params"])
        if misfit is None:
            return
        problems, overrides = misfit
        raise ValueError(
            "params do not fit this model; they were made for another architecture:\n  "
            + "\n  ".join(problems)
            + f"\nTo use them as they are, {fitting_model(overrides)}; "
            "`stam_jax.checkpoints.load` reads a "
            "checkpoint's model with its params. To start this model from them, use "
            "`stam_jax.init.init_from_checkpoint(model, fresh_params, checkpoint)`: it resamples "
            "the position embeddings to other frame counts and image sizes and re-initialises "
            "the head for other classes."
        )

    def _check_dropout_rng(self, deterministic: bool) -> None:
        """Refuses training mode without a 'dropout' rng where a rate is on, and a traced
        `deterministic`, naming the fix.

        Flax's own error named only an inner module ('Dropout_0 needs PRNG for "dropout"').
        Like flax, a 'params' rng serves as the dropout rng when there is no 'dropout' one.
        """
        if isinstance(deterministic, jax.core.Tracer):  # bool() of it raised a generic error
            raise TypeError(
                "deterministic is traced (an argument of a jitted function); it chooses what "
                "the model computes and must be a Python bool: mark it static, e.g. "
                "jax.jit(model.apply, static_argnames='deterministic'), or close over it."
            )
        if deterministic or self.has_rng("dropout") or self.has_rng("params"):
            return
        temporal = self.aggregate == "transformer" and self.temporal_depth > 0
        rates = {
            "dropout_rate": self.dropout_rate,
            "drop_path_rate": self.drop_path_rate,
            **({"temporal_dropout_rate": self.temporal_dropout_rate} if temporal else {}),
        }
        on = [f"{name}={rate}" for name, rate in rates.items() if rate > 0]
        if on:
            raise ValueError(
                f"deterministic=False turns on dropout ({', '.join(on)}), which needs a 'dropout' "
                "rng: model.apply(variables, videos, deterministic=False, rngs={'dropout': key}) "
                "(a new key each step); deterministic=True (the default) for evaluation."
            )

    def _preprocess(self, videos: jax.Array) -> jax.Array:
        if videos.dtype == jnp.uint8:
            return uint8_to_unit(videos).astype(self.dtype)
        return videos.astype(self.dtype)

    @nn.compact
    def __call__(self, videos: jax.Array, deterministic: bool = True) -> jax.Array:
        """Classifies a batch of videos.

        Args:
          videos: `(B, T, H, W, 3)` uint8 or float in [0, 1].
          deterministic: False enables dropout and drop-path (needs a 'dropout' rng).

        Returns:
          Logits `(B, num_classes)`, float32.

        Raises:
          ValueError: a size that is not an int, a head count that does not divide its width,
            a rate outside [0, 1), an unknown `aggregate` or `attention_impl`, videos of another
            shape or dtype, float videos holding NaN or Inf or not in [0, 1] (checked where their
            values are readable), no params, params of another architecture (naming each misfit),
            `spatial_attention_layers` that are not a tuple of blocks, or a `frame_chunk` that
            `frames_per_step` refuses.
          TypeError: `videos` is not an array; `apply` given the params without their
            `{'params': ...}` wrapper.
        """
        self._check_fields()
        self._check_input(videos)
        self._check_dropout_rng(deterministic)
        layers = self.spatial_attention_layers
        if not isinstance(layers, tuple | list) or not all(
            isinstance(i, int | np.integer) and not isinstance(i, bool) for i in layers
        ):  # an int was "'int' object is not iterable"; True and 0.0 passed as blocks 1 and 0
            raise ValueError(
                f"spatial_attention_layers={layers!r}: use a tuple of block indices, e.g. (0,) "
                "for the first block."
            )
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"spatial_attention_layers {bad} are not blocks of this {self.depth}-block ViT; "
                f"use indices 0..{self.depth - 1}."
            )
        self._check_params()
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = videos.shape[0]
        images = videos.reshape((-1, *videos.shape[2:]))
        patch_embed = PatchEmbed(self.patch_size, self.hidden_size, name="patch_embed", **types)
        dropout = nn.Dropout(self.dropout_rate)
        # static_argnums counts the module: (self, x, deterministic).
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        block_attention = _spatial_attention_impl(self.attention_impl, self.dtype, self.remat)
        blocks = [
            block(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.drop_path_rate * i / max(self.depth - 1, 1),
                self.layer_norm_eps,
                block_attention,
                i in self.spatial_attention_layers,
                i == self.depth - 1 and self._last_block_cls_only,
                name=f"blocks_{i}",
                **types,
            )
            for i in range(self.depth)
        ]
        norm = _layer_norm("norm", self.layer_norm_eps, **types)

        def spatial(module: STAM, images: jax.Array) -> jax.Array:
            """The ViT on a stack of frames `(F, H, W, 3)`: their final cls features `(F, D)`."""
            x = patch_embed(module._preprocess(images))
            x = dropout(_prepend_cls_add_pos(module, x), deterministic=deterministic)
            for blk in blocks:
                x = blk(x, deterministic)
            return norm(x)[:, 0]

        # The params do not depend on the steps: init (often on one video, whose frames may not
        # divide into frame_chunk steps) runs all frames at once.
        chunk = images.shape[0] if self.is_initializing() else self.frames_per_step(images.shape[0])
        if chunk == images.shape[0]:
            features = spatial(self, images)
        else:
            # Step s takes frames s, s + steps, s + 2 steps, ...: a batch split over devices
            # along its leading axis keeps every device's frames on that device.
            steps = images.shape[0] // chunk
            step_images = images.reshape((chunk, steps, *images.shape[1:]))
            scan = nn.scan(
                lambda module, carry, x: (carry, spatial(module, x)),
                variable_broadcast="params",
                split_rngs={"params": False, "dropout": True},
                in_axes=1,
                out_axes=1,
            )
            _, features = scan(self, None, step_images)
            features = features.reshape((images.shape[0], self.hidden_size))
        frames = features.reshape(batch, self.num_frames, self.hidden_size)
        self.sow("intermediates", "frame_features", frames)

        # Temporal aggregation over the T frame features.
        aggregate = self._make_aggregate()
        video = aggregate(frames, deterministic)
        self.sow("intermediates", "video_features", video)
        logits = nn.Dense(
            self.num_classes,
            name="head",
            kernel_init=_dense_init,
            **types,
        )(video)
        return logits.astype(jnp.float32)

    def _make_aggregate(self) -> Callable[..., jax.Array]:
        if self.aggregate == "mean":
            return MeanAggregate(dtype=self.dtype, name="aggregate")
        if self.aggregate != "transformer":
            raise ValueError(f"aggregate={self.aggregate!r} is not one of {AGGREGATES}.")
        return TemporalTransformer(
            num_frames=self.num_frames,
            hidden_size=self.temporal_hidden_size or self.hidden_size,
            depth=self.temporal_depth,
            num_heads=self.temporal_heads,
            mlp_dim=self.temporal_mlp_dim,
            dropout_rate=self.temporal_dropout_rate,
            layer_norm_eps=self.layer_norm_eps,
            attention_impl=self.attention_impl,
            sow_attention=self.temporal_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="aggregate",
        )

    @property
    def _last_block_cls_only(self) -> bool:
        """Whether the last ViT block computes the cls token only (its attention not recorded)."""
        return self.last_block_cls_only and self.depth - 1 not in self.spatial_attention_layers

    @property
    def num_patches(self) -> int:
        """Patches per frame, `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    def macs_per_video(self) -> int:
        """Multiply-accumulates of one forward pass (matmuls and attention), for cost tables.

        Counts what runs: by default the last ViT block computes the cls token's output only
        (`last_block_cls_only`).
        """
        n, d, t = self.num_patches + 1, self.hidden_size, self.num_frames
        block = n * d * 4 * d + 2 * n * n * d + 2 * n * d * self.mlp_dim
        spatial = self.num_patches * d * 3 * self.patch_size**2 + self.depth * block
        if self.depth and self._last_block_cls_only:
            last = n * d * 2 * d + 2 * d * d + 2 * n * d + 2 * d * self.mlp_dim
            spatial += last - block
        temporal = 0
        if self.aggregate == "transformer":
            dt, m = self.temporal_hidden_size or d, t + 1
            temporal = self.temporal_depth * (
                m * dt * 4 * dt + 2 * m * m * dt + 2 * m * dt * self.temporal_mlp_dim
            )
            if dt != d:  # frame features projected to the temporal width (`input_proj`)
                temporal += t * d * dt
        head = (self.temporal_hidden_size or d) * self.num_classes
        return t * spatial + temporal + head
