"""One training step: the train state, the optimizer from `config.train`, and the jitted step.

The pieces of `stam_jax.train`'s loop that a loop of one's own reuses: `TrainState`,
`initial_state`, `make_optimizer` (with `decay_mask`), `check_train_config` and
`make_train_step` (Mixup/CutMix, label smoothing, distillation, float16 loss scaling, the EMA).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from stam_jax.augment import mix_videos
from stam_jax.losses import (
    MAX_LOSS_SCALE,
    LossScale,
    adjust,
    all_finite,
    distillation_loss,
    scale_loss,
    soft_cross_entropy,
    unscale,
)
from stam_jax.model import STAM, uint8_to_unit


class TrainConfigError(ValueError):
    """A run refused before any compute; the message names the value and the fix."""


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds; the rest of the run is derived from (seed, step)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    loss_scale: LossScale | None = None  # float16 training only


def loss_scaled(model: STAM) -> bool:
    """float16 compute trains with dynamic loss scaling."""
    return jnp.dtype(model.dtype) == jnp.dtype(jnp.float16)


def check_param_dtype(model: STAM) -> None:
    """Refuses a model whose params are half precision for training, naming the fix.

    Training keeps float32 master params, optimizer state and EMA (`dtype` sets the compute
    precision). In bfloat16 or float16 params, an update below half the rounding step is lost
    (every LayerNorm scale, 1.0 in bfloat16, stayed put at the default rate of 1e-4, and so
    did the EMA's steps of 0.1% of its distance to the params), and float16 Adam divided by its
    epsilon, 1e-8, which is 0 in float16 (NaN params at the first step).

    Raises:
      TrainConfigError: `model.param_dtype` is not float32.
    """
    name = jnp.dtype(model.param_dtype).name
    if name != "float32":
        raise TrainConfigError(
            f"param_dtype={name!r}: training keeps float32 params (with their optimizer "
            f"state and EMA), as updates smaller than a {name} rounding step would be lost; "
            f"build the model with param_dtype='float32' and dtype={name!r} to compute in "
            f"{name} on them (a {name} param_dtype is for evaluation)."
        )


def initial_state(
    model: STAM, tx: optax.GradientTransformation, train: Any, params: Any
) -> TrainState:
    """The state at step 0: float32 params, their EMA, a loss scale for float16 compute.

    The params and the EMA are copies of `params`, each its own buffers: a step jitted with
    `donate_argnums=0` donates them (the same buffer twice was refused), and `params` stays
    the caller's.

    Raises:
      TrainConfigError: a model with half-precision params (`check_param_dtype`).
    """
    check_param_dtype(model)
    params = jax.tree.map(lambda x: jnp.array(x, model.param_dtype, copy=True), params)
    ema = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    scale = LossScale.create(train.loss_scale_initial) if loss_scaled(model) else None
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), ema, scale)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms, tokens.

    Args:
      params: the params tree (`model.init(...)['params']`), a nested dict of arrays.

    Returns:
      A tree of bools of the same structure (optax's `mask=`).

    Raises:
      TypeError: `params` is not a dict (a list of arrays, one array, None).
    """
    if not isinstance(params, Mapping):  # flax's own check is a bare assertion
        raise TypeError(
            f"decay_mask takes the params tree, a nested dict; got a {type(params).__name__}. "
            "Pass model.init(...)['params'] (or the params of checkpoints.load)."
        )
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {
            path: value.ndim >= 2 and path[-1] not in ("pos_embed", "cls_token")
            for path, value in flat.items()
        }
    )


# `train.freeze` names for whole parts of the model (the params' top-level names).
FREEZE_GROUPS = {
    "vit": ("patch_embed", "cls_token", "pos_embed", "blocks_*", "norm"),
    "temporal": ("aggregate",),
}


