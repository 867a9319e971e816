"""Numerical parity of converted checkpoints with the PyTorch reference of the official model."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    TINY_CONFIGS,
    USER_XLA_FLAGS,
    cli_args,
    convert_kwargs,
    random_videos,
    torch_logits,
)
from flax.traverse_util import flatten_dict

from convert import convert_checkpoint
from convert.__main__ import main as convert_main
from convert.mapping import torch_to_flax
from convert.torch_reference import frames_from_videos, randomize_, reference_from_config
from stam_jax import checkpoints, create_model, model_config, model_from_config
from stam_jax.losses import soft_cross_entropy

TOLERANCE = 1e-4  # float32: max |jax - torch| relative to the logits' scale


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_parity_through_cli(name, official_pth, tmp_path):
    config = TINY_CONFIGS[name]
    pth, reference = official_pth(config, seed=1)
    assert convert_main([str(pth), str(tmp_path / "ckpt"), *cli_args(config)]) == 0

    model, params = checkpoints.load(tmp_path / "ckpt")
    assert model_config(model) == config
    videos = random_videos(config, batch=3)
    want = torch_logits(reference, videos)
    got = jax.jit(model.apply)({"params": params}, videos)
    assert got.shape == (3, config["num_classes"])
    assert relative_error(got, want) <= TOLERANCE
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


def test_float_input_in_unit_range_matches_uint8(official_pth, tmp_path):
    config = TINY_CONFIGS["tiny"]
    pth, reference = official_pth(config)
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(config))
    model, params = checkpoints.load(tmp_path / "ckpt")
    videos = random_videos(config, batch=2)
    as_float = videos.astype(np.float32) / 255.0
    np.testing.assert_array_equal(
        model.apply({"params": params}, videos), model.apply({"params": params}, as_float)
    )
    assert (
        relative_error(model.apply({"params": params}, as_float), torch_logits(reference, videos))
        <= TOLERANCE
    )


def test_reference_follows_a_models_layer_norm_eps():
    """A model trained with another eps gets a reference with that eps, not the official 1e-5
    (`test_model.py` checks the models' norms against the reference's, one by one)."""
    for aggregate in ("transformer", "mean"):
        config = {**TINY_CONFIGS["tiny"], "layer_norm_eps": 0.5, "aggregate": aggregate}
        norms = [
            m for m in reference_from_config(config).modules() if isinstance(m, torch.nn.LayerNorm)
        ]
        assert len(norms) == (10 if aggregate == "transformer" else 5)
        assert {m.eps for m in norms} == {0.5}


LOGITS = """
import sys
import jax
import numpy as np
from stam_jax import checkpoints
model, params = checkpoints.load(sys.argv[1])
videos = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(jax.jit(model.apply)({"params": params}, videos)))
"""


def logits_as_users_compile(checkpoint, videos: np.ndarray, tmp_path) -> np.ndarray:
    """A checkpoint's logits from a process with the user's XLA flags (the default optimisation
    level), not this session's (conftest.py compiles at level 0 to save time)."""
    np.save(tmp_path / "videos.npy", videos)
    env = {**os.environ, "XLA_FLAGS": USER_XLA_FLAGS, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", LOGITS, str(checkpoint), str(tmp_path / "videos.npy")]
    result = subprocess.run(
        [*command, str(tmp_path / "logits.npy")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "logits.npy")


@pytest.mark.slow
def test_full_size_stam_16_parity(official_pth, tmp_path):
    """The one full-size test: official stam_16 shapes, default head counts, 119M params."""
    config = model_config(create_model("stam_16"))
    pth, reference = official_pth(config, seed=3)
    path, inferred, report = convert_checkpoint(pth, tmp_path / "ckpt")  # heads from defaults
    assert inferred == {k: config[k] for k in inferred}
    assert report.warnings() == []

    model, params = checkpoints.load(path)
    assert model_config(model) == config
    assert sum(x.size for x in jax.tree.leaves(params)) == 119_205_520
    videos = random_videos(config, batch=2, seed=5)
    want = torch_logits(reference, videos)
    got = logits_as_users_compile(path, videos, tmp_path)
    assert got.shape == (2, 400)
    assert relative_error(got, want) <= TOLERANCE
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


# Gradients: the backward pass of each hand-made forward path (the erf GELU, the patch matmul,
# the q|k|v columns of the fused kernel, the attention paths, frame steps, the cls-only last
# block, remat, the uint8 table) against PyTorch autograd on the reference. Measured on
# stam_tiny (float32, XLA level 0): at most 9.3e-7 of each tensor's largest gradient over these
# cases, so 1e-5 leaves a 10x margin; a wrong derivative anywhere is off by far more.
GRAD_TOLERANCE = 1e-5
GRAD_CASES = {
    # CPU's 'auto' is the heads-first path; the ViT's frames in one step; uint8 frames.
    "defaults": ("tiny", {}, np.uint8),
    # jax.nn.dot_product_attention's XLA path under remat, every token of the last block, float
    # frames.
    "xla_remat_all_tokens": (
        "tiny",
        dict(attention_impl="xla", remat=True, last_block_cls_only=False, frame_chunk=0),
        np.float32,
    ),
    # The ViT in scanned steps of 2 frames, each block rematerialised.
    "frame_steps_remat": (
        "tiny",
        dict(attention_impl="heads_first", frame_chunk=2, remat=True),
        np.uint8,
    ),
    "mean": ("mean", {}, np.uint8),
}


@functools.cache
def reference_gradients(name: str) -> tuple[np.ndarray, np.ndarray, dict, float, dict]:
    """Videos, labels, a random reference's params, its cross-entropy and its gradients.

    The gradients go through the checkpoint converter as a state dict would: the same key
    table and layout changes as the params, so both trees have the Flax paths and layouts.
    """
    config = TINY_CONFIGS[name]
    videos = random_videos(config, batch=2, seed=4)
    labels = np.array([3, config["num_classes"] - 1])
    reference = randomize_(reference_from_config(config), seed=2)
    loss = torch.nn.functional.cross_entropy(
        reference(frames_from_videos(videos)), torch.from_numpy(labels)
    )
    loss.backward()
    named = dict(reference.named_parameters())
    assert named.keys() == reference.state_dict().keys()  # every tensor of the model trains
    kwargs = convert_kwargs(config)
    params = torch_to_flax({k: p.detach() for k, p in named.items()}, **kwargs)[1]
    grads = torch_to_flax({k: p.grad for k, p in named.items()}, **kwargs)[1]
    return videos, labels, params, loss.item(), grads


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_match_pytorch_autograd(case):
    name, options, dtype = GRAD_CASES[case]
    videos, labels, params, want_loss, want = reference_gradients(name)
    if dtype != np.uint8:
        videos = videos.astype(dtype) / 255
    model = model_from_config(TINY_CONFIGS[name], **options)
    targets = jax.nn.one_hot(labels, model.num_classes)

    def loss(p):  # the training loss (`run_train.py`'s, without label smoothing or mixing)
        return soft_cross_entropy(model.apply({"params": p}, videos), targets).mean()

    got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(got_loss) - want_loss) <= 1e-5 * want_loss
    got, want = flatten_dict(got, sep="/"), flatten_dict(want, sep="/")
    assert got.keys() == want.keys()
    errors = {k: relative_error(got[k], np.asarray(want[k])) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOLERANCE, (worst, errors[worst])


# PyTorch's nn.TransformerEncoderLayer in training drops out at four sites: the attention
# probabilities (its MultiheadAttention's `dropout`), the attention output (`dropout1`), the
# ReLU output (`dropout`) and the feed-forward output (`dropout2`). Ours, in call order within a
# layer: `self_attn/Dropout_0`, then the layer's `Dropout_0` three times.
DROPOUT_SITES = ("probabilities", "attention", "relu", "feed_forward")


def test_temporal_dropout_sites_match_pytorchs_encoder_layer():
    """Each site dropping everything (rate 1) in every temporal layer, and all four at once,
    gives the reference's train-mode logits with the same site at p=1 and the others at 0.

    STAM's rates must be below 1, so ours run at the default 0.1 and each Dropout call is
    intercepted: the chosen site returns zeros, the others their input. Each site changes the
    logits in its own way (at rate 1 the probabilities leave only the out-projection's bias,
    the ReLU site only linear2's), so a dropout in another place, or a missing one, is seen.
    """
    config = {**TINY_CONFIGS["tiny"], "depth": 1}  # the temporal layers are what is compared
    model = model_from_config(config, frame_chunk=0)
    assert model.temporal_dropout_rate == 0.1
    videos = random_videos(config, batch=2, seed=6)
    reference = randomize_(reference_from_config(config), seed=5).train()
    params = torch_to_flax(reference.state_dict(), **convert_kwargs(config))[1]
    cases = [(site,) for site in DROPOUT_SITES] + [DROPOUT_SITES]

    def zeroing(zeroed):
        """An interceptor of Dropout calls: zeros at the `zeroed` sites, the input elsewhere."""
        calls: dict[str, int] = {}  # calls of each layer's own Dropout_0 so far

        def intercept(call, args, kwargs, context):
            module = context.module
            if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
                return call(*args, **kwargs)
            assert module.rate == (0.1 if "aggregate" in module.path else 0.0)
            if module.rate == 0:  # the ViT's: off
                return args[0]
            path = "/".join(module.path)
            if path.endswith("self_attn/Dropout_0"):
                site = "probabilities"
            else:
                calls[path] = calls.get(path, 0) + 1
                site = DROPOUT_SITES[calls[path]]
            return jnp.zeros_like(args[0]) if site in zeroed else args[0]

        return intercept

    def logits_with_sites_zeroed(params, videos):
        out = []
        for zeroed in cases:
            with nn.intercept_methods(zeroing(zeroed)):
                out.append(
                    model.apply(
                        {"params": params},
                        videos,
                        deterministic=False,
                        rngs={"dropout": jax.random.key(0)},
                    )
                )
        return out

    got = jax.jit(logits_with_sites_zeroed)(params, videos)
    frames = frames_from_videos(videos)
    layers = reference.aggregate.transformer_enc.layers
    wants = []
    for zeroed in cases:
        for layer in layers:
            layer.self_attn.dropout = float("probabilities" in zeroed)
            layer.dropout1.p = float("attention" in zeroed)
            layer.dropout.p = float("relu" in zeroed)
            layer.dropout2.p = float("feed_forward" in zeroed)
        with torch.no_grad():
            wants.append(reference(frames).numpy())
    for zeroed, g, w in zip(cases, got, wants, strict=True):
        assert relative_error(g, w) <= TOLERANCE, zeroed
    # Every case differs from the others: each site, zeroed, changes the outputs its own way.
    for i in range(len(wants)):
        for j in range(i):
            assert relative_error(wants[i], wants[j]) > 1e-2, (cases[i], cases[j])
