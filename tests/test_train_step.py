"""The jitted train step on its own: decay mask, EMA, accumulation, mixing, distillation, fp16."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import chex
import flax
import jax
import numpy as np
import optax
import pytest
from conftest import xla_flags

from configs.common import base_config
from stam_jax import create_model
from stam_jax.losses import LossScale, distillation_loss, soft_cross_entropy
from stam_jax.train import _teacher_model
from stam_jax.train_step import (
    TrainConfigError,
    decay_mask,
    initial_state,
    make_optimizer,
    make_train_step,
)

ROOT = Path(__file__).resolve().parent.parent
NO_DROPOUT = dict(temporal_dropout_rate=0.0, drop_path_rate=0.0)


@functools.cache
def _jitted_init():
    return jax.jit(create_model("stam_tiny", **NO_DROPOUT).init)  # compiled once per process


@functools.cache
def initial_params(seed: int = 1) -> dict:
    """The tiny model's params (float32 whatever the compute dtype), made once per seed."""
    return _jitted_init()(jax.random.key(seed), np.zeros((1, 4, 32, 32, 3), np.uint8))["params"]


@functools.cache
def _forward():
    """The tiny model's forward (no dropout), jitted: the logits the step's losses come from."""
    return jax.jit(create_model("stam_tiny", **NO_DROPOUT).apply)


def _as_transformation(tx):
    """`make_optimizer`'s MultiSteps as a plain GradientTransformation (the same optimizer)."""
    assert isinstance(tx, optax.MultiSteps)
    return tx.gradient_transformation()


_STEPS: dict = {}  # jitted steps by settings: tests of the same settings compile once