def frozen_paths(train: Any, params: Any) -> frozenset[tuple[str, ...]]:
    """The params `train.freeze` holds fixed, as flattened paths (`('blocks_0', 'attn', ...)`).

    `train.freeze` is comma-separated: `vit` (the spatial ViT: patch embedding, tokens,
    position embedding, blocks and final norm), `temporal` (the temporal transformer), or
    patterns over '/'-joined param paths in shell style, each matching a param by its whole
    path or a leading part of it (`blocks_0` freezes every param of that block,
    `blocks_[0-5]` the first six blocks, `blocks_*/attn` every attention).

    Args:
      train: the run config's `train` section.
      params: the params tree (arrays, or their shapes: `checkpoints.abstract_params`).

    Returns:
      The frozen paths; empty with `train.freeze` ''.

    Raises:
      TrainConfigError: a name or pattern matching no param, or one freezing every param.
    """
    wanted = [p.strip() for p in str(train.freeze).split(",") if p.strip()]
    if not wanted:
        return frozenset()
    paths = list(flax.traverse_util.flatten_dict(params))
    frozen: set[tuple[str, ...]] = set()
    for name in wanted:
        patterns = FREEZE_GROUPS.get(name, (name,))
        hit = {
            path
            for path in paths
            for pattern in patterns
            if any(
                fnmatch.fnmatchcase("/".join(path[:n]), pattern) for n in range(1, len(path) + 1)
            )
        }
        if not hit:
            tops = sorted({path[0] for path in paths})
            raise TrainConfigError(
                f"train.freeze={train.freeze!r}: {name!r} matches no param of this model; use "
                f"{' or '.join(repr(g) for g in FREEZE_GROUPS)}, or patterns over param paths "
                f"such as 'blocks_[0-5]' or 'blocks_*/attn' (its top-level params: "
                f"{', '.join(tops)}); fix --config.train.freeze."
            )
        frozen |= hit
    if len(frozen) == len(paths):
        raise TrainConfigError(
            f"train.freeze={train.freeze!r} freezes every param of the model: nothing would "
            "train; fix --config.train.freeze."
        )
    return frozenset(frozen)


def frozen_summary(train: Any, params: Any, frozen: frozenset[tuple[str, ...]]) -> str:
    """One line saying what `train.freeze` holds fixed ('' when nothing), for the run's start;
    `frozen` is `frozen_paths(train, params)`."""
    if not frozen:
        return ""
    flat = flax.traverse_util.flatten_dict(params)

    def millions(paths: Any) -> str:
        return f"{sum(math.prod(flat[path].shape) for path in paths) / 1e6:.2f}M"

    parts = sorted(  # blocks_2 before blocks_10
        {path[0] for path in frozen},
        key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)],
    )
    return (
        f"train.freeze={train.freeze!r}: {len(frozen)} of {len(flat)} tensors held fixed "
        f"({millions(frozen)} of {millions(flat)} params), in {', '.join(parts)}"
    )


def layer_scales(train: Any, params: Any) -> Any:
    """Each param's learning-rate factor under `train.layer_decay` = d (1: all 1).

    Layer-wise decay of the spatial ViT, as in BEiT-style fine-tuning: with depth D, block i
    learns at d^(D - i) of the rate, the patch embedding, cls token and position embedding at
    d^(D + 1); the ViT's final norm, the temporal transformer and the head at the full rate.

    Returns:
      A tree of floats of the structure of `params`.
    """
    decay = float(train.layer_decay)
    flat = flax.traverse_util.flatten_dict(params)
    depth = len({path[0] for path in flat if path[0].startswith("blocks_")})

    def scale(top: str) -> float:
        if top.startswith("blocks_"):
            return decay ** (depth - int(top.removeprefix("blocks_")))
        if top in ("patch_embed", "cls_token", "pos_embed"):
            return decay ** (depth + 1)
        return 1.0

    return flax.traverse_util.unflatten_dict({path: scale(path[0]) for path in flat})


