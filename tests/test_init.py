"""Initialising a model from a checkpoint of another architecture (stam_jax.init)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from stam_jax import checkpoints, create_model
from stam_jax.init import (
    InitError,
    init_from_checkpoint,
    resample_spatial_pos_embed,
    resample_temporal_pos_embed,
)
from stam_jax.model import STAM


def fresh_params(model: STAM, seed: int = 1) -> dict[str, Any]:
    """Params of `model`'s shapes drawn from normal(0, 0.02), like its init but without tracing
    and running `model.init` (seconds per architecture on a small CPU); the checkpoints use
    seed 0, the "fresh" trees seed 1."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype),
        checkpoints.abstract_params(model),
    )


def flat(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def saved(path: Path, model: STAM) -> tuple[Path, dict[str, np.ndarray]]:
    """Saves a checkpoint of `model` with seed-0 params; returns it and the flat params."""
    params = fresh_params(model, seed=0)
    return checkpoints.save(path, model, params), flat(params)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """stam_tiny: 4 frames of 32x32 (a 4x4 grid of 8x8 patches), 10 classes."""
    return saved(tmp_path_factory.mktemp("init") / "base", create_model("stam_tiny"))


def test_same_architecture_copies_every_leaf(base):
    path, source = base
    model = create_model("stam_tiny")
    fresh = fresh_params(model)
    # The temporal position embedding comes from the checkpoint, so it is not redrawn.
    params, report = init_from_checkpoint(model, fresh, path, temporal_pos_embed_std=0.5)
    got = flat(params)
    assert got.keys() == source.keys()
    for name, value in source.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert got[name].dtype == np.asarray(flat(fresh)[name]).dtype
    assert report == [f"{len(source)} of {len(source)} tensors copied from {path}"]
    # Copies take the fresh leaves' dtype.
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), fresh)
    params, _ = init_from_checkpoint(model, half, path)
    for name, value in flat(params).items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(value, source[name].astype(jnp.bfloat16), err_msg=name)


def test_more_frames_resamples_temporal_pos_embed(base):
    path, source = base
    model = create_model("stam_tiny", num_frames=8)
    # The embedding comes from the checkpoint (resampled), so it is not redrawn.
    sources = {}
    params, report = init_from_checkpoint(
        model, fresh_params(model), path, temporal_pos_embed_std=0.5, sources=sources
    )
    got, old = flat(params)["aggregate/pos_embed"], source["aggregate/pos_embed"]
    assert got.shape == (1, 9, 32)
    np.testing.assert_array_equal(got[0, 0], old[0, 0])  # cls row kept
    np.testing.assert_allclose(got[0, 1], old[0, 1], rtol=0, atol=1e-7)
    np.testing.assert_allclose(got[0, -1], old[0, -1], rtol=0, atol=1e-7)
    # Half-pixel centres: new frame j of 8 sits at old frame (j + 0.5) * 4 / 8 - 0.5.
    times = (np.arange(8) + 0.5) * 4 / 8 - 0.5
    for channel in (0, 17):
        expected = np.interp(times, np.arange(4), old[0, 1:, channel])
        np.testing.assert_allclose(got[0, 1:, channel], expected, rtol=0, atol=1e-6)
    # Everything else is the checkpoint's.
    for name, value in flat(params).items():
        if name != "aggregate/pos_embed":
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    assert report[:2] == [
        f"{len(source) - 1} of {len(source)} tensors copied from {path}",
        "aggregate/pos_embed: resampled 4 frames -> 8 frames (cls row kept, frame rows linearly "
        "along time)",
    ]
    assert not any("redrawn" in line for line in report)
    # By name (init_report.txt), every tensor: the report itself counts and groups.
    assert sources.keys() == flat(params).keys()
    assert sources.pop("aggregate/pos_embed").startswith("resampled 4 frames -> 8 frames")
    assert set(sources.values()) == {"copied"}


