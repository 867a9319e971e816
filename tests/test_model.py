"""The Flax model on its own: sizes, inputs, training switches, dtypes, intermediates."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, jaxpr_equations, random_params, random_videos, xla_flags

from stam_jax import VARIANTS, create_model, model_config, model_from_config
from stam_jax.checkpoints import abstract_params
from stam_jax.model import DropPath, PatchEmbed, gelu_exact
from stam_jax.variants import parse_dtype, variant_name


def count_params(config: dict) -> int:
    """Parameter count from the architecture alone (written independently of the model)."""
    d, p, n = (
        config["hidden_size"],
        config["patch_size"],
        (config["image_size"] // config["patch_size"]) ** 2,
    )
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (
        4 * d
        + linear(d, 3 * d)
        + linear(d, d)
        + linear(d, config["mlp_dim"])
        + linear(config["mlp_dim"], d)
    )
    total = 3 * p * p * d + d + d + (n + 1) * d + config["depth"] * block + 2 * d
    width = d
    if config["aggregate"] == "transformer":
        f = config["temporal_mlp_dim"]
        layer = linear(d, 3 * d) + linear(d, d) + linear(d, f) + linear(f, d) + 4 * d
        total += d + (config["num_frames"] + 1) * d + config["temporal_depth"] * layer + 2 * d
    return total + linear(width, config["num_classes"])


def n_params(model) -> int:
    video = jax.ShapeDtypeStruct(
        (1, model.num_frames, model.image_size, model.image_size, 3), jnp.uint8
    )
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_stam_16_has_the_official_parameter_count():
    assert n_params(create_model("stam_16")) == 119_205_520


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_per_variant(name):
    model = create_model(name)
    assert n_params(model) == count_params(
        model_config(model) | {"temporal_mlp_dim": model.temporal_mlp_dim}
    )
    # stam_32/64 differ from stam_16 only by the temporal position embedding rows.
    if name in ("stam_32", "stam_64"):
        assert n_params(model) == 119_205_520 + (model.num_frames - 16) * 768


def param_shapes(model):
    """The params `model.init` makes, traced (`jax.eval_shape`): their tree, shapes and dtypes.

    An eager init of the tiny model dispatches (and compiles) op by op: seconds per test.
    """
    video = jax.ShapeDtypeStruct(
        (1, model.num_frames, model.image_size, model.image_size, 3), jnp.uint8
    )
    return jax.eval_shape(model.init, jax.random.key(0), video)["params"]


@functools.cache
def tiny_case():
    """`stam_tiny`'s random-reference params and 3 videos (12 frames), made once per module."""
    config = model_config(create_model("stam_tiny"))
    return random_params(config), random_videos(config, batch=3)


# Every frame at once, all tokens of the last block, no remat: what the other ways compute.
REFERENCE = create_model("stam_tiny", frame_chunk=0)


@functools.cache
def value_and_grads(model):
    """A class-weighted logit sum and its gradients on `tiny_case`, compiled once per model.

    `REFERENCE`'s is compiled once for the remat, last-block and frame-chunk tests.
    """
    params, videos = tiny_case()

    def loss(p):
        logits = model.apply({"params": p}, videos)
        return (logits * jnp.arange(logits.shape[-1])).sum()

    return jax.jit(jax.value_and_grad(loss))(params)