def step_setup(batch=4, dtype="float32", seed=0, teacher=None, wrap=None, **train):
    config = base_config("stam_tiny")
    config.train.update(train)
    model = create_model("stam_tiny", dtype=dtype, **NO_DROPOUT)
    rng = np.random.default_rng(seed)
    videos = rng.integers(0, 256, (batch, 4, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    params = initial_params()
    tx, schedule = make_optimizer(config.train, params)
    if wrap is not None:  # an optimizer of one's own built around the library's
        tx = wrap(tx)
    state = initial_state(model, tx, config.train, params)
    key = (dtype, id(teacher), wrap, tuple(sorted(train.items())))
    if key not in _STEPS:
        _STEPS[key] = jax.jit(make_train_step(model, tx, schedule, config.train, 0, 10, teacher))
    return _STEPS[key], state, videos, labels, np.ones(batch, np.float32)


# A 3-step cosine run: warm-up from 0, the peak, then half of it. Compiled and run once for
# the accumulation, EMA, failed-video, mixing and 8-device tests.
BIG = dict(
    batch=8, learning_rate=1e-2, label_smoothing=0.1, ema_decay=0.75, steps=3, warmup_steps=1
)


@functools.cache
def big_run():
    """`BIG`'s step, its states 0 to 3 on one batch, each step's metrics and the batch."""
    step, state, videos, labels, weights = step_setup(**BIG)
    states, metrics = [state], []
    for _ in range(3):
        state, step_metrics = step(state, videos, labels, weights)
        states.append(state)
        metrics.append(step_metrics)
    return step, states, metrics, (videos, labels, weights)


def max_diff(a, b) -> float:
    return max(
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_weight_decay_mask_spares_biases_norms_and_tokens():
    flat = flax.traverse_util.flatten_dict(decay_mask(initial_params()), sep="/")
    assert flat["blocks_0/attn/qkv/kernel"] and flat["head/kernel"]
    assert flat["patch_embed/proj/kernel"]
    for name in ("head/bias", "blocks_0/norm1/scale", "norm/bias", "pos_embed", "cls_token"):
        assert not flat[name], name
    assert not flat["aggregate/pos_embed"] and not flat["aggregate/cls_token"]


def test_weight_decay_mask_refuses_what_is_not_a_params_tree():
    # flax's flatten_dict failed with a bare AssertionError ("expected (frozen)dict").
    for wrong in ([np.zeros((2, 2))], np.zeros((2, 2)), None):
        with pytest.raises(TypeError, match=r"decay_mask takes the params tree, a nested dict; "):
            decay_mask(wrong)


def test_loss_falls_on_a_learnable_task():
    # 16 fixed videos with labels by mean brightness: a task the step can fit in 40 steps.
    step, state, videos, _, weights = step_setup(batch=16, learning_rate=3e-3, warmup_steps=5)
    labels = (videos.mean(axis=(1, 2, 3, 4)) > 127.5).astype(np.int32)
    losses = []
    for _ in range(40):
        state, metrics = step(state, videos, labels, weights)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_ema_follows_the_params():
    # From step 1: at step 0 the learning rate is 0, the params did not move, and the EMA
    # (which starts at the params) equalled them whatever its rule.
    _, states, metrics, _ = big_run()
    state, new = states[1], states[2]
    assert float(metrics[1]["learning_rate"]) == pytest.approx(1e-2)
    assert max_diff(new.params, state.params) > 1e-3
    d = BIG["ema_decay"]  # not 0.5, where decay and 1 - decay are one
    # Within float32's rounding of the two terms and their sum, however XLA orders or fuses them
    # (jax 0.7 differs from float64 by up to 4 units in the last place of a small result).
    leaves = [jax.tree.leaves(t) for t in (new.ema_params, state.ema_params, new.params)]
    for got, e, p in zip(*leaves, strict=True):
        e, p = np.float64(e), np.float64(p)
        bound = 2 * np.finfo(np.float32).eps * (d * np.abs(e) + (1 - d) * np.abs(p))
        assert np.all(np.abs(got - (d * e + (1 - d) * p)) <= bound)


def test_a_batch_of_failed_videos_changes_nothing_but_the_step():
    # Every video failed (weight 0): no gradient, and weight decay alone must not move params.
    # The optimizer state stays as it was but for the schedule's count, which moves on with
    # the steps (test_a_skipped_step_moves_the_learning_rate_schedule_on).
    from stam_jax.train_step import _schedules_stepped

    step, states, _, (videos, labels, weights) = big_run()
    state, weights = states[1], weights.copy()  # past step 0, whose learning rate is 0
    new, metrics = step(state, videos, labels, np.zeros_like(weights))
    assert int(new.step) == 2 and float(metrics["videos"]) == 0.0
    chex.assert_trees_all_equal(
        (new.params, new.opt_state, new.ema_params),
        (state.params, _schedules_stepped(state.opt_state, state.opt_state), state.ema_params),
    )
    # One usable video is a real step.
    weights[1:] = 0.0
    moved, metrics = step(state, videos, labels, weights)
    assert float(metrics["videos"]) == 1.0
    assert not np.array_equal(moved.params["head"]["kernel"], state.params["head"]["kernel"])


def test_loss_and_accuracy_are_means_over_the_usable_videos():
    # Per video: the cross-entropy against targets smoothed by BIG's 0.1, and whether the
    # argmax is the label (half of the labels are, here); a failed video (weight 0) is in
    # neither mean, nor in the count they are divided by.
    step, states, _, (videos, _, weights) = big_run()
    logits = np.asarray(_forward()({"params": states[0].params}, videos))
    predicted = np.argmax(logits, axis=-1)
    labels = np.where(np.arange(8) % 2 == 0, predicted, (predicted + 1) % 10).astype(np.int32)
    losses = np.asarray(
        soft_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1))
    )
    correct = (predicted == labels).astype(np.float32)
    for w in (weights, np.array([1, 0, 1, 1, 0, 0, 1, 1], np.float32)):
        _, got = step(states[0], videos, labels, w)
        assert float(got["loss"]) == pytest.approx(np.sum(w * losses) / w.sum(), rel=1e-5)
        assert float(got["accuracy"]) == pytest.approx(np.sum(w * correct) / w.sum())
        assert float(got["videos"]) == w.sum()


def test_the_learning_rate_starts_at_zero_with_a_warm_up_and_at_the_full_rate_without():
    config = base_config("stam_tiny").train
    config.update(learning_rate=1e-3, steps=100, warmup_steps=10)
    _, schedule = make_optimizer(config, initial_params())
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3)
    config.warmup_steps = 0
    _, schedule = make_optimizer(config, initial_params())
    assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(100)) == 0.0