def _scale_updates(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its factor in `scales` (a tree of floats like the params);
    leaves another part of `optax.multi_transform` updates (`optax.MaskedNode`) as they are."""

    def masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        scaled = jax.tree.map(
            lambda u, k: u if masked(u) else u * k, updates, scales, is_leaf=masked
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: Any, params: Any) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and its learning-rate schedule, from `config.train`.

    `train.steps` and `train.warmup_steps` count batches (loop steps). With `train.accumulate`
    = k, the optimizer updates once every k batches, at the rate the returned schedule gives
    the first batch of those k, so the warm-up and the cosine decay span the run whatever k is.

    Params that `train.freeze` names (`frozen_paths`) get no update, no weight decay and no
    optimizer state, and do not count in the clipped gradient norm; `train.layer_decay` < 1
    scales each param's updates by `layer_scales`. With neither, the optimizer (and its state)
    is the plain one.

    Returns:
      (optimizer, schedule): `schedule(step)` is the learning rate at batch `step`.

    Raises:
      TrainConfigError: a bad `config.train` value (`check_train_config`, `frozen_paths`).
    """
    check_train_config(train)
    frozen = frozen_paths(train, params)
    if train.warmup_steps > 0:  # from 0 up to the rate over the warm-up, then cosine decay
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, train.learning_rate, train.warmup_steps, max(train.steps, 2)
        )
    else:  # no warm-up: the full rate at the first step
        schedule = optax.cosine_decay_schedule(train.learning_rate, max(train.steps, 1))
    k = train.accumulate
    # Inside MultiSteps the optimizer counts its own updates, one per k batches.
    rate = schedule if k == 1 else (lambda update: schedule(update * k))
    mask = decay_mask(params)
    if train.optimizer == "adamw":
        opt = optax.adamw(rate, weight_decay=train.weight_decay, mask=mask)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(train.weight_decay, mask),
            optax.sgd(rate, momentum=train.momentum),
        )
    if train.layer_decay != 1:
        opt = optax.chain(opt, _scale_updates(layer_scales(train, params)))
    if train.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(train.grad_clip), opt)
    if k > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=k)
    if frozen:  # the optimizer sees the trained params only: its state, decay, clipping, sums
        flat = flax.traverse_util.flatten_dict(params)
        labels = {path: "frozen" if path in frozen else "trained" for path in flat}
        opt = optax.multi_transform(
            {"trained": opt, "frozen": optax.set_to_zero()},
            flax.traverse_util.unflatten_dict(labels),
        )
    return opt, schedule


def check_train_config(train: Any) -> None:
    """Refuses `config.train` values that cannot make a sensible run, naming the flag and fix.

    Raises:
      TrainConfigError: the first bad value found.
    """

    def refuse(field: str, rule: str) -> None:
        raise TrainConfigError(
            f"train.{field}={train[field]!r}: {rule}; fix --config.train.{field}."
        )

    for field in ("steps", "accumulate", "log_every", "save_every", "keep", "loss_scale_period"):
        if not isinstance(train[field], int) or train[field] < 1:
            refuse(field, "must be a whole number >= 1")
    for field in ("warmup_steps", "eval_every"):
        if not isinstance(train[field], int) or train[field] < 0:
            refuse(field, "must be a whole number >= 0 (0: off)")
    if train.warmup_steps >= train.steps:
        refuse(
            "warmup_steps",
            f"the warm-up must end before train.steps={train.steps} (the cosine decay needs "
            "the steps after it)",
        )
    if train.steps % train.accumulate:
        k = train.accumulate
        lower, upper = train.steps // k * k, (train.steps // k + 1) * k
        use = f"{lower} or {upper}" if lower else f"{upper}, or a train.accumulate <= {train.steps}"
        refuse(
            "steps",
            f"not a multiple of train.accumulate={k} (the optimizer updates once every {k} "
            f"batches, so the last {train.steps % k} would be computed for nothing); use {use}",
        )
    for field, value in train.items():
        # inf passes the range checks below, then makes the loss or the params NaN mid-run.
        if isinstance(value, float) and not math.isfinite(value):
            refuse(field, "must be a finite number")
    if train.optimizer not in ("adamw", "sgd"):
        refuse("optimizer", "use 'adamw' or 'sgd'")
    if not train.learning_rate > 0:
        refuse("learning_rate", "must be > 0 (it is the peak rate, after the warm-up)")
    for field in ("weight_decay", "grad_clip", "mixup_alpha", "cutmix_alpha"):
        if not train[field] >= 0:
            refuse(field, "must be >= 0 (0: off)")
    if not isinstance(train.freeze, str):
        refuse("freeze", "give names or patterns separated by commas, e.g. 'vit' ('' : none)")
    if not 0 < train.layer_decay <= 1:
        refuse("layer_decay", "must be in (0, 1] (1: off; 0.75 is common for ViT-B)")
    if not train.temporal_pos_embed_std >= 0:
        refuse("temporal_pos_embed_std", "must be >= 0 (0: the official 0.02 init)")
    for field in ("momentum", "ema_decay", "label_smoothing"):
        if not 0 <= train[field] < 1:
            refuse(field, "must be in [0, 1)")
    if not 0 <= train.mix_switch_prob <= 1:
        refuse("mix_switch_prob", "is a probability, in [0, 1]")
    if not 1 <= train.loss_scale_initial <= MAX_LOSS_SCALE:
        # Above float32's range the scale was Inf, which halving keeps Inf: every step skipped.
        refuse(
            "loss_scale_initial",
            "must be in [1, 2^32] (float16 only; default 2^15: a larger start only adds the "
            "skipped steps that halve it)",
        )
    # Checked with or without a teacher, as every train.* number is (momentum under adamw too):
    # run_config.json records them, and a value that would be refused later is refused now.
    if not 0 <= train.distill_weight <= 1:
        refuse("distill_weight", "must be in [0, 1]")
    if not train.distill_temperature > 0:
        refuse("distill_temperature", "must be > 0")