def test_input_shape_and_dtype_are_checked():
    model = create_model("stam_tiny")
    params = random_params(model_config(model))
    bad = {
        (2, 5, 32, 32, 3): r"shape \(2, 5, 32, 32, 3\); this model expects \(batch, 4, 32, 32, 3\)",
        (2, 4, 3, 32, 32): r"channels last",
        (4, 32, 32, 3): r"\(B, T, H, W, RGB\)",
    }
    for shape, message in bad.items():
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, jnp.zeros(shape, jnp.uint8))
    frames = [np.zeros((4, 32, 32, 3), np.uint8)]  # a list of videos: AttributeError 'ndim'
    with pytest.raises(
        TypeError, match=r"videos is a builtins\.list; pass an array .* np\.stack\(frames\)"
    ):
        model.apply({"params": params}, frames)
    # A torch tensor has ndim and dtype, which jnp could not read: "Cannot interpret 'torch.uint8'
    # as a data type".
    import torch

    tensor = torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"videos is a torch\.Tensor; .* e\.g\. videos\.numpy\(\)"):
        model.apply({"params": params}, tensor)
    with pytest.raises(
        ValueError, match=r"dtype int32; pass uint8 in \[0, 255\] or float in \[0, 1\]"
    ):
        model.apply({"params": params}, jnp.zeros((1, 4, 32, 32, 3), jnp.int32))
    # Float frames are taken in [0, 1]: 0-255 values or normalised ones, given eagerly as numpy
    # or as jax arrays, are refused instead of giving wrong logits. (Batches of 2, as the eager
    # applies of later tests: jax compiles each eager op once per shape.)
    frames = random_videos(model_config(model), batch=2)
    for to in (np.asarray, jnp.asarray):
        with pytest.raises(ValueError, match=r"range over \[0, 2\d\d\], which looks like 0-255"):
            model.apply({"params": params}, to(frames.astype(np.float32)))
        # Mean-subtracted frames (once let through, as they stay within [-0.5, 0.6]), 2x - 1
        # and mean/std-normalised ones.
        for normalised in (frames / 255.0 - 0.45, frames / 127.5 - 1, (frames / 255 - 0.45) / 0.22):
            with pytest.raises(
                ValueError,
                match=r"looks like mean-subtracted or normalised values \(x - mean, "
                r"\(x - mean\) / std, 2x - 1\): [4-6]\d% of them are below 0; STAM takes",
            ):
                model.apply({"params": params}, to(normalised.astype(np.float32)))
        # NaN passed the range check (it compares False) and gave NaN logits; Inf was called
        # 0-255 pixel values.
        for bad in (np.nan, np.inf):
            broken = frames.astype(np.float32) / 255.0
            broken[0, 1, 2, 3, 0] = bad
            with pytest.raises(ValueError, match=r"float videos hold NaN or Inf values"):
                model.apply({"params": params}, to(broken))
    # A resampling filter's overshoot of [0, 1] is taken: a bicubic resize of small bright and
    # dark spots (1.41 and -0.41 at 180 -> 224) and of noise, unclamped.
    spots = torch.zeros(2, 1, 16, 16)
    spots[0, :, 7:9, 7:9] = 1.0
    spots[1] = 1.0
    spots[1, :, 7:9, 7:9] = 0.0
    spots = torch.nn.functional.interpolate(spots, size=(32, 32), mode="bicubic")
    noise = torch.nn.functional.interpolate(
        torch.from_numpy(frames[:, :, ::2, ::2, 0].reshape(-1, 1, 16, 16) / 255.0).float(),
        size=(32, 32),
        mode="bicubic",
    )
    for resized in (spots.repeat(4, 3, 1, 1), noise.repeat(1, 3, 1, 1)):
        videos = resized.numpy().reshape(2, 4, 3, 32, 32).transpose(0, 1, 3, 4, 2)
        assert videos.min() < -0.1 and videos.max() > 1.1
        assert np.isfinite(model.apply({"params": params}, videos)).all()
    # Under jit the values are not known when the model is traced: nothing to check.
    jax.jit(model.apply)({"params": params}, frames.astype(np.float32))
    np.testing.assert_allclose(  # the same frames in [0, 1] are fine, and are uint8's logits
        model.apply({"params": params}, frames.astype(np.float32) / 255.0),
        model.apply({"params": params}, frames),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(
        ValueError,
        match=r"^image_size=30 is not a multiple of patch_size=8; use a multiple of 8 "
        r"\(e\.g\. 32\), or a patch_size that divides 30\.",
    ):
        create_model("stam_tiny", image_size=30).init(
            jax.random.key(0), jnp.zeros((1, 4, 30, 30, 3))
        )


def test_dropout_and_drop_path_only_in_training():
    model = create_model("stam_tiny", drop_path_rate=0.3, dropout_rate=0.1)
    params = tiny_case()[0]  # the rates add no params
    videos = random_videos(model_config(model), batch=2)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    a = apply({"params": params}, videos)
    # Not static, it is traced: refused with the fix (it raised TracerBoolConversionError).
    with pytest.raises(TypeError, match=r"^deterministic is traced .* static_argnames='determ"):
        jax.jit(model.apply)({"params": params}, videos, deterministic=False)
    np.testing.assert_array_equal(a, apply({"params": params}, videos))
    b = apply({"params": params}, videos, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, videos, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b) and not np.allclose(b, c)
    # With every rate at zero, training mode computes the eval function.
    quiet = create_model("stam_tiny", temporal_dropout_rate=0.0)
    d = quiet.apply(
        {"params": params}, videos, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    np.testing.assert_allclose(d, quiet.apply({"params": params}, videos), rtol=1e-6, atol=1e-6)


def test_temporal_dropout_is_on_by_default_in_training():
    model = create_model("stam_tiny")
    assert model.temporal_dropout_rate == 0.1
    params = tiny_case()[0]
    videos = random_videos(model_config(model), batch=2)
    a = model.apply({"params": params}, videos)
    b = model.apply(
        {"params": params}, videos, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert not np.allclose(a, b)
    # Without a 'dropout' rng: flax's error named only an inner module ('Dropout_0 needs PRNG
    # for "dropout"'), not the rate that is on or how to pass the rng.
    with pytest.raises(
        ValueError,
        match=r"^deterministic=False turns on dropout \(temporal_dropout_rate=0\.1\), which "
        r"needs a 'dropout' rng: model\.apply\(variables, videos, deterministic=False, "
        r"rngs=\{'dropout': key\}\)",
    ):
        model.apply({"params": params}, videos, deterministic=False)
    # Nothing to draw (every rate 0): no rng needed, as before.
    create_model("stam_tiny", temporal_dropout_rate=0.0).apply(
        {"params": params}, videos, deterministic=False
    )

    def train_shape(model, **kwargs):  # traced only
        run = lambda p: model.apply({"params": p}, videos, deterministic=False, **kwargs)  # noqa: E731
        return jax.eval_shape(run, abstract_params(model)).shape

    # A mean model has no temporal layers: its temporal_dropout_rate draws nothing.
    assert train_shape(create_model("stam_tiny_mean")) == (2, 10)
    # As in flax, a 'params' rng serves as the dropout rng.
    assert train_shape(model, rngs={"params": jax.random.key(0)}) == (2, 10)


def test_drop_path_drops_whole_samples():
    x = jnp.ones((64, 3, 5))
    y = DropPath(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    per_sample = np.asarray(y).reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert all(len(set(row)) == 1 for row in per_sample)  # all or nothing per sample
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    np.testing.assert_array_equal(DropPath(0.5).apply({}, x, deterministic=True), x)


def test_drop_path_rate_rises_linearly_over_the_blocks():
    # timm's schedule, torch.linspace(0, rate, depth): 0 in the first block, `rate` in the last.
    model = create_model("stam_tiny", depth=3, drop_path_rate=0.3, frame_chunk=0)
    calls = module_calls(model, deterministic=False, rngs={"dropout": jax.random.key(0)})
    rates = {path: m.rate for path, m, *_ in calls if isinstance(m, DropPath)}
    assert rates == pytest.approx(
        {f"blocks_{i}/DropPath_{j}": 0.15 * i for i in range(3) for j in range(2)}
    )


def test_mean_aggregate_is_the_mean_of_frame_features():
    model = create_model("stam_tiny_mean")
    assert "aggregate" not in param_shapes(model)  # parameter-free
    params = random_params(model_config(model))
    videos = random_videos(model_config(model), batch=3)
    logits, state = model.apply({"params": params}, videos, mutable=["intermediates"])
    frames = state["intermediates"]["frame_features"][0]
    assert frames.shape == (3, 4, 32)
    head = params["head"]
    np.testing.assert_allclose(
        logits, frames.mean(1) @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6
    )


def test_frames_are_processed_independently_by_the_spatial_part():
    model = create_model("stam_tiny")
    params = random_params(model_config(model))
    videos = random_videos(model_config(model), batch=2)
    order = [1, 0, 3, 2]

    def frame_features(v):
        _, state = model.apply({"params": params}, v, mutable=["intermediates"])
        return state["intermediates"]["frame_features"][0]

    np.testing.assert_allclose(
        frame_features(videos[:, order])[:, order], frame_features(videos), rtol=1e-5, atol=1e-6
    )
    # ... while the temporal transformer sees the order, through its position embedding.
    a = model.apply({"params": params}, videos)
    b = model.apply({"params": params}, videos[:, order])
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()  # float error is ~1e-7


@pytest.mark.parametrize(
    "dtype, overrides",
    [
        ("bfloat16", {}),
        ("float16", {}),
        ("bfloat16", {"aggregate": "mean"}),
        ("float16", {"temporal_hidden_size": 24, "temporal_heads": 4}),  # input_proj
    ],
)
def test_compute_dtype_reaches_every_submodule(dtype, overrides):
    model = create_model("stam_tiny", dtype=dtype, **overrides)
    videos = random_videos(model_config(model), batch=1)
    params = param_shapes(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # param_dtype
    # Traced, not run: dtypes are fixed when the model is traced (test_precision runs both).
    # Read while tracing: besides arrays, flax records the module `_make_aggregate` returns.
    outputs = []

    def trace(p, v):
        _, state = model.apply(
            {"params": p},
            v,
            capture_intermediates=lambda mdl, _: not isinstance(mdl, nn.Dropout),
            mutable=["intermediates"],
        )
        outputs.extend(jax.tree_util.tree_flatten_with_path(state["intermediates"])[0])

    jax.eval_shape(trace, params, videos)
    wrong = [
        jax.tree_util.keystr(path)
        for path, value in outputs
        if value.dtype != jnp.dtype(dtype) and jax.tree_util.keystr(path) != "['__call__'][0]"
    ]
    assert len(outputs) > 30 and wrong == []


def test_param_dtype_is_threaded():
    model = create_model("stam_tiny", param_dtype="bfloat16", temporal_hidden_size=24)
    params = param_shapes(model)
    assert "input_proj" in params["aggregate"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_attention_implementations():
    config = model_config(create_model("stam_tiny"))
    videos = random_videos(config, batch=2)
    params = random_params(config)

    def logits(impl):
        return create_model("stam_tiny", attention_impl=impl).apply({"params": params}, videos)

    heads_first, xla = logits("heads_first"), logits("xla")
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(logits("auto"), heads_first)
    np.testing.assert_allclose(heads_first, xla, rtol=1e-5, atol=1e-5)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"'cudnn' needs an NVIDIA GPU, but JAX's backend is"):
            logits("cudnn")
    with pytest.raises(ValueError, match=r"attention_impl='flash' is not one of \('auto', 'xla'"):
        logits("flash")


class _ConvPatchEmbed(nn.Module):
    """The patch embedding as a strided convolution (as the official code computes it)."""

    @nn.compact
    def __call__(self, images):
        init = nn.initializers.truncated_normal(stddev=0.02)
        conv = nn.Conv(24, (8, 8), strides=(8, 8), padding="VALID", kernel_init=init, name="proj")
        return conv(images).reshape(images.shape[0], -1, 24)


def test_patch_embedding_is_the_strided_convolution():
    # Frames whose sides are not multiples of the patch: 'VALID' drops the partial patches.
    images = jax.random.uniform(jax.random.key(0), (3, 40, 36, 3))
    embed, conv = PatchEmbed(8, 24), _ConvPatchEmbed()
    variables = embed.init(jax.random.key(1), images)
    # The same param names, shapes and initial values as the convolution it replaced.
    jax.tree.map(np.testing.assert_array_equal, variables, conv.init(jax.random.key(1), images))
    keys = iter(jax.random.split(jax.random.key(2), 2))
    variables = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), variables)
    got = embed.apply(variables, images)
    assert got.shape == (3, 20, 24)  # 5 x 4 patches, row-major
    np.testing.assert_allclose(got, conv.apply(variables, images), rtol=1e-5, atol=1e-5)


def test_gelu_is_pytorchs_exact_gelu():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    truth = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(gelu_exact(jnp.asarray(x)), truth, rtol=0, atol=2e-6)
    half = gelu_exact(jnp.asarray(x, jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float64), truth, rtol=1e-2, atol=1e-2)


def module_calls(model, **kwargs) -> list[tuple[str, nn.Module, tuple, dict, object]]:
    """(path, module, args, kwargs, output) of every module call of one forward, in order.

    Traced only (`jax.eval_shape`: no compile, no compute): arrays are abstract, and an array
    handed on unchanged from one module to the next is the same tracer object.
    """
    calls = []

    def record(call, args, call_kwargs, context):
        out = call(*args, **call_kwargs)
        if context.method_name == "__call__":
            calls.append(("/".join(context.module.path), context.module, args, call_kwargs, out))
        return out

    videos = jax.ShapeDtypeStruct(
        (2, model.num_frames, model.image_size, model.image_size, 3), jnp.uint8
    )
    params = jax.eval_shape(lambda v: model.init(jax.random.key(0), v)["params"], videos)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, v: model.apply({"params": p}, v, **kwargs), params, videos)
    return calls


def test_every_layer_norm_is_the_references_with_eps_1e_5():
    # A wrong eps moves tiny-model logits by about 1e-4 of their scale, at the parity tests'
    # tolerance (in the temporal or the final norms alone: well under it), so it is checked
    # here, norm by norm against the PyTorch reference's nn.LayerNorm modules.
    torch = pytest.importorskip("torch")
    from convert.torch_reference import reference_from_config

    model = create_model("stam_tiny", frame_chunk=0)
    calls = module_calls(model)
    got = {path: m.epsilon for path, m, *_ in calls if isinstance(m, nn.LayerNorm)}
    want = {
        re.sub(r"\.(\d+)\.", r"_\1/", name + ".").rstrip(".").replace(".", "/"): m.eps
        for name, m in reference_from_config(model_config(model)).named_modules()
        if isinstance(m, torch.nn.LayerNorm)
    }
    assert len(want) == 2 * 2 + 1 + 2 * 2 + 1  # norm1/norm2 per block and layer, two finals
    assert got == want
    assert set(want.values()) == {1e-5}


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_temporal_dropout_is_where_pytorchs_encoder_layer_has_it(attention_impl):
    # nn.TransformerEncoderLayer(dropout=0.1) in training: its MultiheadAttention drops out the
    # attention probabilities, then dropout1 the attention output, dropout the ReLU output and
    # dropout2 the feed-forward output; nothing else in STAM drops out (none on the position
    # embeddings; the ViT's rates are 0). On every attention path: the probabilities to drop
    # out are computed heads-first in training.
    model = create_model("stam_tiny", frame_chunk=0, attention_impl=attention_impl)
    calls = module_calls(model, deterministic=False, rngs={"dropout": jax.random.key(0)})
    outputs = {path: out for path, *_, out in calls}
    drops = [
        (path, m.rate, args[0])
        for path, m, args, kw, _ in calls
        if isinstance(m, nn.Dropout) and m.rate > 0 and not kw.get("deterministic", True)
    ]
    assert {rate for _, rate, _ in drops} == {0.1}
    tokens, heads = model.num_frames + 1, model.temporal_heads
    want = []
    for i in range(model.temporal_depth):
        layer = f"aggregate/transformer_enc/layers_{i}"
        want += [f"{layer}/self_attn/Dropout_0"] + [f"{layer}/Dropout_0"] * 3
        probs, attn, relu, ff = (x for *_, x in drops[4 * i : 4 * i + 4])
        assert probs.shape == (2, heads, tokens, tokens)
        assert attn is outputs[f"{layer}/self_attn"]
        assert relu.shape == (2, tokens, model.temporal_mlp_dim)
        assert ff is outputs[f"{layer}/linear2"]
    assert [path for path, *_ in drops] == want


def test_auto_attention_choice_per_backend(monkeypatch):
    from stam_jax import model as model_lib

    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "gpu")
    resolve, spatial = model_lib._resolve_attention_impl, model_lib._spatial_attention_impl
    assert resolve("auto", jnp.bfloat16) == "cudnn" and resolve("auto", jnp.float16) == "cudnn"
    assert resolve("auto", jnp.float32) == "heads_first"
    # cuDNN refused the rematerialised 197-token backward on an H200: 'auto' takes XLA there.
    assert spatial("auto", jnp.bfloat16, remat=True) == "xla"
    assert spatial("auto", jnp.bfloat16, remat=False) == "auto"
    assert spatial("cudnn", jnp.bfloat16, remat=True) == "cudnn"  # an explicit choice stays
    assert resolve("xla", jnp.float16) == "xla" and resolve("cudnn", jnp.float32) == "cudnn"
    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "cpu")
    assert resolve("auto", jnp.bfloat16) == "heads_first"
    assert spatial("auto", jnp.bfloat16, remat=True) == "auto"
    # XLA:CPU lacks the float16 dot algorithm jax's XLA attention asks for.
    assert resolve("xla", jnp.float16) == "heads_first" and resolve("xla", jnp.bfloat16) == "xla"
    # cuDNN is refused on every backend but an NVIDIA GPU's, naming it and the choices.
    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "tpu")
    with pytest.raises(
        ValueError,
        match=r"^attention_impl='cudnn' needs an NVIDIA GPU, but JAX's backend is 'tpu'; use "
        r"'auto', 'xla' or 'heads_first'\.$",
    ):
        resolve("cudnn", jnp.bfloat16)
    assert resolve("auto", jnp.bfloat16) == "heads_first"