def test_the_optimizer_decays_the_masked_params_with_momentum_and_clips_first():
    # Zero gradients: AdamW's update is its weight decay alone, -lr * wd * p, on the matrix
    # only; SGD's too, then with momentum 0.9 the second is 1.9 times it. Clipping scales the
    # gradients to norm 1 before the optimizer (after it, SGD's update, of norm 0.19, was kept).
    params = {
        "dense": {"kernel": np.full((2, 3), 2.0, np.float32), "bias": np.ones(3, np.float32)},
        "pos_embed": np.ones((1, 2, 3), np.float32),
    }
    zeros = jax.tree.map(np.zeros_like, params)
    train = base_config("stam_tiny").train
    train.update(learning_rate=0.1, warmup_steps=0, steps=10**6, weight_decay=0.5, grad_clip=0.0)

    def updates(grads, n=1):
        tx, _ = make_optimizer(train, params)
        state, steps = tx.init(params), []
        for _ in range(n):
            update, state = tx.update(grads, state, params)
            steps.append(update)
        return steps

    decayed = {
        "dense": {"kernel": -0.1 * 0.5 * params["dense"]["kernel"], "bias": zeros["dense"]["bias"]},
        "pos_embed": zeros["pos_embed"],
    }
    chex.assert_trees_all_close(updates(zeros)[0], decayed, rtol=1e-6)
    train.update(optimizer="sgd", momentum=0.9)
    first, second = updates(zeros, 2)
    chex.assert_trees_all_close(first, decayed, rtol=1e-6)
    chex.assert_trees_all_close(second, jax.tree.map(lambda u: 1.9 * u, decayed), rtol=1e-6)
    train.update(weight_decay=0.0, momentum=0.0, grad_clip=1.0)
    grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
    norm = float(optax.global_norm(grads))  # 0.5 * sqrt(15): SGD's update has norm 0.19
    chex.assert_trees_all_close(
        updates(grads)[0], jax.tree.map(lambda g: -0.1 * g / norm, grads), rtol=1e-6
    )


def test_accumulating_k_micro_batches_equals_one_big_batch():
    # train.steps and warmup_steps count batches: 6 half batches with accumulate=2 are 3
    # optimizer updates, at the rates of 3 full batches (0 in the warm-up, the peak, then half
    # of it in the cosine decay), so both runs make the same updates, and the same EMA steps.
    _, states, _, (videos, labels, weights) = big_run()  # 3 steps of the full batch of 8
    big_state = states[3]
    settings = {k: BIG[k] for k in ("learning_rate", "label_smoothing", "ema_decay")}
    # The accumulating optimizer as a plain GradientTransformation, not a MultiSteps object:
    # the step reads the accumulation off the optimizer state (tested on the object's type,
    # the EMA was stepped on every batch: twice per update here).
    small, state, _, _, _ = step_setup(
        batch=8, accumulate=2, steps=6, warmup_steps=2, wrap=_as_transformation, **settings
    )
    start = state
    rates = []
    for half in (slice(0, 4), slice(4, 8)) * 3:
        state, metrics = small(state, videos[half], labels[half], weights[half])
        rates.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(rates, [0, 0, 1e-2, 1e-2, 5e-3, 5e-3], rtol=1e-6)
    # Adam divides by the gradients' own scale, which lifts float rounding in the summed
    # gradients to about 3e-4 of the learning rate here (summing the two halves in the other
    # order moves params by 2e-6); feeding one half twice instead moves every leaf by 2e-2.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-3 * 1e-2),
        (big_state.params, big_state.ema_params),  # the EMA too: once per update, as the params
        (state.params, state.ema_params),
    )
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state.params, start.params)
    assert all(jax.tree.leaves(moved))  # the comparison is not between unchanged params


def test_mixup_and_cutmix_change_the_step_and_stay_finite():
    # One compiled step with both on: Mixup or CutMix is drawn at each step (both occur:
    # test_augment); the plain step is `big_run`'s (compiled once for the module).
    _, states, metrics, (videos, labels, weights) = big_run()
    state, base = states[0], metrics[0]
    mixed = step_setup(**BIG, mixup_alpha=0.8, cutmix_alpha=1.0)[0]
    for step in range(3):
        _, metrics = mixed(state.replace(step=step), videos, labels, weights)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != float(base["loss"])