def test_single_frame_mean_checkpoint_to_temporal_transformer(tmp_path, base):
    mean_model = create_model("stam_tiny", num_frames=1, aggregate="mean")
    path, source = saved(tmp_path / "mean", mean_model)
    model = create_model("stam_tiny", num_frames=4)
    fresh = flat(fresh_params(model))
    sources = {}
    params, report = init_from_checkpoint(
        model, fresh_params(model), path, temporal_pos_embed_std=1.0, sources=sources
    )
    got = flat(params)
    assert source.keys() == {k for k in got if not k.startswith("aggregate/")}
    for name, value in source.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    aggregate = sorted(k for k in got if k.startswith("aggregate/"))
    for name in aggregate:
        if name != "aggregate/pos_embed":
            np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)
    assert (
        f"aggregate: {len(aggregate)} tensors not in the checkpoint, freshly initialised" in report
    )
    # The fresh temporal position embedding (std 0.02) is redrawn at the requested scale.
    pos = got["aggregate/pos_embed"]
    assert pos.shape == (1, 5, 32)
    assert abs(fresh["aggregate/pos_embed"].std() - 0.02) < 0.01
    assert abs(pos.std() - 1.0) < 0.2 and abs(pos.mean()) < 0.2
    assert any("aggregate/pos_embed: redrawn as normal(0, 1.0)" in line for line in report)
    assert sources.keys() == got.keys()
    assert sources.pop("aggregate/pos_embed") == "drawn as normal(0, 1.0)"
    assert {sources[name] for name in aggregate if name in sources} == {
        "fresh (not in the checkpoint)"
    }
    assert {sources[name] for name in source} == {"copied"}


def test_single_frame_row_fills_every_frame():
    old = np.random.default_rng(0).normal(size=(1, 2, 6)).astype(np.float32)
    new = resample_temporal_pos_embed(old, 5)
    assert new.shape == (1, 6, 6)
    np.testing.assert_array_equal(new[0, 0], old[0, 0])
    np.testing.assert_array_equal(new[0, 1:], np.repeat(old[0, 1:], 5, axis=0))


def test_larger_image_resamples_spatial_grid(tmp_path):
    small = create_model("stam_tiny", image_size=32)
    params = fresh_params(small, seed=0)
    # A constant grid (and a distinct cls row) shows what bilinear resampling must keep.
    pos = np.full((1, 17, 32), 0.25, np.float32)
    pos[0, 0] = np.arange(32)
    params = {**params, "pos_embed": jnp.asarray(pos)}
    path = checkpoints.save(tmp_path / "small", small, params)

    # Both embeddings resampled into bfloat16 params: each in its fresh leaf's dtype.
    model = create_model("stam_tiny", image_size=64, num_frames=8)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), fresh_params(model))
    got, report = init_from_checkpoint(model, half, path)
    new = np.asarray(got["pos_embed"], np.float32)
    assert new.shape == (1, 65, 32) and got["pos_embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(new[0, 0], pos[0, 0])
    np.testing.assert_allclose(new[0, 1:], 0.25, rtol=0, atol=1e-6)
    assert "pos_embed: resampled spatial grid 4x4 -> 8x8" in report
    temporal = got["aggregate"]["pos_embed"]
    assert temporal.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        temporal,
        resample_temporal_pos_embed(params["aggregate"]["pos_embed"], 8).astype(jnp.bfloat16),
    )
    np.testing.assert_array_equal(
        got["patch_embed"]["proj"]["kernel"],
        params["patch_embed"]["proj"]["kernel"].astype(jnp.bfloat16),
    )


