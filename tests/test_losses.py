"""Tests of `stam_jax.losses`: soft cross-entropy, distillation and dynamic loss scaling."""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stam_jax.losses import (
    LossScale,
    adjust,
    all_finite,
    distillation_loss,
    scale_loss,
    soft_cross_entropy,
    unscale,
)


def _logits_and_targets(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 2.0 * jax.random.normal(k1, (4, 7), jnp.float32)
    targets = jax.nn.softmax(jax.random.normal(k2, (4, 7), jnp.float32))
    return logits, targets


def test_soft_cross_entropy_matches_optax_float32():
    logits, targets = _logits_and_targets()
    loss = jax.jit(soft_cross_entropy)(logits, targets)
    assert loss.shape == (4,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(logits, targets), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_soft_cross_entropy_low_precision_logits(dtype):
    logits, targets = _logits_and_targets()
    low = logits.astype(dtype)
    loss = jax.jit(soft_cross_entropy)(low, targets)
    assert loss.dtype == jnp.float32
    # Computed in float32 from the low-precision values ...
    exact = optax.softmax_cross_entropy(low.astype(jnp.float32), targets)
    np.testing.assert_allclose(loss, exact, rtol=1e-6)
    # ... and close to the full-precision loss.
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(logits, targets), atol=1e-2)


def test_soft_cross_entropy_refuses_targets_not_of_the_logits_shape():
    # Integer labels (B,) against (B, K) logits with B == K broadcast without error (each
    # example's row scaled by the labels) and give wrong losses: refused, naming the fix.
    logits = jnp.array([[2.0, -1.0], [0.5, 0.3]])
    labels = jnp.array([0, 1])
    with pytest.raises(ValueError) as refused:
        soft_cross_entropy(logits, labels)
    assert str(refused.value) == (
        "soft_cross_entropy: targets of shape (2,) do not match logits of shape (2, 2); "
        "targets are distributions over the logits' last axis, in the logits' shape: for "
        "integer labels pass jax.nn.one_hot(labels, 2)."
    )
    with pytest.raises(ValueError, match=r"targets of shape \(1, 2\) do not match logits of "):
        jax.jit(soft_cross_entropy)(logits, jnp.ones((1, 2)) / 2)  # refused when traced too
    # The fix it names gives the true losses.
    expected = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(soft_cross_entropy(logits, jax.nn.one_hot(labels, 2)), expected)


def _kd_numpy(student: np.ndarray, teacher: np.ndarray, t: float) -> np.ndarray:
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(teacher.astype(np.float64) / t), softmax(student.astype(np.float64) / t)
    return t**2 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def test_distillation_loss():
    student, teacher = _logits_and_targets(1)[0], _logits_and_targets(2)[0]
    kd = jax.jit(distillation_loss, static_argnames="temperature")
    same = kd(teacher, teacher, temperature=4.0)
    assert same.shape == (4,) and same.dtype == jnp.float32
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    loss = kd(student, teacher, temperature=4.0)
    assert np.all(np.asarray(loss) > 0)
    np.testing.assert_allclose(
        loss, _kd_numpy(np.asarray(student), np.asarray(teacher), 4.0), rtol=1e-4
    )
    # bfloat16 logits are promoted to float32.
    low = kd(student.astype(jnp.bfloat16), teacher.astype(jnp.bfloat16), temperature=2.0)
    assert low.dtype == jnp.float32


def test_distillation_gradient_only_reaches_the_student():
    student, teacher = _logits_and_targets(1)[0], _logits_and_targets(2)[0]

    def total(s, t):
        return jnp.sum(distillation_loss(s, t, 3.0))

    grad_s, grad_t = jax.jit(jax.grad(total, argnums=(0, 1)))(student, teacher)
    np.testing.assert_array_equal(grad_t, 0.0)
    assert np.any(np.asarray(grad_s) != 0)


def test_distillation_rejects_bad_temperature():
    logits, _ = _logits_and_targets()
    with pytest.raises(ValueError, match=r"-1\.0"):
        distillation_loss(logits, logits, -1.0)
    # A temperature annealed inside a jitted step is traced: taken as it is, not compared
    # (that raised a TracerBoolConversionError).
    student = _logits_and_targets(1)[0]
    traced = jax.jit(distillation_loss)(student, logits, jnp.float32(2.0))
    np.testing.assert_allclose(traced, distillation_loss(student, logits, 2.0), rtol=1e-6)


@pytest.mark.parametrize("teacher_shape", [(7,), (7, 1), (7, 5)])
def test_distillation_refuses_teacher_logits_not_of_the_students_shape(teacher_shape):
    # (B,) and (B, 1) broadcast against (B, K) student logits (B == K here): silent wrong losses.
    student = jnp.zeros((7, 7))
    with pytest.raises(ValueError, match=rf"teacher logits of shape \({teacher_shape[0]},"):
        distillation_loss(student, jnp.zeros(teacher_shape), 2.0)


def test_loss_scale_create():
    ls = LossScale.create()
    assert ls.scale.dtype == jnp.float32 and float(ls.scale) == 2.0**15
    assert ls.good_steps.dtype == jnp.int32 and int(ls.good_steps) == 0
    with pytest.raises(ValueError, match=r"0\.0"):
        LossScale.create(0.0)
    # 1e39 was Inf in float32, which halving keeps Inf: every float16 step was skipped.
    for too_large in (1e39, 2.0**33):
        with pytest.raises(ValueError, match=r"must be in \(0, 2\^32\], got "):
            LossScale.create(too_large)
    assert float(LossScale.create(2.0**32).scale) == 2.0**32
    # A pytree: it checkpoints like any other state.
    restored = flax.serialization.from_state_dict(
        LossScale.create(1.0), flax.serialization.to_state_dict(LossScale.create(8.0))
    )
    assert float(restored.scale) == 8.0


def test_adjust_sequence():
    step = jax.jit(functools.partial(adjust, period=3, factor=2.0, minimum=1.0))
    ls = LossScale.create(4.0)
    expected = [
        (True, 4.0, 1),
        (True, 4.0, 2),
        (True, 8.0, 0),  # three finite steps double the scale
        (True, 8.0, 1),
        (True, 8.0, 2),
        (False, 4.0, 0),  # non-finite halves it and resets the count
        (True, 4.0, 1),
        (False, 2.0, 0),
        (False, 1.0, 0),
        (False, 1.0, 0),  # never below the minimum
        (True, 1.0, 1),
        (True, 1.0, 2),
        (True, 2.0, 0),
    ]
    for finite, scale, good_steps in expected:
        ls = step(ls, jnp.asarray(finite))
        assert (float(ls.scale), int(ls.good_steps)) == (scale, good_steps)
        assert ls.scale.dtype == jnp.float32 and ls.good_steps.dtype == jnp.int32


def test_adjust_does_not_overflow_and_validates():
    big = LossScale(scale=jnp.asarray(2.0**127, jnp.float32), good_steps=jnp.asarray(0, jnp.int32))
    assert float(adjust(big, jnp.asarray(True), period=1).scale) == 2.0**127
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        adjust(big, jnp.asarray(True), period=0)
    # A per-example `finite` (B,) made the scale a (B,) array.
    with pytest.raises(ValueError, match=r"finite must be a scalar bool.*got shape \(2,\)"):
        adjust(big, jnp.asarray([True, False]))


def test_scale_unscale_round_trip():
    ls = LossScale.create(2.0**10)
    grads = {
        "w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3),
        "b": {"x": jnp.asarray([0.5, -0.25], jnp.bfloat16)},
    }
    scaled = jax.tree.map(lambda g: (g.astype(jnp.float32) * ls.scale).astype(g.dtype), grads)
    back = jax.jit(unscale)(ls, scaled)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(grads), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # The gradient of a scaled loss, unscaled, is the gradient of the loss.
    w = jnp.asarray([1.0, -2.0, 3.0])

    def loss(w):
        return jnp.sum(w**2)

    grad = jax.jit(jax.grad(lambda w, ls: scale_loss(ls, loss(w))))(w, ls)
    np.testing.assert_allclose(grad, ls.scale * 2 * w)
    np.testing.assert_allclose(unscale(ls, grad), 2 * w)


def test_all_finite_nested():
    tree = {"a": jnp.ones((2, 2)), "b": [jnp.zeros(3, jnp.bfloat16), {"c": jnp.asarray(1.0)}]}
    check = jax.jit(all_finite)
    assert bool(check(tree))
    assert check(tree).shape == () and check(tree).dtype == jnp.bool_
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        broken = {**tree, "b": [tree["b"][0].at[1].set(bad), tree["b"][1]]}
        assert not bool(check(broken))
    assert bool(all_finite({}))