def test_a_skipped_step_moves_the_learning_rate_schedule_on():
    # A batch whose videos all failed (or float16 gradients that overflowed) kept the whole
    # optimizer state, its schedule's count too: every later update took the rate of one
    # step earlier than the one logged (here 0, the warm-up's start, instead of the peak).
    from stam_jax.train_step import _schedules_stepped

    step, states, _, (videos, labels, weights) = big_run()
    start = states[0]
    skipped, _ = step(start, videos, labels, np.zeros_like(weights))
    chex.assert_trees_all_equal(skipped.params, start.params)
    after, metrics = step(skipped, videos, labels, weights)
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)  # BIG's peak, at step 1
    ahead = start.replace(step=1, opt_state=_schedules_stepped(start.opt_state, start.opt_state))
    expected, _ = step(ahead, videos, labels, weights)
    chex.assert_trees_all_equal(after.params, expected.params)
    assert max_diff(after.params, start.params) > 1e-3  # the peak rate's update, not 0's

    def count(kind):
        found = jax.tree.leaves(after.opt_state, is_leaf=lambda x: isinstance(x, kind))
        return [int(x.count) for x in found if isinstance(x, kind)]

    # The schedule counts the loop's steps, Adam its updates (its bias correction).
    assert count(optax.ScaleByScheduleState) == [2] and count(optax.ScaleByAdamState) == [1]


def test_a_skipped_step_moves_an_injected_schedule_on_too():
    # optax.inject_hyperparams (a schedule of one's own, whose rate can be logged) kept its
    # count over a skipped step, as ScaleByScheduleState did. After a skip, the update is the
    # one a schedule a step ahead makes without a skip: the rate of step 1, Adam's first update.
    config = base_config("stam_tiny")
    config.train.update(BIG)
    model = create_model("stam_tiny", **NO_DROPOUT)
    schedule = optax.linear_schedule(1e-3, 1e-1, transition_steps=4)
    _, _, _, (videos, labels, weights) = big_run()

    def run(rate, skip):
        tx = optax.inject_hyperparams(optax.adamw)(learning_rate=rate, weight_decay=0.05)
        state = initial_state(model, tx, config.train, initial_params())
        step = jax.jit(make_train_step(model, tx, schedule, config.train, 0, 10))
        if skip:
            state, _ = step(state, videos, labels, np.zeros_like(weights))
        return step(state, videos, labels, weights)[0]

    after_skip = run(schedule, skip=True)
    ahead = run(lambda count: schedule(count + 1), skip=False)
    chex.assert_trees_all_close(after_skip.params, ahead.params, rtol=1e-6, atol=1e-7)
    assert float(after_skip.opt_state.hyperparams["learning_rate"]) == pytest.approx(
        float(schedule(1))
    )
    # Not the update at the first step's rate, which a kept count would give.
    behind = run(schedule, skip=False)
    assert max_diff(after_skip.params, behind.params) > 1e-3


def test_a_failed_video_is_mixed_into_no_other_video():
    # A failed video's row (weight 0, zeros and label 0 in the loop) was Mixup/CutMix's partner
    # of another video, whose loss then changed with that row's pixels and label.
    _, _, _, (videos, labels, weights) = big_run()
    state = big_run()[1][0]
    mixed = step_setup(**BIG, mixup_alpha=0.8, cutmix_alpha=1.0)[0]
    weights = weights.copy()
    weights[-1] = 0.0
    black, white = videos.copy(), videos.copy()
    black[-1], white[-1] = 0, 255
    other_labels = labels.copy()
    other_labels[-1] = (labels[-1] + 3) % 10
    for step in range(4):  # Mixup or CutMix, drawn per step
        at = state.replace(step=step)
        a, first = mixed(at, black, labels, weights)
        b, second = mixed(at, white, other_labels, weights)
        assert float(first["loss"]) == float(second["loss"]), step
        chex.assert_trees_all_equal(a.params, b.params)