def test_auto_attention_falls_back_where_cudnn_cannot_serve(monkeypatch):
    # 'auto' on a GPU asks cuDNN first and, where cuDNN refuses the shapes, computes the
    # attention heads-first; an explicit 'cudnn' passes cuDNN's refusal on. Traced only, with
    # the backend and a refusing cuDNN stood in.
    from stam_jax import model as model_lib

    asked = []

    def refusing(q, k, v, implementation=None, **kwargs):
        asked.append(implementation)
        raise NotImplementedError("cuDNN does not serve these shapes")

    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(model_lib.jax.nn, "dot_product_attention", refusing)
    video = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.uint8)
    auto = create_model("stam_tiny", dtype="bfloat16")
    params = param_shapes(auto)
    asked.clear()  # init asked too
    assert jax.eval_shape(auto.apply, {"params": params}, video).shape == (1, 10)
    # The first ViT block and both temporal layers (the last block runs the cls query only).
    assert asked == ["cudnn"] * 3
    with pytest.raises(NotImplementedError, match="cuDNN does not serve these shapes"):
        jax.eval_shape(auto.clone(attention_impl="cudnn").apply, {"params": params}, video)


def test_separate_temporal_width_adds_a_projection():
    model = create_model("stam_tiny", temporal_hidden_size=24, temporal_heads=4)
    params = param_shapes(model)
    assert params["aggregate"]["input_proj"]["kernel"].shape == (32, 24)
    assert params["head"]["kernel"].shape == (24, 10)
    videos = random_videos(model_config(model), batch=2)
    assert jax.eval_shape(model.apply, {"params": params}, videos).shape == (2, 10)