def _split(params: Any, paths: frozenset[tuple[str, ...]]) -> tuple[Any, dict]:
    """(the params not at `paths`, those at `paths`), both flattened; without `paths`,
    (`params` as they are, {})."""
    if not paths:
        return params, {}
    flat = flax.traverse_util.flatten_dict(params)
    return (
        {path: value for path, value in flat.items() if path not in paths},
        {path: value for path, value in flat.items() if path in paths},
    )


def _joined(trained: Any, fixed: dict) -> Any:
    """The params tree again from `_split`'s two parts."""
    return flax.traverse_util.unflatten_dict({**trained, **fixed}) if fixed else trained


def _held(tree: Any, source: Any, paths: frozenset[tuple[str, ...]]) -> Any:
    """`tree` with `source`'s leaves at `paths` (none: `tree` as it is)."""
    return _joined(_split(tree, paths)[0], _split(source, paths)[1])


def _accumulation_updated(opt_state: Any) -> jax.Array | None:
    """Under gradient accumulation, whether this batch made an update; None without it.

    Read off the optimizer state (`optax.MultiStepsState`, wherever it sits in it), so that an
    accumulating optimizer of one's own counts as `make_optimizer`'s does, also where it is not
    an `optax.MultiSteps` object: `MultiSteps(...).gradient_transformation()`, or one inside a
    chain. (Tested on the object's type, the EMA of those stepped on every batch.)
    """

    def is_multi(x: Any) -> bool:
        return isinstance(x, optax.MultiStepsState)

    # Not looked into: the states a MultiStepsState holds (its own optimizer's).
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_multi) if is_multi(x)]
    if not found:
        return None
    outer = found[0]
    return jnp.logical_and(outer.mini_step == 0, outer.gradient_step > 0)


# optax's state of a plain schedule given to `optax.inject_hyperparams` (optax 0.2.5 and later,
# where the schedule reads this count and not the injecting state's; not exported by optax).
_WRAPPED_SCHEDULE = getattr(
    getattr(getattr(optax, "schedules", None), "_inject", None), "WrappedScheduleState", None
)
# States whose `count` is the step a schedule is evaluated at.
_SCHEDULE_COUNTS = tuple(
    kind
    for kind in (
        optax.ScaleByScheduleState,
        getattr(optax, "InjectHyperparamsState", None),
        getattr(optax, "InjectStatefulHyperparamsState", None),
        _WRAPPED_SCHEDULE,
    )
    if kind is not None
)