def test_distillation_from_an_identical_teacher_adds_nothing():
    # With Mixup on: the teacher sees the mixed clips the student sees, or it would differ.
    teacher = create_model("stam_tiny", **NO_DROPOUT)
    step, state, videos, labels, weights = step_setup(
        teacher=teacher, distill_weight=1.0, distill_temperature=2.0, mixup_alpha=0.8
    )
    _, same = step(state, videos, labels, weights, state.params)
    assert abs(float(same["loss"])) < 1e-5 and float(same["grad_norm"]) < 1e-4
    other = initial_params(seed=7)  # the teacher's architecture, other weights
    _, differ = step(state, videos, labels, weights, other)
    assert float(differ["loss"]) > 1e-3 and float(differ["grad_norm"]) > 1e-4
    # A batch equal to its reverse, which mixing leaves as it is: the loss is the mean of
    # T^2 KL(teacher_T || student_T) at T = 2 over the videos.
    videos, labels = np.concatenate([videos[:2], videos[1::-1]]), labels[[0, 1, 1, 0]]
    _, differ = step(state, videos, labels, weights, other)
    student, teacher_logits = (_forward()({"params": p}, videos) for p in (state.params, other))
    want = np.mean(distillation_loss(student, teacher_logits, 2.0))
    assert float(differ["loss"]) == pytest.approx(float(want), rel=1e-4)


def test_distillation_settings_are_checked_without_a_teacher_too():
    # README: every train.* number is checked before anything runs (run_config.json records
    # them all); a distill_weight of 1.5 or a temperature of 0 passed while no teacher was set.
    from stam_jax.train_step import check_train_config

    for field, value, rule in (
        ("distill_weight", 1.5, r"must be in \[0, 1\]"),
        ("distill_temperature", 0.0, "must be > 0"),
    ):
        train = base_config("stam_tiny").train
        train[field] = value
        assert not train.teacher
        with pytest.raises(TrainConfigError, match=rf"train.{field}={value}: {rule}"):
            check_train_config(train)
    check_train_config(base_config("stam_tiny").train)  # the defaults pass


def test_float16_loss_scaling_skips_overflowing_steps():
    step, state, videos, labels, weights = step_setup(
        dtype="float16", loss_scale_initial=2.0**32, loss_scale_period=2
    )
    new, metrics = step(state, videos, labels, weights)
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == 1
    assert float(new.loss_scale.scale) == 2.0**31 and float(metrics["loss_scale"]) == 2.0**32
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    # The scale is part of the state, so the same compiled step runs from a small one.
    state = state.replace(loss_scale=LossScale.create(2.0**8))
    new = state
    for _ in range(2):  # the first step's learning rate is 0 (warm-up starts at 0)
        new, metrics = step(new, videos, labels, weights)
        assert float(metrics["skipped"]) == 0.0
    # train.loss_scale_period=2 good steps double the scale.
    assert int(new.loss_scale.good_steps) == 0 and float(new.loss_scale.scale) == 2.0**9
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new.params, state.params)
    assert all(jax.tree.leaves(changed))
    # The loss and gradients are the unscaled ones, whatever the scale: the same at 2^8 and 2^12.
    _, at_8 = step(state, videos, labels, weights)
    _, at_12 = step(state.replace(loss_scale=LossScale.create(2.0**12)), videos, labels, weights)
    assert 1 < float(at_8["loss"]) < 4  # about ln(10), the tiny model's at its start
    for name in ("loss", "grad_norm"):
        assert float(at_12[name]) == pytest.approx(float(at_8[name]), rel=1e-2), name


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_params_are_refused_for_training(half):
    # bfloat16 params lost every update below half a rounding step (the LayerNorm scales, at
    # 1.0, never moved at lr 1e-4, nor the EMA's 0.1% steps); float16 Adam's eps of 1e-8 is 0
    # in float16, making NaN params at the first step.
    config = base_config("stam_tiny")
    model = create_model("stam_tiny", dtype=half, param_dtype=half)
    tx, _ = make_optimizer(config.train, initial_params())
    with pytest.raises(TrainConfigError, match=rf"param_dtype='{half}': training keeps float32"):
        initial_state(model, tx, config.train, initial_params())
    # float32 params computed in half precision: the state stays float32 throughout.
    model = create_model("stam_tiny", dtype=half)
    state = jax.eval_shape(lambda p: initial_state(model, tx, config.train, p), initial_params())
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))}
    assert dtypes <= {np.dtype(np.float32), np.dtype(np.int32)}, dtypes


