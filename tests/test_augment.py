"""Tests of `stam_jax.augment.mix_videos` (Mixup / CutMix on video batches)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stam_jax.augment import mix_videos

B, T, H, W, C = 4, 3, 8, 8, 3


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random videos in [0, 1) and one-hot targets with a distinct class per video."""
    videos = jax.random.uniform(jax.random.key(seed), (B, T, H, W, C), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(B), B, dtype=jnp.float32)
    return videos, targets


@functools.cache
def _mixer(mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5):
    """A jitted `mix_videos` for one static configuration (compiled once per test session)."""
    return jax.jit(
        functools.partial(
            mix_videos,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            switch_prob=switch_prob,
        )
    )


def _lam(targets: np.ndarray) -> np.ndarray:
    """Per-video lambda recovered from mixed one-hot targets (video i has class i)."""
    return np.asarray(targets)[np.arange(B), np.arange(B)]


def _partner_mask(videos: np.ndarray, mixed: np.ndarray) -> np.ndarray | None:
    """Boolean `(B, T, H, W)` mask of pixels copied from the partner, or None if not a CutMix.

    A CutMix output takes every pixel (all channels) exactly from the video or its partner.
    """
    videos, mixed = np.asarray(videos), np.asarray(mixed)
    own = np.all(mixed == videos, axis=-1)
    partner = np.all(mixed == videos[::-1], axis=-1)
    if not np.all(own | partner):
        return None
    return partner


def test_identity_when_both_alphas_are_zero():
    videos, targets = _batch()
    out_videos, out_targets = mix_videos(
        jax.random.key(1), videos, targets, mixup_alpha=0.0, cutmix_alpha=0.0
    )
    assert out_videos is videos and out_targets is targets
    jitted = _mixer(0.0, 0.0)(jax.random.key(1), videos, targets)
    np.testing.assert_array_equal(jitted[0], videos)
    np.testing.assert_array_equal(jitted[1], targets)


def test_mixup_matches_formula_and_targets():
    videos, targets = _batch()
    mix = _mixer(0.8, 0.0)
    lams = []
    for seed in range(3):
        out_videos, out_targets = mix(jax.random.key(seed), videos, targets)
        assert out_videos.shape == videos.shape and out_videos.dtype == videos.dtype
        lam = _lam(out_targets)
        # One lambda for the whole batch.
        np.testing.assert_allclose(lam, lam[0], atol=1e-7)
        lam = float(lam[0])
        assert 0.0 <= lam <= 1.0
        lams.append(lam)
        expected_targets = lam * np.asarray(targets) + (1 - lam) * np.asarray(targets)[::-1]
        np.testing.assert_allclose(out_targets, expected_targets, atol=1e-6)
        np.testing.assert_allclose(np.sum(out_targets, axis=-1), 1.0, atol=1e-6)
        expected = lam * np.asarray(videos) + (1 - lam) * np.asarray(videos)[::-1]
        np.testing.assert_allclose(out_videos, expected, atol=1e-6)
    assert len(set(lams)) == 3  # the key drives lambda


def test_keeps_dtypes():
    videos, targets = _batch()
    # Traced only (eval_shape), so no extra compilation.
    out_videos, out_targets = jax.eval_shape(
        _mixer(0.8, 1.0), jax.random.key(0), videos.astype(jnp.bfloat16), targets
    )
    assert out_videos.shape == videos.shape and out_videos.dtype == jnp.bfloat16
    assert out_targets.shape == targets.shape and out_targets.dtype == jnp.float32


def test_cutmix_same_box_in_every_frame_and_exact_lambda():
    videos, targets = _batch()
    mix = _mixer(0.0, 1.0)
    nonempty = 0
    for seed in range(6):
        out_videos, out_targets = mix(jax.random.key(seed), videos, targets)
        mask = _partner_mask(videos, out_videos)
        assert mask is not None, "CutMix must copy whole pixels from the video or its partner"
        # The same box in every frame of every video.
        for b in range(B):
            for t in range(T):
                np.testing.assert_array_equal(mask[b, t], mask[0, 0])
        box = mask[0, 0]
        # It is a rectangle: the product of its rows and its columns.
        rows, cols = box.any(axis=1), box.any(axis=0)
        np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])
        nonempty += bool(box.any())
        lam = _lam(out_targets)
        np.testing.assert_allclose(lam, lam[0], atol=1e-7)
        lam = float(lam[0])
        assert abs(box.mean() - (1.0 - lam)) <= 1e-6
        expected_targets = lam * np.asarray(targets) + (1 - lam) * np.asarray(targets)[::-1]
        np.testing.assert_allclose(out_targets, expected_targets, atol=1e-6)
        np.testing.assert_allclose(np.sum(out_targets, axis=-1), 1.0, atol=1e-6)
    assert nonempty >= 3