def _schedules_stepped(opt_state: Any, before: Any) -> Any:
    """`opt_state` with each learning-rate schedule's count one past its count in `before`.

    A skipped step (float16 gradients that overflowed, or a batch whose videos all failed)
    keeps the optimizer's state as it was, so its schedule fell behind the loop steps: the rate
    applied was an earlier step's, not the one logged, and the cosine decay never reached its
    end. Its schedule now moves on with the loop, as PyTorch's scheduler steps past a step its
    GradScaler skips: `optax.ScaleByScheduleState` (as `make_optimizer`'s optimizers hold
    theirs) and the schedules of `optax.inject_hyperparams` (their hyperparams are computed
    afresh at the next update); Adam's own count does not (its bias correction counts
    updates). Not within an accumulating `optax.MultiSteps`, whose schedule counts updates; a
    stateful schedule of one's own (`optax.inject_stateful_hyperparams`) stays where it was.
    """

    def node(x: Any) -> bool:
        return isinstance(x, (*_SCHEDULE_COUNTS, optax.MultiStepsState))

    def stepped(new: Any, old: Any) -> Any:
        if not isinstance(new, _SCHEDULE_COUNTS):
            return new  # a leaf, or a MultiStepsState
        inner = {  # the schedules within it (inject_hyperparams' inner optimizer, its schedules)
            name: _schedules_stepped(getattr(new, name), getattr(old, name))
            for name in ("inner_state", "hyperparams_states")
            if hasattr(new, name)
        }
        return new._replace(count=old.count + 1, **inner)

    return jax.tree.map(stepped, opt_state, before, is_leaf=node)