def test_mixing_takes_the_videos_the_model_takes():
    # With Mixup on, float videos failed inside the uint8 scaling ('indices must have an
    # integer type'), and int32 ones, which the model refuses, were taken as pixel indices.
    step, state, videos, labels, weights = step_setup(mixup_alpha=0.8)
    jax.eval_shape(step, state, (videos / 255).astype(np.float16), labels, weights)  # traced
    with pytest.raises(ValueError, match="videos have dtype int32; pass uint8 in"):
        jax.eval_shape(step, state, videos.astype(np.int32), labels, weights)


def test_teacher_must_see_what_the_student_sees(tmp_path):
    from stam_jax import checkpoints

    teacher = create_model("stam_tiny", num_frames=8)
    shapes = jax.eval_shape(teacher.init, jax.random.key(0), np.zeros((1, 8, 32, 32, 3), np.uint8))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes["params"])  # values unused
    checkpoints.save(tmp_path / "teacher", teacher, params)
    config = base_config("stam_tiny")
    config.train.teacher = str(tmp_path / "teacher")
    with pytest.raises(TrainConfigError, match="has num_frames=8, the student 4"):
        _teacher_model(config, create_model("stam_tiny"))
    config.train.teacher = str(tmp_path / "missing")
    with pytest.raises(TrainConfigError, match=r"--config\.train\.teacher="):
        _teacher_model(config, create_model("stam_tiny"))


EIGHT_DEVICES = """
import sys
import flax, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import test_train_step as t
saved = flax.serialization.msgpack_restore(open(sys.argv[1], "rb").read())
t.initial_params = lambda seed=1: saved["params"]  # the parent's: no init to compile here
step, state, videos, labels, weights = t.step_setup(**t.BIG)
state = flax.serialization.from_state_dict(state, saved["state"])
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
batch = [jax.device_put(x, bat) for x in (videos, labels, weights)]
new, _ = step(jax.device_put(state, rep), *batch)
got = flax.serialization.to_state_dict(jax.device_get(new))
print("devices", len(mesh.devices), "max_diff", t.max_diff(got, saved["want"]))
"""


def test_eight_simulated_devices_match_one(tmp_path):
    # The batch of 8 split over 8 devices, one video each, makes the update that one device
    # makes (`big_run`'s step from state 1, at the peak rate: the step from state 0, at rate 0,
    # left the params as they were on any number of devices).
    _, states, _, _ = big_run()
    assert max_diff(states[2].params, states[1].params) > 1e-3
    saved = {
        "params": initial_params(),
        "state": flax.serialization.to_state_dict(states[1]),
        "want": flax.serialization.to_state_dict(states[2]),
    }
    (tmp_path / "states.msgpack").write_bytes(flax.serialization.msgpack_serialize(saved))
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'tests'}"
    result = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "states.msgpack")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1].split()
    assert line[1] == "8" and float(line[3]) < 1e-5, line


def test_the_schedule_may_be_a_constant_rate():
    # The schedule only feeds the learning_rate metric; a float was 'not callable' at trace time.
    _, state, *batch = step_setup()  # the state of make_optimizer's optimizer, shared
    config = base_config("stam_tiny")
    model = create_model("stam_tiny", **NO_DROPOUT)
    tx, _ = make_optimizer(config.train, initial_params())
    constant = make_train_step(model, tx, 0.25, config.train, 0, 10)
    metrics = jax.eval_shape(constant, state, *batch)[1]  # traced, not compiled
    assert metrics["learning_rate"].shape == ()
    with pytest.raises(TypeError, match=r"schedule='1e-3': pass the learning-rate schedule"):
        make_train_step(model, tx, "1e-3", config.train, 0, 10)


def _split_frozen(tree, frozen):
    flat = flax.traverse_util.flatten_dict(tree)
    return (
        {k: v for k, v in flat.items() if k in frozen},
        {k: v for k, v in flat.items() if k not in frozen},
    )