def test_registry_and_config_errors():
    with pytest.raises(ValueError, match=r"unknown model 'stam_8'; registered variants: \["):
        create_model("stam_8")
    with pytest.raises(ValueError, match=r"unknown model fields \['heads'\]"):
        model_from_config({"heads": 3})
    with pytest.raises(ValueError, match=r"dtype='fp8' is not supported"):
        parse_dtype("fp8")
    # Each field by its own name; a value that is no dtype at all was numpy's TypeError
    # ("Cannot interpret '3' as a data type").
    for field, value in [("param_dtype", "int8"), ("param_dtype", 3), ("dtype", None)]:
        with pytest.raises(
            ValueError,
            match=rf"^{field}={re.escape(repr(value))} is not supported; use one of "
            r"\['bfloat16', 'float16', 'float32'\]\.$",
        ):
            create_model("stam_tiny", **{field: value})
    assert create_model("stam_tiny", param_dtype="bfloat16").param_dtype is jnp.bfloat16
    assert create_model("stam_tiny", dtype=np.float16).dtype is jnp.float16
    with pytest.raises(ValueError, match=r"aggregate='max' is not one of"):
        param_shapes(create_model("stam_tiny", aggregate="max"))  # traced: refused all the same
    assert variant_name(create_model("stam_64", dtype="bfloat16")) == "stam_64"
    assert variant_name(create_model("stam_16", num_classes=600)) is None
    # A mean model has no temporal transformer: its temporal_* fields are not part of it.
    mean = model_config(create_model("stam_tiny_mean"))
    assert mean["aggregate"] == "mean" and not [k for k in mean if k.startswith("temporal_")]
    assert model_config(create_model("stam_tiny_mean", temporal_depth=5)) == mean
    # A config survives JSON-like round trips.
    model = create_model("stam_32")
    assert model_from_config(model_config(model)) == model