def test_both_modes_occur_when_both_alphas_are_positive():
    videos, targets = _batch()
    mix = _mixer(0.8, 1.0, 0.5)
    modes = set()
    for seed in range(12):
        out_videos, _ = mix(jax.random.key(seed), videos, targets)
        modes.add("cutmix" if _partner_mask(videos, out_videos) is not None else "mixup")
    assert modes == {"cutmix", "mixup"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mixup_alpha=-0.5, cutmix_alpha=0.0), "-0.5"),
        (dict(mixup_alpha=0.0, cutmix_alpha=-2.0), "-2.0"),
        (dict(mixup_alpha=float("nan"), cutmix_alpha=1.0), "nan"),
        (dict(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.5), "1.5"),
    ],
)
def test_bad_config_raises_naming_the_value(kwargs, match):
    videos, targets = _batch()
    with pytest.raises(ValueError, match=re.escape(match)):
        mix_videos(jax.random.key(0), videos, targets, **kwargs)


def test_uint8_videos_are_refused_with_the_conversion_to_use():
    # The message named the dtype only; uint8 is what load_train_clip and the loader make.
    videos, targets = _batch()
    with pytest.raises(ValueError, match=r"got dtype uint8: .* stam_jax\.model\.uint8_to_unit"):
        mix_videos(
            jax.random.key(0), videos.astype(jnp.uint8), targets, mixup_alpha=0.8, cutmix_alpha=0
        )


def test_integer_targets_are_refused():
    # Mixed targets keep the targets' dtype: int one-hot rows came back truncated (all 0 but
    # the rare 1), a silent zero loss.
    videos, targets = _batch()
    with pytest.raises(ValueError, match=r"targets must be floating point, got dtype int32"):
        mix_videos(
            jax.random.key(0), videos, targets.astype(jnp.int32), mixup_alpha=0.8, cutmix_alpha=0.0
        )


@pytest.mark.parametrize(("lam", "side"), [(0.75, 4), (0.0, 8), (1.0, 0)])
def test_cutmix_box_sides_are_the_side_times_sqrt_one_minus_lambda(lam, side):
    # timm's box: sides floor(8 * sqrt(1 - lam)) around a centre uniform over the 8 rows (and
    # columns), cut where it leaves the frame (the drawn lambda is then corrected to the area
    # kept). Every centre occurs in 200 draws, so each possible side does.
    from stam_jax.augment import _box_mask

    keys = jax.random.split(jax.random.key(0), 200)
    boxes = np.asarray(jax.vmap(lambda k: _box_mask(k, jnp.float32(lam), H, W))(keys))
    half = side // 2
    possible = {min(c + half, H) - max(c - half, 0) for c in range(H)}
    assert {int(n) for n in boxes.any(axis=2).sum(axis=1)} == possible
    assert {int(n) for n in boxes.any(axis=1).sum(axis=1)} == possible
    assert boxes.any() == (side > 0)


def test_lambda_is_beta_distributed_and_cutmix_drawn_with_switch_prob():
    # 1000 draws: CutMix in switch_prob of them, Mixup's lambda ~ Beta(mixup_alpha,
    # mixup_alpha) in the others (a uniform lambda, or CutMix's alpha, fail the KS test).
    from scipy import stats

    videos = jax.random.uniform(jax.random.key(0), (2, 1, 4, 4, 1), jnp.float32)
    targets = jnp.eye(2, dtype=jnp.float32)
    mix = functools.partial(mix_videos, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.25)
    keys = jax.random.split(jax.random.key(1), 1000)
    mixed, mixed_targets = jax.jit(jax.vmap(mix, in_axes=(0, None, None)))(keys, videos, targets)
    mixed, lam = np.asarray(mixed), np.asarray(mixed_targets)[:, 0, 0]
    own, partner = np.asarray(videos[0]), np.asarray(videos[1])
    cutmix = np.all((mixed[:, 0] == own) | (mixed[:, 0] == partner), axis=(1, 2, 3, 4))
    assert abs(cutmix.mean() - 0.25) < 0.06, cutmix.mean()
    assert stats.kstest(lam[~cutmix], stats.beta(0.4, 0.4).cdf).pvalue > 1e-3


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.8, 0.0), (0.0, 1.0)])
def test_a_video_whose_partner_is_not_valid_is_left_as_it_is(mixup_alpha, cutmix_alpha):
    # Row 3 is no video (a failed one, weight 0 in a training batch): row 0, its partner, took
    # its black pixels and its label 0 into its own mix, which then trained on both.
    videos, targets = _batch()
    valid = jnp.array([True, True, True, False])
    mix = jax.jit(functools.partial(mix_videos, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha))
    for seed in range(3):
        key = jax.random.key(seed)
        plain_videos, plain_targets = mix(key, videos, targets)
        out_videos, out_targets = mix(key, videos, targets, valid=valid)
        np.testing.assert_array_equal(out_videos[0], videos[0])
        np.testing.assert_array_equal(out_targets[0], targets[0])
        assert not np.array_equal(plain_videos[0], videos[0])  # mixed without `valid`
        # The rows with a valid partner are mixed as before.
        np.testing.assert_array_equal(out_videos[1:], plain_videos[1:])
        np.testing.assert_array_equal(out_targets[1:], plain_targets[1:])
    with pytest.raises(ValueError, match=r"valid must be \(B,\) with B = 4, got shape \(3,\)"):
        mix_videos(
            jax.random.key(0), videos, targets, mixup_alpha=0.8, cutmix_alpha=0, valid=valid[:3]
        )