def test_a_frozen_vit_gets_no_update_no_optimizer_state_and_no_backward():
    from stam_jax.train_step import frozen_paths

    plain = dict(grad_clip=0.0, steps=10, warmup_steps=0, learning_rate=1e-2)
    config = base_config("stam_tiny").train
    config.update(freeze="vit", **plain)
    frozen = frozen_paths(config, initial_params())
    assert {path[0] for path in frozen} == {
        "patch_embed",
        "cls_token",
        "pos_embed",
        "blocks_0",
        "blocks_1",
        "norm",
    }
    steps, states = {}, {}
    for freeze in ("vit", ""):
        steps[freeze], state, *batch = step_setup(freeze=freeze, **plain)
        states[freeze] = (state, steps[freeze](state, *batch)[0])
    (start, after), (_, unfrozen) = states["vit"], states[""]
    held, trained = _split_frozen(after.params, frozen)
    # Bit for bit where they were, and their EMA with them.
    chex.assert_trees_all_equal(held, _split_frozen(start.params, frozen)[0])
    chex.assert_trees_all_equal(_split_frozen(after.ema_params, frozen)[0], held)
    # The trained params take the step they take without freezing (their gradients are the
    # same; AdamW's first step is about lr * sign(gradient) each, plus weight decay).
    before = _split_frozen(start.params, frozen)[1]
    moved = {k: trained[k] - before[k] for k in trained}
    reference = {k: v - before[k] for k, v in _split_frozen(unfrozen.params, frozen)[1].items()}
    assert max(float(np.abs(moved[k]).max()) for k in moved) > 5e-3  # they moved
    chex.assert_trees_all_close(moved, reference, atol=1e-6)
    # AdamW holds two moments per trained param and nothing for the frozen ones.
    moments = sum(x.size for x in jax.tree.leaves(start.opt_state) if x.ndim)
    assert moments == 2 * sum(x.size for x in trained.values())
    # No backward pass through the frozen ViT: the step costs about one forward, where the
    # whole model's step costs three.
    model = create_model("stam_tiny", **NO_DROPOUT)
    videos, labels, weights = batch
    forward = jax.jit(model.apply).lower({"params": start.params}, videos).cost_analysis()
    ratio = {}
    for freeze in ("vit", ""):
        lowered = steps[freeze].lower(states[freeze][0], videos, labels, weights)
        ratio[freeze] = lowered.cost_analysis()["flops"] / forward["flops"]
    assert 1 < ratio["vit"] < 1.4 and 2.5 < ratio[""] < 3.5, ratio  # measured: 1.17, 2.79


def test_frozen_params_stay_under_an_optimizer_of_one_s_own():
    # An optimizer that decays every param (it knows nothing of train.freeze) still leaves the
    # frozen ones where they were, and the others move. (Accumulation with frozen params, and
    # their resume: test_train.py::test_a_run_with_a_frozen_vit_resumes_exactly_and_keeps_the_vit.)
    from stam_jax.train_step import frozen_paths

    settings = dict(freeze="blocks_0,head", steps=10, warmup_steps=0, learning_rate=1e-2)
    frozen = frozen_paths(_train(settings), initial_params())
    own = optax.adamw(1e-2, weight_decay=0.5)  # decays everything, frozen params included
    step, state, *batch = step_setup(wrap=lambda tx: own, **settings)
    after = step(state, *batch)[0]
    held, trained = _split_frozen(after.params, frozen)
    chex.assert_trees_all_equal(held, _split_frozen(state.params, frozen)[0])
    before = _split_frozen(state.params, frozen)[1]
    assert all(not np.array_equal(value, before[path]) for path, value in trained.items())


def _train(settings):
    train = base_config("stam_tiny").train
    train.update(settings)
    return train