def test_params_of_another_architecture_are_refused_with_the_fix():
    model = create_model("stam_tiny")
    # Zeros of the right shapes (the check reads shapes only; computing takes longer).
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(model))
    videos = {t: np.zeros((1, t, 32, 32, 3), np.uint8) for t in (4, 8)}
    fix = r"stam_jax\.init\.init_from_checkpoint\(model, fresh_params, checkpoint\)"
    # Flax named the first misfit without saying what to do (ScopeParamShapeError); under jit
    # too, where it is found when the model is traced.
    eight = create_model("stam_tiny", num_frames=8)
    for apply in (eight.apply, lambda *a: jax.eval_shape(eight.apply, *a)):
        with pytest.raises(ValueError, match=r"params do not fit this model") as error:
            apply({"params": params}, videos[8])
        message = str(error.value)
        assert "param aggregate/pos_embed: shape (1, 5, 32), this model's (1, 9, 32)" in message
        assert "create_model(name, num_frames=4)" in message
        assert re.search(fix, message)
    with pytest.raises(ValueError, match=r"(?s)head/kernel: shape \(32, 10\), this model's "):
        create_model("stam_tiny", num_classes=5).apply({"params": params}, videos[4])
    # The model the params were made for, from their shapes: every size that differs.
    other = create_model(
        "stam_tiny", num_frames=8, hidden_size=16, num_classes=5, image_size=16, depth=3
    )
    fit = "num_frames=4, hidden_size=32, num_classes=10, image_size=32, depth=2"
    with pytest.raises(ValueError, match=rf"create_model\(name, {fit}\)`\)") as error:
        jax.eval_shape(other.apply, {"params": params}, np.zeros((1, 8, 16, 16, 3), np.uint8))
    # Every shared param misfits: six are named, the rest counted on one line.
    lines = str(error.value).splitlines()
    assert [line.startswith("  param ") for line in lines[1:8]] == [True] * 6 + [False]
    assert re.fullmatch(r"  \.\.\. and \d+ more of other shapes", lines[7])
    # Params the model lacks were ignored: a shallower ViT ran on half the blocks, a mean model
    # dropped the temporal transformer, and both gave logits.
    with pytest.raises(ValueError, match=r"(?s)unexpected params blocks_1/\.\.\. \(12 tensors\)"):
        create_model("stam_tiny", depth=1).apply({"params": params}, videos[4])
    with pytest.raises(
        ValueError, match=r"(?s)unexpected params aggregate/.*aggregate='transformer'"
    ):
        create_model("stam_tiny_mean").apply({"params": params}, videos[4])
    with pytest.raises(ValueError, match=r"(?s)missing params patch_embed/proj/bias, "):
        model.apply({"params": {k: v for k, v in params.items() if k != "patch_embed"}}, videos[4])
    # No params at all were called params of another architecture, all of them missing.
    for variables in ({}, {"params": {}}):
        with pytest.raises(
            ValueError,
            match=r"^the model was given no params; make them with model\.init\(jax\.random\.key"
            r"\(0\), videos\)\['params'\] or read a checkpoint's with stam_jax\.checkpoints\.load",
        ):
            jax.eval_shape(model.apply, variables, videos[4])
    # The params themselves in place of the variables: flax said only "should be a dictionary
    # of collections".
    with pytest.raises(TypeError, match=r"call model\.apply\(\{'params': params\}, videos\)"):
        model.apply(params, videos[4])
    # The fitting params pass, traced as jit and vmap trace them (vmapped: one per video).
    logits = jax.eval_shape(model.apply, {"params": params}, videos[4])
    assert logits.shape == (1, 10)
    stacked = jax.tree.map(lambda x: np.stack([x, x]), params)
    logits = jax.eval_shape(jax.vmap(lambda p: model.apply({"params": p}, videos[4])), stacked)
    assert logits.shape == (2, 1, 10)
    # Params made by an apply that may create them (flax's lazy way) are not checked: they are
    # being made, not given.
    lazy = jax.eval_shape(
        lambda v: model.apply({}, v, rngs={"params": jax.random.key(0)}, mutable=["params"]),
        videos[4],
    )
    assert jax.tree.map(lambda s: s.shape, lazy[1]["params"]) == jax.tree.map(
        lambda s: s.shape, params
    )