def make_train_step(
    model: STAM,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | float,
    train: Any,
    seed: int,
    num_classes: int,
    teacher: STAM | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The step to jit: (state, videos, labels, weights[, teacher params]) -> (state, metrics).

    `videos` as the model takes them: uint8 in [0, 255] or float in [0, 1].

    Mixup/CutMix (one draw per batch, the same box in every frame), label smoothing,
    distillation from `teacher` (run in the same step, its logits constant), dropout and drop
    path; under float16, dynamic loss scaling: a step whose gradients are not finite is skipped
    (params, optimizer state and EMA unchanged) and the scale halved. A batch in which no video
    could be used (every one failed to decode: weight 0) is skipped the same way, rather than
    let weight decay alone move the params.

    Args:
      model: the model trained (its dtype chooses float16 loss scaling).
      tx: the optimizer (`make_optimizer`'s, or one of one's own; an `optax.MultiSteps` in it,
        found by its state, makes the EMA follow its updates, not the batches).
      schedule: the learning rate by step, for the metrics only (`tx` applies its own): an
        `optax.Schedule`, or a number for a constant rate.
      train: the run config's `train` section (`configs/common.py`: label smoothing, mixing,
        distillation, EMA decay, accumulation, loss-scale period).
      seed: the seed of the step's random keys (dropout, mixing), folded with the step.
      num_classes: the number of classes of `labels`, the model's. A usable video's label
        outside [0, num_classes) makes the loss NaN (values are not known when the step is
        traced): one-hot it was all zeros, and the step trained on the smoothing alone.
      teacher: a model to distil from; its params are then the step's fifth argument.

    Raises:
      TypeError: `schedule` is neither callable nor a number.
      ValueError: `num_classes` is not the model's; (from the step, when traced) videos
        neither uint8 nor float.
    """
    if num_classes != model.num_classes:
        raise ValueError(
            f"make_train_step: num_classes={num_classes}, but the model has "
            f"{model.num_classes} outputs; pass num_classes=model.num_classes (labels in "
            f"[0, {model.num_classes})), or make the model with create_model(..., "
            f"num_classes={num_classes})."
        )
    if not callable(schedule):
        if isinstance(schedule, bool) or not isinstance(schedule, numbers.Real):
            raise TypeError(
                f"schedule={schedule!r}: pass the learning-rate schedule (an optax.Schedule, "
                "e.g. make_optimizer's second value) or a number for a constant rate."
            )
        schedule = optax.constant_schedule(float(schedule))
    mixing = train.mixup_alpha > 0 or train.cutmix_alpha > 0
    float16 = loss_scaled(model)
    weight, temperature = train.distill_weight, train.distill_temperature

    def step_fn(
        state: TrainState,
        videos: jax.Array,
        labels: jax.Array,
        weights: jax.Array,
        teacher_params: Any = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), train.label_smoothing)
        inputs = videos
        if mixing:
            # Mixed as float frames in [0, 1], as the model takes them: uint8 ones scaled as the
            # model scales them, float ones as they are.
            if videos.dtype == jnp.uint8:
                inputs = uint8_to_unit(videos)
            elif not jnp.issubdtype(videos.dtype, jnp.floating):
                raise ValueError(
                    f"videos have dtype {videos.dtype}; pass uint8 in [0, 255] or float in [0, 1]."
                )
            inputs, targets = mix_videos(
                jax.random.fold_in(key, 1),
                inputs,
                targets,
                mixup_alpha=train.mixup_alpha,
                cutmix_alpha=train.cutmix_alpha,
                switch_prob=train.mix_switch_prob,
                valid=weights > 0,  # a failed video's row is mixed into no video
            )
        teacher_logits = None
        if teacher is not None:
            teacher_logits = teacher.apply({"params": teacher_params}, inputs)

        # Gradients of the trained params only: none flows back into a frozen part.
        frozen = frozen_paths(train, state.params)
        trained, fixed = _split(state.params, frozen)

        def loss_fn(trained: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            params = _joined(trained, fixed)
            logits = model.apply(
                {"params": params}, inputs, deterministic=False, rngs={"dropout": key}
            )
            losses = soft_cross_entropy(logits, targets)
            # A label outside the classes is a wrong input, loudly: NaN, not a quiet step.
            known = (labels >= 0) & (labels < num_classes)
            losses = jnp.where(known | (weights == 0), losses, jnp.nan)
            if teacher_logits is not None:
                kd = distillation_loss(logits, teacher_logits, temperature)
                losses = (1.0 - weight) * losses + weight * kd
            loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
            scaled = scale_loss(state.loss_scale, loss) if float16 else loss
            return scaled, (loss, logits)

        (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        grads = _joined(grads, jax.tree.map(jnp.zeros_like, fixed))
        finite = jnp.array(True)
        loss_scale = state.loss_scale
        if float16:
            grads = unscale(state.loss_scale, grads)
            finite = all_finite(grads)
            loss_scale = adjust(state.loss_scale, finite, period=train.loss_scale_period)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Frozen params stay where they were whatever `tx` does (one's own optimizer may decay
        # every param), and their EMA too (d * p + (1 - d) * p is not p in floating point).
        params = _held(params, state.params, frozen)
        d = train.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        ema = _held(ema, state.ema_params, frozen)
        updated = _accumulation_updated(opt_state)
        if updated is not None:  # the EMA follows the updates, not the batches
            ema = jax.tree.map(lambda n, o: jnp.where(updated, n, o), ema, state.ema_params)
        keep = finite & (weights.sum() > 0)  # a skipped step leaves everything as it was,
        params, opt_state, ema = jax.tree.map(
            lambda n, o: jnp.where(keep, n, o),
            (params, opt_state, ema),
            (state.params, state.opt_state, state.ema_params),
        )
        opt_state = _schedules_stepped(opt_state, state.opt_state)  # but the rate's count
        correct = (jnp.argmax(logits, -1) == labels) * weights
        metrics = {
            "loss": loss,
            "accuracy": correct.sum() / jnp.maximum(weights.sum(), 1.0),
            "grad_norm": optax.global_norm(grads),
            # The rate of this batch's update: the rate at the first batch of its k.
            "learning_rate": schedule(state.step // train.accumulate * train.accumulate),
            "videos": weights.sum(),  # of the batch, usable (all processes)
        }
        if float16:
            metrics["loss_scale"] = state.loss_scale.scale
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            loss_scale=loss_scale,
        )
        return new_state, metrics

    return step_fn
