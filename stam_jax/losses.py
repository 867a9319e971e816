"""Training losses and dynamic loss scaling, as pure jit-compatible functions.

* `soft_cross_entropy`: cross-entropy against soft targets (Mixup/CutMix, label smoothing).
* `distillation_loss`: Hinton's knowledge distillation, `T**2 * KL(teacher || student)`.
* `LossScale` with `scale_loss`, `unscale`, `all_finite` and `adjust`: dynamic loss scaling for
  float16 training. The state is a pytree of two scalars, so it lives in the train state and is
  checkpointed with it.

Losses are computed in float32 whatever the logits' dtype (bfloat16, float16) and are returned
per example, `(B,)`, for the caller to weight and reduce.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

__all__ = [
    "LossScale",
    "adjust",
    "all_finite",
    "distillation_loss",
    "scale_loss",
    "soft_cross_entropy",
    "unscale",
]


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy of logits against soft targets, in float32.

    Args:
        logits: `(B, K)` logits of any float dtype (any leading axes: `(..., K)`).
        targets: target distributions (rows summing to 1), of the logits' shape.

    Returns:
        `(B,)` float32 losses `-sum_k targets * log_softmax(logits)` (the logits' leading
        axes, `(...)`, for more than one).

    Raises:
        ValueError: `targets` not of the logits' shape, e.g. integer labels `(B,)`, which would
            broadcast against `(B, K)` logits when B == K and give wrong losses.
    """
    if jnp.shape(targets) != jnp.shape(logits) or jnp.ndim(logits) < 1:
        k = jnp.shape(logits)[-1] if jnp.ndim(logits) else "K"
        raise ValueError(
            f"soft_cross_entropy: targets of shape {tuple(jnp.shape(targets))} do not match "
            f"logits of shape {tuple(jnp.shape(logits))}; targets are distributions over the "
            f"logits' last axis, in the logits' shape: for integer labels pass "
            f"jax.nn.one_hot(labels, {k})."
        )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """Hinton's distillation loss per example: `T**2 * KL(softmax(t / T) || softmax(s / T))`.

    The teacher is a constant (`stop_gradient`): gradients flow to the student only. The `T**2`
    factor keeps the gradient's magnitude independent of the temperature.

    Args:
        student_logits: `(B, K)` student logits of any float dtype.
        teacher_logits: `(B, K)` teacher logits of any float dtype.
        temperature: softmax temperature `T > 0`: a Python float, or a scalar array, which may
            be traced (a temperature annealed inside a jitted step; not checked then).

    Returns:
        `(B,)` float32 losses, >= 0, zero where student and teacher logits agree.

    Raises:
        ValueError: `temperature` is not > 0, or the two logits differ in shape (a teacher's
            `(B,)` or `(B, 1)` would broadcast against `(B, K)` and give wrong losses).
    """
    # A traced temperature has no value to check here (comparing it raised a
    # TracerBoolConversionError); the loss itself is computed from it all the same.
    if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if jnp.shape(student_logits) != jnp.shape(teacher_logits) or jnp.ndim(student_logits) < 1:
        raise ValueError(
            f"distillation_loss: teacher logits of shape {tuple(jnp.shape(teacher_logits))} do "
            f"not match student logits of shape {tuple(jnp.shape(student_logits))}; both must be "
            "(B, K) logits over the same K classes, the teacher's unreduced (not its labels or "
            "probabilities of one class)."
        )
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    student = student_logits.astype(jnp.float32) / temperature
    teacher_log_probs = jax.nn.log_softmax(teacher, axis=-1)
    student_log_probs = jax.nn.log_softmax(student, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return (temperature**2) * kl


# The largest starting loss scale taken: float16's gradients overflow long before it, and a
# larger one only adds skipped steps while it halves (above float32's range it was Inf for good).
MAX_LOSS_SCALE = 2.0**32


@flax.struct.dataclass
class LossScale:
    """Dynamic loss-scaling state: a pytree of two scalars.

    Attributes:
        scale: float32 scalar, the factor the loss is multiplied by before differentiation.
        good_steps: int32 scalar, finite steps since the scale last changed.
    """

    scale: jax.Array
    good_steps: jax.Array

    @staticmethod
    def create(initial: float = 2.0**15) -> LossScale:
        """A fresh loss scale.

        Args:
            initial: the starting scale, a Python float in (0, `MAX_LOSS_SCALE`].

        Returns:
            A `LossScale` with `scale = initial` and `good_steps = 0`.

        Raises:
            ValueError: `initial` is not in (0, `MAX_LOSS_SCALE`].
        """
        if not 0 < initial <= MAX_LOSS_SCALE:
            raise ValueError(f"initial loss scale must be in (0, 2^32], got {initial!r}")
        return LossScale(
            scale=jnp.asarray(initial, jnp.float32), good_steps=jnp.asarray(0, jnp.int32)
        )


def scale_loss(ls: LossScale, loss: jax.Array) -> jax.Array:
    """The loss multiplied by the current scale (differentiate this instead of `loss`).

    Args:
        ls: the loss-scale state.
        loss: the loss, usually a scalar.

    Returns:
        `loss * ls.scale` (float32 for a float16 or float32 loss).
    """
    return loss * ls.scale


def unscale(ls: LossScale, grads: Any) -> Any:
    """Gradients of a scaled loss divided by the scale, each cast back to its own dtype.

    Args:
        ls: the loss-scale state used in `scale_loss`.
        grads: a pytree of gradient arrays.

    Returns:
        The pytree `grads / ls.scale`, leaf dtypes unchanged (the division is in float32).
    """
    return jax.tree.map(lambda g: (g.astype(jnp.float32) / ls.scale).astype(g.dtype), grads)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in a pytree is finite (no NaN, no inf).

    Args:
        tree: a pytree of arrays.

    Returns:
        A scalar bool array; True for a tree without leaves.
    """
    finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    if not finite:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(finite))


def adjust(
    ls: LossScale,
    finite: jax.Array,
    *,
    period: int = 2000,
    factor: float = 2.0,
    minimum: float = 1.0,
) -> LossScale:
    """The loss scale after one step whose gradients were (or were not) all finite.

    Finite: `good_steps` counts up; on reaching `period` the scale is multiplied by `factor`
    (unless that would overflow float32) and the count restarts at 0.
    Not finite: the scale is divided by `factor`, but not below `minimum`, and the count restarts.

    Args:
        ls: the current loss-scale state.
        finite: scalar bool, e.g. `all_finite(grads)`; the caller skips the update when False.
        period: finite steps between increases, a static Python int >= 1.
        factor: growth and back-off factor, a static Python float > 1.
        minimum: floor of the scale, a static Python float > 0.

    Returns:
        The new `LossScale`.

    Raises:
        ValueError: a static argument out of range, or `finite` not a scalar.
    """
    if jnp.ndim(finite) != 0:
        # A per-example or per-leaf `finite` would broadcast the scale into an array.
        raise ValueError(
            f"finite must be a scalar bool, e.g. all_finite(grads), got shape "
            f"{tuple(jnp.shape(finite))}"
        )
    if not period >= 1:
        raise ValueError(f"period must be >= 1, got {period!r}")
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    if not minimum > 0:
        raise ValueError(f"minimum must be > 0, got {minimum!r}")
    finite = jnp.asarray(finite, jnp.bool_)
    counted = ls.good_steps + 1
    grown = ls.scale * jnp.float32(factor)
    grow = finite & (counted >= period) & jnp.isfinite(grown)
    backed_off = jnp.maximum(ls.scale / jnp.float32(factor), jnp.float32(minimum))
    scale = jnp.where(finite, jnp.where(grow, grown, ls.scale), backed_off)
    good_steps = jnp.where(finite & (counted < period), counted, 0).astype(jnp.int32)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps)