def test_the_params_check_shares_one_abstract_init_per_architecture():
    # checkpoints.check_params (at load) and the check in apply look the shapes up once for
    # models that differ only in how they compute (a checkpoint is loaded in float32, then
    # applied in bfloat16 with remat and recorded attention). The check runs at trace time:
    # eval_shape traces without compiling.
    from stam_jax import checkpoints
    from stam_jax.model import _param_shapes

    videos = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.uint8)
    seven, nine = (create_model("stam_tiny", num_classes=n) for n in (7, 9))
    _param_shapes.cache_clear()
    params = abstract_params(seven)
    checkpoints.check_params(seven, params)
    runs = seven.clone(dtype=jnp.bfloat16, remat=True, temporal_attention=True, drop_path_rate=0.1)
    assert jax.eval_shape(runs.apply, {"params": params}, videos).shape == (1, 7)
    info = _param_shapes.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert jax.eval_shape(nine.apply, {"params": abstract_params(nine)}, videos).shape == (1, 9)
    assert _param_shapes.cache_info().misses == 2  # another architecture: its own entry


def test_sizes_and_rates_are_checked():
    def init(**overrides):
        model = create_model("stam_tiny", **overrides)
        video = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.uint8)
        return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)

    # Out of range, a rate zeroed or rescaled every activation (drop_path_rate=1.5 dropped
    # every residual branch); num_frames='4' was told its (1, 4, 32, 32, 3) videos should be
    # (batch, 4, 32, 32, 3); a float size failed inside jax, num_classes=0 gave (B, 0) logits.
    bad = [
        ("drop_path_rate", 1.5),
        ("dropout_rate", -0.1),
        ("dropout_rate", "0.1"),
        ("temporal_dropout_rate", 1.0),
        ("num_frames", "4"),
        ("num_heads", True),  # a bool is an int to Python, not a size
        ("image_size", 32.0),
        ("num_classes", 0),
        ("temporal_hidden_size", 0),
        ("layer_norm_eps", -1e-5),
        ("layer_norm_eps", 0.0),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=rf"^{name}={re.escape(repr(value))}: use an? "):
            init(**{name: value})
    init(depth=0, temporal_depth=0, drop_path_rate=0.5, num_classes=np.int64(3))  # all valid
    # A head count that does not divide its width: the attention's own error called the
    # temporal heads 'num_heads' and named no fix.
    heads = {
        "num_heads=3 does not divide hidden_size=32; use a number of heads that divides 32": {
            "num_heads": 3
        },
        "temporal_heads=3 does not divide hidden_size=32; use": {"temporal_heads": 3},
        "temporal_heads=4 does not divide temporal_hidden_size=6; use a number of heads that "
        "divides 6": {"temporal_hidden_size": 6},
    }
    for message, overrides in heads.items():
        with pytest.raises(ValueError, match=rf"^{re.escape(message)}"):
            init(**overrides)
    init(temporal_hidden_size=8, temporal_heads=8)
    # Heads of layers that do not exist are not refused.
    init(aggregate="mean", temporal_heads=3)
    init(depth=0, num_heads=3, temporal_depth=0, temporal_heads=3)
    # numpy scalars (a config's arithmetic, an array's element) are numbers too.
    init(layer_norm_eps=np.float32(1e-5), dropout_rate=np.float32(0.1), drop_path_rate=np.int64(0))


def test_attention_weights_on_request():
    config = model_config(create_model("stam_tiny"))
    params = random_params(config)
    videos = random_videos(config, batch=3)
    plain = create_model("stam_tiny").apply({"params": params}, videos)
    model = create_model("stam_tiny", spatial_attention_layers=(0,), temporal_attention=True)
    logits, state = model.apply({"params": params}, videos, mutable=["intermediates"])
    np.testing.assert_array_equal(logits, plain)  # same forward, weights recorded on the way
    found = state["intermediates"]
    # (B*T frames, heads, 1 + 16 patches, 1 + 16 patches)
    assert found["blocks_0"]["attn"]["attention_weights"][0].shape == (3 * 4, 2, 17, 17)
    assert "blocks_1" not in found  # only the requested block recorded anything
    # The last block normally computes the cls token's output only; recording its attention
    # runs it over every token (every row recorded), the same logits up to rounding.
    model = model.clone(spatial_attention_layers=(1,))
    logits, state = model.apply({"params": params}, videos, mutable=["intermediates"])
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
    found = state["intermediates"]
    spatial = found["blocks_1"]["attn"]["attention_weights"][0]
    assert spatial.shape == (3 * 4, 2, 17, 17)
    for layer in range(2):
        temporal = found["aggregate"]["transformer_enc"][f"layers_{layer}"]["self_attn"]
        weights = temporal["attention_weights"][0]
        assert weights.shape == (3, 4, 5, 5)  # (B, heads, 1 + T, 1 + T)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
        assert weights.dtype == jnp.float32
    np.testing.assert_allclose(spatial.sum(-1), 1.0, rtol=1e-5)
    assert "blocks_0" not in found
    not_blocks = r"spatial_attention_layers \[{}\] are not blocks of this 2-block ViT; use "
    not_blocks += r"indices 0\.\.1\."
    not_indices = r"^spatial_attention_layers={}: use a tuple of block indices, e\.g\. \(0,\) "
    not_indices += r"for the first block\."
    refusals = [((2,), not_blocks.format(2)), ((-1,), not_blocks.format(-1))]  # -1: silent
    # An int was a TypeError; True and 0.0 were taken as blocks.
    refusals += [(bad, not_indices.format(re.escape(repr(bad)))) for bad in [1, (True,), (0.0,)]]
    for layers, refusal in refusals:
        with pytest.raises(ValueError, match=refusal):
            create_model("stam_tiny", spatial_attention_layers=layers).apply(
                {"params": params}, videos
            )
    # Recorded on the XLA attention path too (those layers compute heads-first).
    xla = model.clone(attention_impl="xla", spatial_attention_layers=(0, 1))
    _, state = jax.eval_shape(
        lambda p: xla.apply({"params": p}, videos, mutable=["intermediates"]), params
    )
    found = state["intermediates"]
    assert [found[f"blocks_{i}"]["attn"]["attention_weights"][0].shape for i in (0, 1)] == [
        (3 * 4, 2, 17, 17)
    ] * 2
    temporal = found["aggregate"]["transformer_enc"]
    assert [temporal[f"layers_{i}"]["self_attn"]["attention_weights"][0].shape for i in (0, 1)] == [
        (3, 4, 5, 5)
    ] * 2


