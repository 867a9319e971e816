"""Half-precision compute against float32 on the same converted params, and where it runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import jaxpr_equations, random_params, random_videos

from stam_jax import create_model, model_config

# A ViT-S-like width on small frames: big enough that rounding accumulates as in stam_16.
SIZES = dict(
    num_frames=8,
    image_size=64,
    patch_size=16,
    hidden_size=192,
    depth=4,
    num_heads=3,
    mlp_dim=768,
    temporal_depth=2,
    temporal_heads=8,
    temporal_mlp_dim=512,
    num_classes=400,
)
# Measured on this suite's inputs: bfloat16 1.3e-2, float16 1.5e-3 (max error / logit scale).
BOUNDS = {"bfloat16": 3e-2, "float16": 4e-3}


@pytest.fixture(scope="module")
def float32_run():
    config = model_config(create_model("stam_tiny", **SIZES))
    params = random_params(config, seed=0)
    videos = random_videos(config, batch=32, seed=1)
    logits = jax.jit(create_model("stam_tiny", **SIZES).apply)({"params": params}, videos)
    return params, videos, np.asarray(logits)


@pytest.mark.parametrize("dtype", sorted(BOUNDS))
def test_half_precision_matches_float32(dtype, float32_run):
    params, videos, want = float32_run
    model = create_model("stam_tiny", **SIZES, dtype=dtype)
    got = jax.jit(model.apply)({"params": params}, videos)
    assert got.dtype == np.float32  # logits are returned in float32
    error = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
    assert error <= BOUNDS[dtype], f"{dtype}: relative error {error:.2e}"
    assert error > 0.0  # half precision really ran
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


@pytest.mark.parametrize("dtype", sorted(BOUNDS))
@pytest.mark.parametrize("overrides", [{}, {"aggregate": "mean", "remat": True, "frame_chunk": 4}])
def test_half_precision_where_documented(dtype, overrides):
    # Traced only (nothing compiled): every matmul takes `dtype` operands; the attention logits
    # come out in float32, and softmax, LayerNorm statistics, GELU and the mean over frames (every
    # sum) run in float32.
    model = create_model("stam_tiny", dtype=dtype, **overrides)
    video = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), np.uint8)
    params = jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)["params"]
    traced = jax.make_jaxpr(lambda p, v: model.apply({"params": p}, v))(params, video)
    assert [str(out.dtype) for out in traced.out_avals] == ["float32"]
    eqns = list(jaxpr_equations(traced.jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 10
    assert all(str(x.aval.dtype) == dtype for e in dots for x in e.invars)
    assert any(str(e.outvars[0].aval.dtype) == "float32" for e in dots)  # attention logits
    for e in eqns:
        if e.primitive.name in ("exp", "reduce_max", "reduce_sum", "rsqrt", "erf"):
            assert str(e.outvars[0].aval.dtype) == "float32", e