@pytest.mark.parametrize("grid", [3, 6])
def test_spatial_resampling_is_plain_bilinear_interpolation(grid):
    # As the temporal one: sample i of n at (i + 0.5) / n of each axis, no low-pass filter on
    # downsampling, rows and columns kept apart (a grid that differs along each).
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0) ** 2, indexing="ij")
    old = rows * 10 + cols
    pos = np.concatenate([[-1.0], old.reshape(-1)]).astype(np.float32).reshape(1, 17, 1)
    new = resample_spatial_pos_embed(np.repeat(pos, 2, axis=2), grid)
    assert new.shape == (1, grid * grid + 1, 2) and new[0, 0, 0] == -1.0
    at = (np.arange(grid) + 0.5) * 4 / grid - 0.5
    along_rows = np.stack([np.interp(at, np.arange(4), old[:, c]) for c in range(4)], axis=1)
    expected = np.stack([np.interp(at, np.arange(4), r) for r in along_rows])
    np.testing.assert_allclose(new[0, 1:, 0].reshape(grid, grid), expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(new[0, 1:, 1], new[0, 1:, 0])


def test_spatial_resampling_refuses_what_is_not_a_cls_row_and_a_square_grid():
    # A 1-D array or one without grid rows failed with IndexError, ValueError (isqrt of -1)
    # or ZeroDivisionError instead of the documented InitError.
    for shape in [(17,), (1, 0, 8), (1, 1, 8), (17, 8), (2, 17, 8), (1, 18, 8)]:
        shown = re.escape(str(shape))
        with pytest.raises(InitError, match=rf"shape {shown} does not hold a square .*\(1, N \+ 1"):
            resample_spatial_pos_embed(np.zeros(shape, np.float32), 3)


def test_other_class_count_reinitialises_head(base):
    path, source = base
    model = create_model("stam_tiny", num_classes=3)
    fresh = flat(fresh_params(model))
    sources = {}
    params, report = init_from_checkpoint(model, fresh_params(model), path, sources=sources)
    got = flat(params)
    for name in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)
        assert sources.pop(name) == "re-initialised (another class count)"
    assert set(sources.values()) == {"copied"}
    np.testing.assert_array_equal(got["norm/scale"], source["norm/scale"])
    assert "head: re-initialised (checkpoint has 10 classes, model 3)" in report


def test_incompatible_width_raises(base):
    path, _ = base
    model = create_model("stam_tiny", hidden_size=48, num_heads=3, temporal_heads=3)
    with pytest.raises(InitError) as error:
        init_from_checkpoint(model, fresh_params(model), path)
    message = str(error.value)
    assert "patch_embed/proj/kernel: checkpoint (8, 8, 3, 32), model (8, 8, 3, 48)" in message
    assert "cls_token: checkpoint (1, 1, 32), model (1, 1, 48)" in message
    # The same class count: its kernel differs in width, not in classes.
    assert "head/kernel: checkpoint (32, 10), model (48, 10)" in message


def test_a_model_that_is_not_a_stam_is_refused(base):
    # A variant's name or swapped arguments failed with "'str' object has no attribute
    # 'num_frames'" from deep inside.
    path, _ = base
    model = create_model("stam_tiny")
    fresh = fresh_params(model)
    for args in (("stam_tiny", fresh), (fresh, model)):
        with pytest.raises(TypeError, match=r"model is a (str|dict), not a STAM; pass the module"):
            init_from_checkpoint(*args, path)


@pytest.mark.parametrize("std", [-1.0, float("nan")])
def test_bad_temporal_pos_embed_std_is_refused(base, std):
    # NaN compared False to 0 and was silently ignored.
    path, _ = base
    model = create_model("stam_tiny")
    with pytest.raises(ValueError, match=rf"temporal_pos_embed_std={std} must be >= 0"):
        init_from_checkpoint(model, fresh_params(model), path, temporal_pos_embed_std=std)


@pytest.mark.parametrize("field", ["num_heads", "temporal_heads"])
def test_other_head_counts_are_refused(base, field):
    # Same shapes, so every tensor was copied ("10 of 10 tensors copied") into a model that
    # splits them into other heads: a different function, reported as a perfect copy.
    path, _ = base
    model = create_model("stam_tiny", **{field: 1})
    with pytest.raises(InitError, match=rf"{field}=\d \(the model has 1\).*other attention heads"):
        init_from_checkpoint(model, fresh_params(model), path)