def test_remat_changes_memory_not_results():
    params, videos = tiny_case()
    plain_value, plain_grads = value_and_grads(REFERENCE)
    value, grads = value_and_grads(REFERENCE.clone(remat=True))
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    # The recomputed forward may round differently (jax 0.7: 4e-6 on a gradient of 0.02 beside
    # ones of 24), so small entries are held to the array's largest, as sums of such terms are.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())

    # The checkpointed program recomputes the blocks in the backward pass, behind
    # optimization barriers that the plain program does not have.
    def lowered(remat):
        model = create_model("stam_tiny", remat=remat)
        grad = jax.grad(lambda p: model.apply({"params": p}, videos).sum())
        return jax.jit(grad).lower(params).as_text()

    assert "optimization_barrier" in lowered(True)
    assert "optimization_barrier" not in lowered(False)


@functools.cache
def xla_flops(model):
    """XLA's FLOP count of a full-size (16, 224, 224) forward, lowered once per model."""
    video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), video)
    apply = lambda v, x: model.apply(v, x, mutable=["intermediates"])[0]  # noqa: E731
    return jax.jit(apply).lower(shapes, video).cost_analysis()["flops"]


def test_last_block_computes_only_the_cls_token():
    assert REFERENCE.last_block_cls_only  # the default
    value, grads = value_and_grads(REFERENCE)
    # Every token of the last block, as the official model computes it.
    full_value, full_grads = value_and_grads(REFERENCE.clone(last_block_cls_only=False))
    np.testing.assert_allclose(value, full_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())

    # At full size the last block's other 196 tokens are 6.9% of the FLOPs; XLA's count of
    # what runs and `macs_per_video` (the matmuls: 0.3% under XLA's count) agree on it.
    pruned = create_model("stam_16", frame_chunk=0)
    # Recording the last block's attention computes every token too (all rows recorded).
    for full in (
        pruned.clone(last_block_cls_only=False),
        pruned.clone(spatial_attention_layers=(11,)),
    ):
        expected = pruned.macs_per_video() / full.macs_per_video()
        assert expected == pytest.approx(0.931, abs=1e-3)
        assert xla_flops(pruned) / xla_flops(full) == pytest.approx(expected, abs=1e-3)
        assert 0.995 < 2 * full.macs_per_video() / xla_flops(full) < 1.0
    assert 0.995 < 2 * pruned.macs_per_video() / xla_flops(pruned) < 1.0


def _matmul_macs(jaxpr) -> int:
    """Multiply-accumulates of every dot_general in a jaxpr, those of nested jaxprs included."""
    total = 0
    for eqn in jaxpr_equations(jaxpr):
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"last_block_cls_only": False},
        {"spatial_attention_layers": (1,)},
        {"aggregate": "mean"},
        {"temporal_hidden_size": 24, "temporal_heads": 4},
        {"depth": 0, "num_classes": 3},
    ],
)
def test_macs_per_video_counts_every_matmul_that_runs(overrides):
    # Every multiply-accumulate of the traced forward's matmuls, one video, counted exactly:
    # the cost tables' figures are those of the program that runs.
    model = create_model("stam_tiny", frame_chunk=0, **overrides)
    video = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video)
    traced = jax.make_jaxpr(lambda p, v: model.apply(p, v, mutable=["intermediates"]))(
        params, video
    )
    assert model.macs_per_video() == _matmul_macs(traced.jaxpr)


def test_frame_chunk_steps_give_the_same_model():
    params, videos = tiny_case()  # 3 videos: 12 frames, all different
    whole = REFERENCE
    assert whole == create_model("stam_tiny", frame_chunk=0)
    chunked = create_model("stam_tiny", frame_chunk=2)  # 6 steps of 2 frames
    assert whole.frames_per_step(12) == 12 and chunked.frames_per_step(12) == 2
    # The same parameter tree (paths, hence flax's init values): not part of the architecture.
    shapes = [jax.eval_shape(m.init, jax.random.key(0), videos)["params"] for m in (whole, chunked)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])

    def forward(model):
        apply = jax.jit(lambda p: model.apply({"params": p}, videos, mutable=["intermediates"]))
        return apply(params)

    want, want_state = forward(whole)
    got, got_state = forward(chunked)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-6 * scale)  # frames back in their places
    np.testing.assert_allclose(
        got_state["intermediates"]["frame_features"][0],
        want_state["intermediates"]["frame_features"][0],
        atol=1e-5,
    )

    # Gradients too, through the steps and their rematerialisation.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        value_and_grads(chunked.clone(remat=True))[1],
        value_and_grads(whole)[1],
    )
    # The steps are a loop in the program; all-at-once has none.
    programs = [
        jax.jit(m.apply).lower({"params": params}, videos).as_text() for m in (whole, chunked)
    ]
    assert "while" not in programs[0] and "while" in programs[1]
    # Dropout and drop-path draw per step; training still works.
    train = create_model("stam_tiny", frame_chunk=4, dropout_rate=0.1, drop_path_rate=0.2)
    rngs = {"dropout": jax.random.key(1)}
    out = jax.jit(lambda p: train.apply({"params": p}, videos, False, rngs=rngs))(params)
    assert out.shape == (3, 10) and np.isfinite(out).all()
    assert not np.allclose(out, want)