def test_layer_decay_scales_each_vit_layer_s_updates():
    # SGD without momentum or decay: the update is -lr * gradient, times the layer's factor
    # (powers of 2 here, so exactly). stam_tiny has 2 blocks: block 1 at 0.5, block 0 at 0.25,
    # the embeddings at 0.125; the ViT's final norm, the temporal transformer and the head at 1.
    params = initial_params()
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    plain = dict(
        optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0, warmup_steps=0, steps=10
    )
    updates = {}
    for decay in (1.0, 0.5):
        tx, _ = make_optimizer(_train({**plain, "layer_decay": decay}), params)
        updates[decay] = flax.traverse_util.flatten_dict(
            tx.update(grads, tx.init(params), params)[0], sep="/"
        )
    factor = {"blocks_1": 0.5, "blocks_0": 0.25, "patch_embed": 0.125}
    factor |= {"cls_token": 0.125, "pos_embed": 0.125}
    for path, update in updates[0.5].items():
        expected = updates[1.0][path] * factor.get(path.split("/")[0], 1.0)
        np.testing.assert_array_equal(update, expected, err_msg=path)
    assert float(np.abs(updates[1.0]["head/kernel"]).max()) > 0


def test_freeze_and_layer_decay_are_refused_naming_the_fix():
    from stam_jax.train_step import check_train_config, frozen_paths

    params = initial_params()
    with pytest.raises(TrainConfigError) as refused:
        frozen_paths(_train({"freeze": "vit, blocks_9"}), params)
    assert str(refused.value) == (
        "train.freeze='vit, blocks_9': 'blocks_9' matches no param of this model; use 'vit' or "
        "'temporal', or patterns over param paths such as 'blocks_[0-5]' or 'blocks_*/attn' "
        "(its top-level params: aggregate, blocks_0, blocks_1, cls_token, head, norm, "
        "patch_embed, pos_embed); fix --config.train.freeze."
    )
    with pytest.raises(TrainConfigError, match=r"freezes every param of the model: nothing "):
        frozen_paths(_train({"freeze": "vit,temporal,head"}), params)
    for value in (0.0, 1.5, -0.75):
        with pytest.raises(
            TrainConfigError, match=rf"^train.layer_decay={value}: must be in \(0, 1\] \(1: off"
        ):
            check_train_config(_train({"layer_decay": value}))
    train = base_config("stam_tiny").train
    train.freeze = None  # ml_collections allows None in a str field
    with pytest.raises(TrainConfigError, match=r"^train.freeze=None: give names or patterns "):
        check_train_config(train)
    # Patterns by path: a whole block, a part of every block, a leading part of a path only.
    assert {p[:2] for p in frozen_paths(_train({"freeze": "blocks_*/attn"}), params)} == {
        ("blocks_0", "attn"),
        ("blocks_1", "attn"),
    }
    assert frozen_paths(_train({"freeze": "head"}), params) == {
        ("head", "bias"),
        ("head", "kernel"),
    }
    with pytest.raises(TrainConfigError, match="'head/ker' matches no param"):
        frozen_paths(_train({"freeze": "head/ker"}), params)


def test_a_state_of_ones_own_donates_to_the_step_and_labels_are_checked():
    # initial_state gave the params and their EMA the same buffers (the caller's own): a step
    # jitted with donate_argnums=0, as run_train.py's is, refused to donate a buffer twice.
    config = base_config("stam_tiny")
    model = create_model("stam_tiny", **NO_DROPOUT)
    params = initial_params()
    tx, schedule = make_optimizer(config.train, params)
    state = initial_state(model, tx, config.train, params)
    pointers = [
        {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}
        for tree in (params, state.params, state.ema_params)
    ]
    assert not (pointers[0] & pointers[1] or pointers[1] & pointers[2] or pointers[0] & pointers[2])
    step = jax.jit(make_train_step(model, tx, schedule, config.train, 0, 10), donate_argnums=0)
    _, _, videos, labels, weights = step_setup()
    state, metrics = step(state, videos, labels, weights)
    assert np.isfinite(float(metrics["loss"]))
    # A label outside the classes one-hot encoded to zeros: a quiet step on the smoothing
    # alone. Now the loss is NaN; a failed video's row (weight 0) may hold any label.
    bad = labels.copy()
    bad[0] = 12
    state, metrics = step(state, videos, bad, weights)  # each step donates the state given
    assert np.isnan(float(metrics["loss"]))
    weights = weights.copy()
    weights[0] = 0.0
    _, metrics = step(state, videos, bad, weights)
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match=r"num_classes=5, but the model has 10 outputs; pass"):
        make_train_step(model, tx, schedule, config.train, 0, 5)