def test_other_layer_norm_eps_is_reported(base):
    path, source = base
    model = create_model("stam_tiny", layer_norm_eps=1e-6)
    _, report = init_from_checkpoint(model, fresh_params(model), path)
    assert report == [
        f"{len(source)} of {len(source)} tensors copied from {path}",
        "layer_norm_eps: the checkpoint's is 1e-05, the model's 1e-06 (weights copied as they are)",
    ]


def test_mean_model_reports_unused_aggregate(base):
    path, source = base
    model = create_model("stam_tiny", num_frames=8, aggregate="mean")
    sources = {}
    params, report = init_from_checkpoint(
        model, fresh_params(model), path, temporal_pos_embed_std=1.0, sources=sources
    )
    got = flat(params)
    assert not any(k.startswith("aggregate/") for k in got)
    for name, value in got.items():
        np.testing.assert_array_equal(value, source[name], err_msg=name)
    unused = sum(k.startswith("aggregate/") for k in source)
    assert f"unused from the checkpoint: aggregate ({unused} tensors)" in report
    assert any("temporal_pos_embed_std=1.0 ignored" in line for line in report)


@pytest.mark.parametrize("num_frames", [3, 8, 16, 40])
def test_temporal_resampling_is_plain_linear_interpolation(num_frames):
    # Sample i of n sits at (i + 0.5) / n of the time axis, as documented; downsampling is not
    # low-pass filtered (jax.image.resize antialiases by default: 16 -> 8 moved rows by 5.9).
    frames = np.arange(16, dtype=np.float32) ** 2
    pos = np.concatenate([[-1.0], frames]).astype(np.float32).reshape(1, 17, 1)
    pos = np.repeat(pos, 2, axis=2)
    new = resample_temporal_pos_embed(pos, num_frames)
    at = (np.arange(num_frames) + 0.5) * 16 / num_frames - 0.5
    expected = np.interp(at, np.arange(16), frames)  # edges held beyond the first/last centre
    np.testing.assert_allclose(new[0, 1:, 0], expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(new[0, 1:, 1], new[0, 1:, 0])
    assert new[0, 0, 0] == -1.0


def test_params_holding_nan_or_inf_are_refused_unless_unused(tmp_path):
    # Training from them would stop at its first step with a NaN loss and blame the learning
    # rate; a head the model re-initialises (another class count) is not used, so it may hold
    # anything.
    model = create_model("stam_tiny")
    params = fresh_params(model, seed=0)
    params["blocks_1"]["attn"]["qkv"]["bias"] = (
        params["blocks_1"]["attn"]["qkv"]["bias"].at[3].set(jnp.nan)
    )
    params["head"]["kernel"] = params["head"]["kernel"].at[0, 0].set(jnp.inf)
    path = checkpoints.save(tmp_path / "diverged", model, params)
    with pytest.raises(InitError) as refused:
        init_from_checkpoint(model, fresh_params(model), path)
    assert str(refused.value) == (
        f"{path} holds NaN or Inf values in 2 param(s) (blocks_1/attn/qkv/bias, head/kernel); "
        "initialise from a checkpoint with finite params (a run that diverged: export an "
        "earlier step with python -m stam_jax.export RUN_DIR OUT_DIR --step N)."
    )
    params["blocks_1"]["attn"]["qkv"]["bias"] = jnp.zeros_like(
        params["blocks_1"]["attn"]["qkv"]["bias"]
    )
    path = checkpoints.save(tmp_path / "bad_head", model, params)
    other = create_model("stam_tiny", num_classes=3)
    got, report = init_from_checkpoint(other, fresh_params(other), path)
    assert "head: re-initialised (checkpoint has 10 classes, model 3)" in report
    assert np.isfinite(flat(got)["head/kernel"]).all()
    with pytest.raises(InitError, match=r"in 1 param\(s\) \(head/kernel\)"):
        init_from_checkpoint(model, fresh_params(model), path)