def test_frame_chunk_automatic_rule(monkeypatch):
    from stam_jax import model as model_lib

    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "cpu")
    stam_16 = create_model("stam_16")
    # ViT-B/16 frame: 197 tokens x 3072 x 4 bytes = 2.4 MB; 10 MiB steps take 4 frames.
    assert [stam_16.frames_per_step(f) for f in (16, 32, 96, 18)] == [4, 4, 4, 3]
    assert create_model("stam_demo").frames_per_step(16 * 8) == 128  # small model: at once
    recording = create_model("stam_16", spatial_attention_layers=(0,))
    assert recording.frames_per_step(32) == 32
    monkeypatch.setattr(model_lib.jax, "device_count", lambda: 2)
    assert stam_16.frames_per_step(32) == 8  # 4 per device, the batch split over 2
    assert stam_16.frames_per_step(6) == 6  # no step that is a multiple of 2 devices
    # The largest step of at most 4 frames per device that is a multiple of 2 devices: 7 frames
    # would put 4 on one device and 3 on the other.
    assert create_model("stam_16", num_frames=7).frames_per_step(14) == 2
    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "gpu")
    assert stam_16.frames_per_step(32) == 32
    assert create_model("stam_16", frame_chunk=8).frames_per_step(32) == 8  # explicit: kept
    # A numpy int (a config's arithmetic) was refused as not a number of frames.
    assert create_model("stam_16", frame_chunk=np.int64(8)).frames_per_step(32) == 8


def test_frame_chunk_errors():
    bad = {
        -1: r"frame_chunk=-1: use None \(automatic\), 0 \(all frames at once\) or a positive",
        "4": r"frame_chunk='4': use None",
        True: r"frame_chunk=True: use None",
        3: r"frame_chunk=3 does not divide the batch's 16 frames \(batch x 4\); use a divisor "
        r"of 16, or 0",
    }
    for chunk, message in bad.items():
        with pytest.raises(ValueError, match=message):
            create_model("stam_tiny", frame_chunk=chunk).frames_per_step(16)
    recording = create_model("stam_tiny", frame_chunk=4, spatial_attention_layers=(1,))
    with pytest.raises(ValueError, match=r"frame_chunk=4 cannot record spatial attention"):
        recording.frames_per_step(16)
    assert recording.clone(frame_chunk=16).frames_per_step(16) == 16  # one step: fine
    # init (often on one video) runs every frame at once: any frame_chunk makes the same params.
    video = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.uint8)
    shapes = jax.eval_shape(create_model("stam_tiny", frame_chunk=3).init, jax.random.key(0), video)
    assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(
        lambda s: s.shape, abstract_params(create_model("stam_tiny"))
    )
    config = model_config(create_model("stam_tiny"))
    with pytest.raises(ValueError, match=r"frame_chunk=3 does not divide the batch's 8 frames"):
        create_model("stam_tiny", frame_chunk=3).apply(
            {"params": random_params(config)}, random_videos(config, batch=2)
        )


SHARDED_STEPS = """
import re
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stam_jax import create_model
mesh = Mesh(np.asarray(jax.devices()), ("data",))
replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
videos = jax.ShapeDtypeStruct((8, 4, 32, 32, 3), np.uint8, sharding=batch)
# Their shapes are all that lowering needs (the same tree for every frame_chunk).
one = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), np.uint8)
params = jax.eval_shape(create_model("stam_tiny").init, jax.random.key(0), one)
for chunk in (0, 8):
    model = create_model("stam_tiny", frame_chunk=chunk)
    forward = jax.jit(model.apply, in_shardings=(replicated, batch), out_shardings=batch)
    text = forward.lower(params, videos).compile().as_text()
    found = sorted(set(re.findall(r"all-gather|all-to-all|collective-permute|all-reduce", text)))
    print(jax.device_count(), chunk, model.frames_per_step(32), "collectives", found)
"""


def test_frame_chunk_steps_keep_a_sharded_batch_on_its_devices():
    # 8 videos over 8 devices, 4 steps of 8 frames: each step takes one frame per device.
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_STEPS], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert lines == ["8 0 32 collectives []", "8 8 8 collectives []"], result.stdout


def test_uint8_frames_are_scaled_exactly_as_to_tensor_does():
    # Compiled, x / 255 became x * (1 / 255): 126 of the 256 values one ulp off ToTensor's.
    import torch

    from stam_jax.model import uint8_to_unit

    pixels = np.arange(256, dtype=np.uint8)
    expected = torch.from_numpy(pixels).float().div(255).numpy()
    np.testing.assert_array_equal(np.asarray(jax.jit(uint8_to_unit)(pixels)), expected)
    np.testing.assert_array_equal(np.asarray(uint8_to_unit(pixels)), expected)
    # The model's own scaling, compiled: uint8 frames give the logits of ToTensor's floats
    # (one block each side: the scaling is what is tested, and each compile is shorter).
    model = create_model("stam_tiny", depth=1, temporal_depth=1)
    params = random_params(model_config(model))
    frames = random_videos(model_config(model), batch=2)
    as_floats = torch.from_numpy(frames).float().div(255).numpy()
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(
        apply({"params": params}, frames), apply({"params": params}, as_floats)
    )


def test_a_stam_inside_a_module_of_ones_own():
    # create_model(..., name=...) failed: "got multiple values for argument 'name'".
    class Probe(nn.Module):
        @nn.compact
        def __call__(self, videos):
            logits = create_model("stam_tiny", name="backbone")(videos)
            return nn.Dense(3, name="probe")(logits)

    videos = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(Probe().init, jax.random.key(0), videos)["params"]
    assert sorted(params) == ["backbone", "probe"]
    shapes = jax.tree.map(lambda s: s.shape, params["backbone"])
    assert shapes == jax.tree.map(lambda s: s.shape, abstract_params(create_model("stam_tiny")))
    assert jax.eval_shape(Probe().apply, {"params": params}, videos).shape == (2, 3)
    named = model_from_config(model_config(create_model("stam_tiny")), name="teacher")
    assert named.name == "teacher"
    with pytest.raises(ValueError, match=r"unknown model fields \['nam'\]"):
        create_model("stam_tiny", nam="x")


@pytest.mark.parametrize("package", ["stam_jax", "convert"])
def test_package_exports_resolve_and_help_documents_them(package):
    import importlib
    import pydoc

    module = importlib.import_module(package)
    assert all(getattr(module, name) is not None for name in module.__all__)
    assert set(module.__all__) <= set(dir(module))
    # help(stam_jax) listed no function or class: its lazy exports were not in dir().
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    for name in {"stam_jax": ("create_model(", "class STAM"), "convert": ("torch_to_flax(",)}[
        package
    ]:
        assert name in text
