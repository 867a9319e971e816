"""Training with optax: one jitted, data-parallel step, orbax checkpoints and exact resume.

`train_and_evaluate(config, workdir)` trains on `config.train.root` (a Kinetics-style folder) and
writes `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tensorboard/` (process 0),
checkpoints in `workdir/checkpoints/` (orbax, asynchronous, atomic: a half-written one is never
restored) and, at the end, the params and their EMA as
stam-jax checkpoints `workdir/final` and `workdir/final_ema` (for `run_eval.py`, `convert.to_torch`,
`stam_jax.explain`).

Exact resume: everything random is a function of (seed, step) — the data order of an epoch, each
clip's augmentation, the dropout keys — so the train state (step, params, optimizer state, EMA)
is all a checkpoint needs. A run killed at any moment and restarted from its workdir reaches the
same params, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from stam_jax import checkpoints, sharding
from stam_jax.augment import mix_videos
from stam_jax.configs import model_from_run_config, name_data_flags
from stam_jax.data.folder import ClassListError, DatasetError, VideoFolder
from stam_jax.data.loader import decode_train_item, ordered_map, worker_count
from stam_jax.data.prepared import PreparedError, list_root
from stam_jax.data.video import ClipSpec
from stam_jax.init import init_from_checkpoint, redraw_temporal_pos_embed
from stam_jax.interrupts import interrupts_held
from stam_jax.losses import (
    LossScale,
    adjust,
    all_finite,
    distillation_loss,
    scale_loss,
    soft_cross_entropy,
    unscale,
)
from stam_jax.model import STAM, uint8_to_unit
from stam_jax.paths import unwritable
from stam_jax.progress import progress_bar
from stam_jax.variants import model_from_config, variant_name

KILL_HOOK = "STAM_TEST_KILL_AFTER_SAVE"  # tests: SIGKILL this process while a save is underway


class TrainConfigError(ValueError):
    """A run refused before any compute; the message names the value and the fix."""


class TrainStopped(RuntimeError):
    """Training stopped partway, with the step; the checkpoints saved so far are intact."""


class NonFiniteError(TrainStopped):
    """The loss or the gradient went NaN/Inf; raised with the step number."""


class UnusableDataError(TrainStopped):
    """Most of the training videos seen so far could not be decoded or were too short."""


# The stop rule for failing videos: more than this share of at least this many videos seen.
_UNUSABLE_SHARE, _UNUSABLE_AFTER = 0.5, 32


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds; the rest of the run is derived from (seed, step)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    loss_scale: LossScale | None = None  # float16 training only


def _loss_scaled(model: STAM) -> bool:
    """float16 compute trains with dynamic loss scaling."""
    return jnp.dtype(model.dtype) == jnp.dtype(jnp.float16)


def initial_state(
    model: STAM, tx: optax.GradientTransformation, train: Any, params: Any
) -> TrainState:
    """The state at step 0: params in `model.param_dtype`, their EMA, a loss scale for float16."""
    params = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
    scale = LossScale.create(train.loss_scale_initial) if _loss_scaled(model) else None
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), params, scale)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms, tokens."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {
            path: value.ndim >= 2 and path[-1] not in ("pos_embed", "cls_token")
            for path, value in flat.items()
        }
    )


def make_optimizer(train: Any, params: Any) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and its learning-rate schedule, from `config.train`.

    `train.steps` and `train.warmup_steps` count batches (loop steps). With `train.accumulate`
    = k, the optimizer updates once every k batches, at the rate the returned schedule gives
    the first batch of those k, so the warm-up and the cosine decay span the run whatever k is.

    Returns:
      (optimizer, schedule): `schedule(step)` is the learning rate at batch `step`.
    """
    check_train_config(train)
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
    if train.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(train.grad_clip), opt)
    if k > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=k)
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
        refuse(
            "steps",
            f"not a multiple of train.accumulate={k} (the optimizer updates once every {k} "
            f"batches, so the last {train.steps % k} would be computed for nothing); use "
            f"{lower or upper} or {upper}",
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
    if not train.temporal_pos_embed_std >= 0:
        refuse("temporal_pos_embed_std", "must be >= 0 (0: the official 0.02 init)")
    for field in ("momentum", "ema_decay", "label_smoothing"):
        if not 0 <= train[field] < 1:
            refuse(field, "must be in [0, 1)")
    if not 0 <= train.mix_switch_prob <= 1:
        refuse("mix_switch_prob", "is a probability, in [0, 1]")
    if not train.loss_scale_initial >= 1:
        refuse("loss_scale_initial", "must be >= 1 (float16 only; default 2^15)")
    if train.teacher:
        if not 0 <= train.distill_weight <= 1:
            refuse("distill_weight", "must be in [0, 1]")
        if not train.distill_temperature > 0:
            refuse("distill_temperature", "must be > 0")


def _train_step(
    model: STAM,
    tx,
    schedule,
    train: Any,
    seed: int,
    num_classes: int,
    teacher: STAM | None = None,
):
    """The jitted step: (state, videos, labels, weights[, teacher params]) -> (state, metrics).

    Mixup/CutMix (one draw per batch, the same box in every frame), label smoothing,
    distillation from `teacher` (run in the same step, its logits constant), dropout and drop
    path; under float16, dynamic loss scaling: a step whose gradients are not finite is skipped
    (params, optimizer state and EMA unchanged) and the scale halved. A batch in which no video
    could be used (every one failed to decode: weight 0) is skipped the same way, rather than
    let weight decay alone move the params.
    """
    mixing = train.mixup_alpha > 0 or train.cutmix_alpha > 0
    float16 = _loss_scaled(model)
    weight, temperature = train.distill_weight, train.distill_temperature

    def step_fn(state: TrainState, videos, labels, weights, teacher_params=None):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), train.label_smoothing)
        inputs = videos
        if mixing:
            inputs = uint8_to_unit(videos)  # as the model scales uint8 frames
            inputs, targets = mix_videos(
                jax.random.fold_in(key, 1),
                inputs,
                targets,
                mixup_alpha=train.mixup_alpha,
                cutmix_alpha=train.cutmix_alpha,
                switch_prob=train.mix_switch_prob,
            )
        teacher_logits = None
        if teacher is not None:
            teacher_logits = teacher.apply({"params": teacher_params}, inputs)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, inputs, deterministic=False, rngs={"dropout": key}
            )
            losses = soft_cross_entropy(logits, targets)
            if teacher_logits is not None:
                kd = distillation_loss(logits, teacher_logits, temperature)
                losses = (1.0 - weight) * losses + weight * kd
            loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
            scaled = scale_loss(state.loss_scale, loss) if float16 else loss
            return scaled, (loss, logits)

        (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.array(True)
        loss_scale = state.loss_scale
        if float16:
            grads = unscale(state.loss_scale, grads)
            finite = all_finite(grads)
            loss_scale = adjust(state.loss_scale, finite, period=train.loss_scale_period)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = train.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        if isinstance(tx, optax.MultiSteps):  # the EMA follows the updates, not the batches
            updated = tx.has_updated(opt_state)
            ema = jax.tree.map(lambda n, o: jnp.where(updated, n, o), ema, state.ema_params)
        keep = finite & (weights.sum() > 0)  # a skipped step leaves everything as it was
        params, opt_state, ema = jax.tree.map(
            lambda n, o: jnp.where(keep, n, o),
            (params, opt_state, ema),
            (state.params, state.opt_state, state.ema_params),
        )
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


class _Unusable:
    """The training videos that could not be used: each named once on stderr, listed in
    `WORKDIR/failed_videos.jsonl` (with several processes, each lists the videos it decoded in
    `failed_videos.process_K.jsonl`), and the run stopped when they are most of what it has
    seen (`_UNUSABLE_SHARE` of at least `_UNUSABLE_AFTER` videos): a folder of files that do
    not decode trains nothing."""

    def __init__(self, workdir: Path, start: int):
        name = "failed_videos.jsonl"
        if jax.process_count() > 1:
            name = f"failed_videos.process_{jax.process_index()}.jsonl"
        self.log = workdir / name
        # A resume keeps the rows of the steps up to its checkpoint (later ones are redone),
        # and does not name those videos again: the log is the uninterrupted run's.
        self.named: set[str] = {json.loads(row)["path"] for row in _truncate_log(self.log, start)}
        self.start, self.seen, self.used = start, 0, 0.0

    def add(self, step: int, path: str, item: Any) -> None:
        """Reports one video that failed at `step` (a `Decoded` with its status and reason)."""
        if path in self.named:
            return  # it fails again in every epoch: named once
        self.named.add(path)
        print(
            f"warning: step {step}: {path} skipped ({item.status}: {item.reason}); it will be "
            "skipped in every epoch.",
            file=sys.stderr,
            flush=True,
        )
        row = {"step": step, "path": path, "status": item.status, "reason": item.reason}
        with open(self.log, "a") as f:
            f.write(json.dumps(row) + "\n")

    @property
    def failed(self) -> int:
        """The videos (all processes) that could not be used since this start of the run."""
        return self.seen - round(self.used)

    def check(self, step: int, batch: int, used: float, root: str) -> None:
        """Counts a step's usable videos (all processes); stops the run on the rule above."""
        self.seen, self.used = self.seen + batch, self.used + used
        failed = self.failed
        if self.seen >= _UNUSABLE_AFTER and failed > _UNUSABLE_SHARE * self.seen:
            raise UnusableDataError(
                f"step {step}: {failed} of the {self.seen} training videos of steps "
                f"{self.start + 1}-{step} could not be used (they failed to decode or are too "
                f"short; each is named above and in {self.log}). Check "
                f"--config.train.root={root}; checkpoints saved so far are intact."
            )


class _Jobs(Sequence):
    """Decoding jobs for steps [start, end), built on demand (a long run has millions)."""

    def __init__(
        self, folder: VideoFolder, spec: ClipSpec, seed: int, batch: int, start: int, end: int
    ):
        self.folder, self.spec, self.seed, self.batch = folder, spec, seed, batch
        self.start, self.end = start, end
        self.local = batch // jax.process_count()
        self.per_epoch = len(folder.items) // batch
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled item order of an epoch: a function of (seed, epoch) only."""
        if epoch not in self._orders:
            self._orders = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.folder.items))
            }
        return self._orders[epoch]

    def __len__(self) -> int:
        return (self.end - self.start) * self.local

    def __getitem__(self, position: int) -> tuple:
        step, row = divmod(position, self.local)
        step += self.start
        epoch, k = divmod(step, self.per_epoch)
        slot = k * self.batch + jax.process_index() * self.local + row
        item = self.folder.items[self.order(epoch)[slot]]
        path = str(self.folder.root / item.path)
        return position, path, self.spec, (self.seed, epoch, slot)

    def label(self, position: int) -> int:
        step, row = divmod(position, self.local)
        epoch, k = divmod(step + self.start, self.per_epoch)
        slot = k * self.batch + jax.process_index() * self.local + row
        return self.folder.items[self.order(epoch)[slot]].label


def _eval_config(config: Any) -> ml_collections.ConfigDict:
    """The run config of the periodic evaluation: `train.eval_root` as the data, no progress bar."""
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.data.root = config.train.eval_root
    eval_config.progress = False
    return eval_config


def _check_eval_root(config: Any, model: STAM, classes: Sequence[str]) -> None:
    """Refuses, before training, an eval root that the periodic evaluation would refuse, or
    whose classes are not the training data's `classes` (labels are indices into both)."""
    from stam_jax.evaluate import EvalConfigError, _clip_spec, _list_data

    eval_config = _eval_config(config)
    try:
        folder, _ = _list_data(eval_config, model, _clip_spec(eval_config, model))
    except EvalConfigError as e:
        raise TrainConfigError(f"--config.train.eval_root: {e}") from None
    if tuple(folder.classes) != tuple(classes):
        label, train_name, eval_name = next(
            (i, a, b)
            for i, (a, b) in enumerate(zip(classes, folder.classes, strict=True))
            if a != b
        )
        raise TrainConfigError(
            f"--config.train.eval_root={config.train.eval_root}: its classes are not the "
            f"training data's (label {label} is {eval_name!r} there, {train_name!r} in "
            f"{config.train.root}), so its labels would not line up with the model's outputs; "
            "give both the same class folders, or name them all in label order with "
            "--config.data.class_list."
        )


def _training_data(config: Any, spec: ClipSpec) -> tuple[VideoFolder, Any]:
    """The listing of `config.train.root`, and the opened dataset when it is a prepared one."""
    root = config.train.root
    if not root:
        raise TrainConfigError(
            "no training data: pass --config.train.root=VIDEO_ROOT (or a dataset made by "
            "python -m stam_jax.data.prepare --kind train)."
        )
    try:
        return list_root(root, "train", spec, config.data.class_list or None)
    except ClassListError as e:  # names its own flag
        raise TrainConfigError(str(e)) from None
    except (PreparedError, DatasetError) as e:
        raise TrainConfigError(f"--config.train.root: {e}") from None


def _checkpoint_manager(workdir: Path, train: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=train.save_every,
        max_to_keep=train.keep,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _stopped(manager: ocp.CheckpointManager, fix: str) -> str:
    """The end of a non-finite stop's message: what the run leaves to resume from, then `fix`,
    to be tried in a new workdir once a checkpoint exists (a restart in this one must keep its
    settings)."""
    last = manager.latest_step()
    if last is None:
        return f"no checkpoint saved yet. {fix}."
    return (
        f"checkpoints up to step {last} intact. {fix}, in a new --workdir (a restart in this "
        "one must keep its settings)."
    )


def _summary_writer(logdir: Path, purge_step: int | None) -> Any:
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors, which
    training never logs; that import cost 1.4 s of each start on a 2-core machine
    (`benchmarks/tensorboard_import.py`). While tensorboardX is imported, `import torch` fails,
    and tensorboardX goes on without it.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir), purge_step=purge_step)


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains `config`'s model on `config.train.root`, resuming from `workdir` if possible.

    Args:
      config: a run config (`configs/*.py`).
      workdir: output folder (checkpoints, metrics, final params).

    Returns:
      A summary: final step, the step it resumed from (0: a fresh start), last metrics,
      where the outputs are.

    Raises:
      TrainConfigError: before any compute, for bad data, batch or optimizer settings.
      NonFiniteError: a NaN/Inf loss or gradient, with the step; checkpoints stay intact.
      UnusableDataError: more than half of at least 32 training videos seen could not be used.
    """
    train = config.train
    check_train_config(train)  # every refusal below comes before any compute or file
    if isinstance(config.seed, bool) or not 0 <= config.seed < 2**32:
        # numpy's data order refuses a negative seed mid-run; jax.random.key folds larger
        # ones onto others (2**32 gives seed 0's dropout).
        raise TrainConfigError(
            f"--config.seed={config.seed}: use a whole number in [0, 2**32), e.g. 0."
        )
    if not workdir:
        raise TrainConfigError("--workdir is empty; name the folder for this run's outputs.")
    workdir = Path(workdir).absolute()  # orbax takes absolute paths only
    problem = unwritable(workdir, into=True)  # found now, not at the first checkpoint
    if problem:
        raise TrainConfigError(f"cannot write --workdir={workdir}: {problem}; name another folder.")
    try:
        model = model_from_run_config(config)
    except ValueError as e:  # an unknown variant, dtype or attention implementation
        raise TrainConfigError(str(e)) from None
    dist = config.distributed
    sharding.initialize_distributed(dist.coordinator, dist.num_processes, dist.process_id)
    sharding.enable_compilation_cache(config.compilation_cache_dir)
    try:
        spec = ClipSpec(
            model.num_frames,
            config.data.frame_rate,
            config.data.resize,
            config.data.crop,
            train_flip=config.data.train_flip,
            train_min_area=config.data.train_min_area,
        )
    except ValueError as e:
        raise TrainConfigError(name_data_flags(e)) from None
    folder, prepared = _training_data(config, spec)
    if len(folder.classes) != model.num_classes:
        raise TrainConfigError(
            f"{train.root} has {len(folder.classes)} classes but the model has "
            f"{model.num_classes} outputs; set --config.model_overrides.num_classes="
            f"{len(folder.classes)} or give --config.data.class_list."
        )
    mesh = sharding.data_mesh()
    try:
        local_batch = sharding.local_batch_size(config.batch_size, mesh)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    try:  # the periodic evaluation's batches hold a multiple of these frames
        model.frames_per_step(config.batch_size * model.num_frames)
    except ValueError as e:
        raise TrainConfigError(f"--config.frame_chunk: {e}") from None
    if train.eval_every > 0:
        if not train.eval_root:
            raise TrainConfigError(
                f"train.eval_every={train.eval_every} needs --config.train.eval_root=VAL_DIR "
                "(or set train.eval_every=0)."
            )
        _check_eval_root(config, model, folder.classes)
    elif train.eval_root and jax.process_index() == 0:
        print(
            f"warning: --config.train.eval_root={train.eval_root} is not used: periodic "
            "evaluation is off (train.eval_every=0); set --config.train.eval_every=N to "
            "evaluate every N steps.",
            file=sys.stderr,
        )
    usable = prepared.num_records if prepared else len(folder.items)
    if usable < config.batch_size:
        raise TrainConfigError(
            f"--config.train.root={train.root} has {usable} videos, fewer than one batch "
            f"(--config.batch_size={config.batch_size}); lower the batch size or add videos."
        )
    teacher_read = _teacher_model(config, model)  # (teacher, its stored config) or None
    teacher = teacher_read[0] if teacher_read else None
    # Read (host arrays) and checked now, before anything is written; on the devices later.
    teacher_host = _teacher_params(config, *teacher_read) if teacher_read else None
    workers = worker_count(config.data.workers)
    # A restart in the same workdir resumes from its last checkpoint: what it finds is read
    # (nothing is written) before the run is allowed to go on.
    has_checkpoints = (workdir / "checkpoints").is_dir()
    manager = _checkpoint_manager(workdir, train) if has_checkpoints else None
    start = (manager.latest_step() or 0) if manager else 0
    _check_same_run(config, workdir, start, folder)

    video = np.zeros((1, model.num_frames, model.image_size, model.image_size, 3), np.uint8)
    replicated = sharding.replicated(mesh)
    float16 = _loss_scaled(model)
    if start:  # the params, optimizer state and EMA come from the checkpoint
        abstract = checkpoints.abstract_params(model)
        tx, schedule = make_optimizer(train, abstract)
        state = jax.eval_shape(lambda p: initial_state(model, tx, train, p), abstract)
    else:
        params = jax.jit(model.init)(jax.random.key(config.seed), video)["params"]
        params, report = _initial_params(model, params, config)
        workdir.mkdir(parents=True, exist_ok=True)
        manager = manager or _checkpoint_manager(workdir, train)
        _write_run_record(config, workdir, folder)
        if jax.process_index() == 0:
            (workdir / "init_report.txt").write_text(report + "\n")
            if config.checkpoint:
                print(report, flush=True)
        tx, schedule = make_optimizer(train, params)
        state = jax.jit(lambda p: initial_state(model, tx, train, p), out_shardings=replicated)(
            params
        )
        del params
    prefetch = config.data.prefetch or 2 * local_batch
    loader = None
    if prepared:
        from stam_jax.data import reading

        loader = reading.train_loader(prepared, spec, config.seed, local_batch, workers, prefetch)
        clips = iter(loader)
        batches = reading.batches(clips, local_batch)
    if start:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
        )
        items = {"state": ocp.args.StandardRestore(abstract)}
        if loader:
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(start, args=ocp.args.Composite(**items))
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise TrainConfigError(
                f"cannot resume from {workdir / 'checkpoints'} step {start} ({e}); was it "
                f"written reading {train.root}? Use a new --workdir."
            ) from None
        state = restored["state"]
        if loader:
            saved = restored["data"]["grain"][jax.process_index()]
            was = json.loads(saved)["worker_count"]
            if was != workers:
                raise TrainConfigError(
                    f"the run in {workdir} read its data with {was} worker processes, this one "
                    f"would use {workers}; resume with --config.data.workers={was} (the data "
                    "position is saved per worker)."
                )
            clips.set_state(saved.encode())
        if jax.process_index() == 0:
            print(
                f"resuming {workdir} from step {start} of {train.steps} (params, optimizer "
                "state and EMA from its checkpoint; --config.checkpoint is not read again)",
                flush=True,
            )
    batch_sharding = sharding.batch_sharded(mesh)
    teacher_params = None if teacher_host is None else jax.device_put(teacher_host, replicated)
    del teacher_host  # not held for the whole run
    step_fn = jax.jit(
        _train_step(model, tx, schedule, train, config.seed, model.num_classes, teacher),
        in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    if not loader:
        jobs = _Jobs(folder, spec, config.seed, config.batch_size, start, train.steps)
        decoded = ordered_map(decode_train_item, jobs, workers, prefetch)
    kill_at = int(os.environ.get(KILL_HOOK, "-1"))
    log = workdir / "metrics.jsonl" if jax.process_index() == 0 else None
    board = None
    if log:
        _truncate_log(log, start)
        # purge_step: a resumed run hides the events logged after its checkpoint.
        board = _summary_writer(workdir / "tensorboard", purge_step=start or None)
    progress = progress_bar(
        train.steps, "train", "step", config.progress and jax.process_index() == 0, start
    )
    last: dict[str, float] = {}
    timer, timer_step = time.perf_counter(), start
    named: set[str] = set()  # videos the periodic evaluation skipped, named once
    skipped = 0
    unusable = _Unusable(workdir, start)
    try:
        for step in range(start, train.steps):
            if loader:
                batch = next(batches)
                videos, labels = batch["video"], batch["label"]
                weights = np.ones(local_batch, np.float32)
            else:
                videos = np.zeros((local_batch, *video.shape[1:]), np.uint8)
                labels = np.zeros(local_batch, np.int32)
                weights = np.zeros(local_batch, np.float32)
                for row in range(local_batch):
                    item = next(decoded)
                    if item.status == "ok":
                        videos[row], weights[row] = item.views[0], 1.0
                        labels[row] = jobs.label(item.position)
                    else:  # weight 0: a bad file costs its slot, never the run
                        unusable.add(step + 1, jobs[item.position][1], item)
            state, metrics = step_fn(
                state,
                sharding.to_global(videos, batch_sharding),
                sharding.to_global(labels, batch_sharding),
                sharding.to_global(weights, batch_sharding),
                teacher_params,
            )
            metrics = {k: float(v) for k, v in metrics.items()}
            # Usable videos of the global batch: every process's rows.
            unusable.check(step + 1, config.batch_size, metrics.pop("videos"), train.root)
            if metrics.get("skipped"):  # float16: the step was skipped and the scale lowered
                skipped += 1
                if jax.process_index() == 0:
                    print(
                        f"step {step + 1}: float16 gradients not finite at loss scale "
                        f"{metrics['loss_scale']:g}; step skipped (params unchanged), scale halved",
                        file=sys.stderr,
                        flush=True,
                    )
                if metrics["loss_scale"] <= 1.0:
                    manager.wait_until_finished()
                    raise NonFiniteError(
                        f"step {step + 1}: gradients not finite even at float16 loss scale 1; "
                        + _stopped(manager, "Use --config.dtype=bfloat16")
                    )
            elif not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                manager.wait_until_finished()
                raise NonFiniteError(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm "
                    f"{metrics['grad_norm']}; stopped before saving, "
                    + _stopped(
                        manager,
                        "Lower --config.train.learning_rate"
                        + (" or use --config.dtype=bfloat16" if float16 else ""),
                    )
                )
            done = step + 1
            if done % train.log_every == 0 or done == train.steps:
                elapsed = time.perf_counter() - timer
                rate = (done - timer_step) / elapsed if elapsed > 0 else 0.0
                last = {
                    "step": done,
                    **metrics,
                    "steps_per_s": rate,
                    "videos_per_s": rate * config.batch_size,
                    "failed_videos": unusable.failed,
                }
                if float16:
                    last["skipped_steps"] = skipped
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    for name, value in last.items():
                        if name != "step":
                            board.add_scalar(f"train/{name}", value, done)
                    board.flush()
                timer, timer_step = time.perf_counter(), done
            if train.eval_every > 0 and (done % train.eval_every == 0 or done == train.steps):
                scores = _periodic_eval(config, Path(workdir), model, state, done, named)
                if log:  # no video evaluated: top-1 is null (strict JSON), not NaN
                    scores = {k: v if math.isfinite(v) else None for k, v in scores.items()}
                    with open(log, "a") as f:
                        f.write(json.dumps({"step": done, **scores}, allow_nan=False) + "\n")
                    for name, value in scores.items():
                        if value is not None:
                            board.add_scalar(f"eval/{name}", value, done)
                    board.flush()
                timer = time.perf_counter()  # evaluation time is not training time
            items = {"state": ocp.args.StandardSave(state)}
            if (loader and manager.should_save(done)) or (loader and done == train.steps):
                # Every process's grain iterator position, taken now (the save itself is async).
                position = sharding.allgather_json(clips.get_state().decode())
                items["data"] = ocp.args.JsonSave({"grain": position})
            with interrupts_held():  # started whole, or not at all
                saved = manager.save(
                    done, args=ocp.args.Composite(**items), force=done == train.steps
                )
            if saved and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die while the async save runs
            progress.update(1)
    except BaseException:
        # A save under way is let finish: its checkpoint is whole, and orbax's threads do not
        # fail (printing pages of errors) in an interpreter that is shutting down.
        with contextlib.suppress(Exception):
            manager.wait_until_finished()
        raise
    finally:  # however the loop ends, the input's workers stop now and the log is closed
        progress.close()  # its line ends before anything else is printed
        if loader:  # and grain's shared memory is freed (reading.close)
            reading.close(clips)
            loader = clips = batches = None
            gc.collect()
        else:
            decoded.close()
        if board:
            board.close()
    manager.wait_until_finished()
    outputs = {}
    if jax.process_index() == 0:
        host = jax.device_get(state)
        outputs["final"] = str(
            checkpoints.save(workdir / "final", model, host.params, overwrite=True)
        )
        if train.ema_decay > 0:
            outputs["final_ema"] = str(
                checkpoints.save(workdir / "final_ema", model, host.ema_params, overwrite=True)
            )
    return {"step": int(state.step), "resumed_from": start, "last_metrics": last, **outputs}


def _periodic_eval(
    config: Any, workdir: Path, model: STAM, state: TrainState, step: int, named: set[str]
) -> dict[str, float]:
    """Evaluates the params (and their EMA) on `train.eval_root` with `stam_jax.evaluate`.

    Each evaluated set is saved as a stam-jax checkpoint in `workdir/eval/step_N/{params,ema}`
    and evaluated from there (results.json, predictions.jsonl in `{params,ema}_results`); the
    best by top-1 so far then becomes `workdir/best`, with `workdir/best.json` (step, which
    params, top-1), which survive a resume, and any other is deleted (a STAM-16 set is 0.45 GB).
    Prints one line for the step, and names a skipped video the first time only (`named`
    holds those already named).
    """
    from stam_jax.evaluate import evaluate

    host = jax.device_get(state)
    sets = {"params": host.params}
    if config.train.ema_decay > 0:
        sets["ema"] = host.ema_params
    here = workdir / "eval" / f"step_{step}"
    best_file = workdir / "best.json"
    protocol = _eval_protocol(config)
    best = _read_best(best_file, protocol)
    scores, counts, new_best = {}, {}, None
    skipped: dict[str, list[dict[str, Any]]] = {}  # per set: the videos left out of its top-1
    for name, params in sets.items():
        if jax.process_index() == 0:
            checkpoints.save(here / name, model, params, overwrite=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"eval checkpoint {step} {name}")
        eval_config = _eval_config(config)
        eval_config.checkpoint = str(here / name)
        results = evaluate(eval_config, here / f"{name}_results", report=False)
        counts[name] = results["counts"]
        skipped[name] = results["dropped"] + results["failed"] + results["non_finite"]
        top1 = float(results["metrics"]["top1"])
        scores["top1" if name == "params" else "ema_top1"] = top1
        if jax.process_index() == 0:  # every process has read it: evaluate gathers at its end
            if top1 > best["top1"]:
                old = workdir / "best.old"
                shutil.rmtree(old, ignore_errors=True)
                if (workdir / "best").exists():
                    (workdir / "best").rename(old)
                (here / name).rename(workdir / "best")
                shutil.rmtree(old, ignore_errors=True)
                best = {"step": step, "params": name, "top1": top1, "eval": protocol}
                best_file.write_text(json.dumps(best) + "\n")
                new_best = name
            else:
                shutil.rmtree(here / name)
    if jax.process_index() == 0:
        _eval_report(step, scores, counts, skipped, named, here, new_best, workdir / "best")
    return scores


def _eval_protocol(config: Any) -> dict[str, Any]:
    """What the periodic evaluation's top-1 is measured on: the eval root and the settings that
    only it uses (a resume may change them, and `best.json` records them)."""
    return {
        "eval_root": str(Path(config.train.eval_root).absolute()),
        **{f"data.{k}": config.data[k] for k in ("num_clips", "num_crops", "short_videos")},
        "eval.average": config.eval.average,
    }


def _read_best(best_file: Path, protocol: dict[str, Any]) -> dict[str, Any]:
    """The best evaluation so far from `best.json`; none if it was measured otherwise (another
    eval root or views, see `_eval_protocol`), as its top-1 is not comparable."""
    if not best_file.exists():
        return {"top1": -1.0}
    best = json.loads(best_file.read_text())
    was = best.get("eval", protocol)  # a best.json from before the record: compared as is
    changed = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in protocol.items() if was.get(k) != v]
    if not changed:
        return best
    if jax.process_index() == 0:
        from stam_jax.evaluate import _percent

        print(
            f"note: the best top-1 so far ({_percent(best['top1'])} at step {best['step']}) was "
            f"measured otherwise ({'; '.join(changed)}), so this run's next evaluation becomes "
            f"the best (replacing {best_file.parent / 'best'}).",
            file=sys.stderr,
            flush=True,
        )
    return {"top1": -1.0}


def _eval_report(
    step: int,
    scores: dict[str, float],
    counts: dict[str, dict[str, int]],
    skipped: dict[str, list[dict[str, Any]]],
    named: set[str],
    here: Path,
    new_best: str | None,
    best: Path,
) -> None:
    """The periodic evaluation's line, and (to stderr) the videos a set left out that were not
    named before: a video that fails to decode once, one with NaN/Inf logits once per set."""
    from stam_jax.evaluate import NON_FINITE_REASON, _percent

    c = counts["params"]
    top1 = f"top-1 {_percent(scores['top1'])}"
    if "ema_top1" in scores:
        top1 = f"{top1} (EMA {_percent(scores['ema_top1'])})"
    left_out = c["listed"] - c["evaluated"]
    line = f"eval at step {step}: {top1} on {c['evaluated']} of {c['listed']} videos"
    if "ema" in counts and counts["ema"]["evaluated"] != c["evaluated"]:
        line += f" (EMA on {counts['ema']['evaluated']})"
    if left_out:
        line += f", {left_out} left out (reasons in {here}/params_results/results.json)"
    if new_best:
        line += f"; new best ({new_best}) in {best}"
    print(line)
    for name, entries in skipped.items():
        for entry in entries:
            non_finite = entry["reason"] == NON_FINITE_REASON
            key = f"{name}:{entry['path']}" if non_finite else entry["path"]
            if key not in named:
                named.add(key)
                whose = f" ({'EMA' if name == 'ema' else name})" if non_finite else ""
                print(f"  eval skipped {entry['path']}{whose}: {entry['reason']}", file=sys.stderr)


def _teacher_model(config: Any, model: STAM) -> tuple[STAM, dict[str, Any]] | None:
    """The distillation teacher of `config.train.teacher` and its stored config (None without
    one), checked against the student from its config alone (no tensor is read)."""
    if not config.train.teacher:
        return None
    try:
        stored = checkpoints.read_config(config.train.teacher)
    except checkpoints.CheckpointError as e:
        raise TrainConfigError(f"--config.train.teacher={config.train.teacher}: {e}") from None
    teacher = model_from_config(stored["model"]).clone(
        dtype=model.dtype, attention_impl=model.attention_impl, frame_chunk=model.frame_chunk
    )
    for name in ("num_frames", "image_size", "num_classes"):
        if getattr(teacher, name) != getattr(model, name):
            raise TrainConfigError(
                f"--config.train.teacher={config.train.teacher} has {name}="
                f"{getattr(teacher, name)}, the student {getattr(model, name)}: the teacher "
                "sees the student's clips and its logits are the soft targets, so both must match: "
                "use a teacher of the student's frames, frame size and classes (or train it "
                "first, from this one, with those)."
            )
    return teacher, stored


def _teacher_params(config: Any, teacher: STAM, stored: dict[str, Any]) -> Any:
    """The params of `teacher` (from `_teacher_model`, with the config it was built from) as
    host arrays in its param dtype, refused if any holds NaN or Inf."""
    try:
        params = checkpoints.read_params(config.train.teacher, teacher, config=stored)
    except checkpoints.CheckpointError as e:
        raise TrainConfigError(f"--config.train.teacher={config.train.teacher}: {e}") from None
    bad = checkpoints.non_finite_params(params)
    if bad:  # its logits, and so every distillation loss, would be NaN
        raise TrainConfigError(
            f"--config.train.teacher: {checkpoints.non_finite_message(config.train.teacher, bad)}"
            f"; distil from a teacher with finite params ({checkpoints.EARLIER_STEP})."
        )
    return jax.tree.map(lambda x: np.asarray(x).astype(teacher.param_dtype), params)


# Fields a restart may change: how the run is executed, logged, saved or evaluated, not what
# it computes. Any other change would silently mix two runs in one workdir.
_RESTART_MAY_CHANGE = (
    "progress",
    "compilation_cache_dir",
    "distributed",
    "attention_impl",
    "remat",
    "frame_chunk",
    "data.workers",
    "data.prefetch",
    "train.log_every",
    "train.save_every",
    "train.keep",
    "train.eval_every",
    "train.eval_root",
    # Only the periodic evaluation reads these (its best restarts when they change).
    "data.root",
    "data.num_clips",
    "data.num_crops",
    "data.short_videos",
    "eval",
)
RUN_RECORD = "run_config.json"


def _listing_digest(folder: VideoFolder) -> str:
    """A digest of what the training data is: its classes, and each video's path and label."""
    listing = [list(folder.classes), [[item.path, item.label] for item in folder.items]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


_LISTING = "train.root_listing"  # the run record's entry for `_listing_digest`


def _run_record(config: Any, folder: VideoFolder) -> dict[str, Any]:
    """The config fields that define what a run computes, flattened ('train.steps': 1000), and
    the digest of the training data's listing (the data may move, not change)."""
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    record = {
        k: v
        for k, v in sorted(flat.items())
        if not any(k == f or k.startswith(f + ".") for f in _RESTART_MAY_CHANGE)
    }
    return {**record, _LISTING: _listing_digest(folder)}


def _write_run_record(config: Any, workdir: Path, folder: VideoFolder) -> None:
    """Saves the fields a restart must not change (process 0), for `_check_same_run`."""
    if jax.process_index() == 0:
        staging = workdir / f"{RUN_RECORD}.tmp"
        staging.write_text(json.dumps(_run_record(config, folder), indent=1) + "\n")
        staging.replace(workdir / RUN_RECORD)


def _left_results(workdir: Path) -> bool:
    """Whether a run in `workdir` logged metrics or kept best params (what a new one would mix
    with)."""
    log = workdir / "metrics.jsonl"
    logged = log.exists() and any(line.strip() for line in log.read_text().splitlines())
    return logged or (workdir / "best.json").exists()


def _check_same_run(config: Any, workdir: Path, start: int, folder: VideoFolder) -> None:
    """Refuses to resume the run in `workdir` with a config that computes something else.

    Fields only one side holds (added to or removed from stam-jax since the run started) are
    not compared; a run from before the record is resumed with a warning. With no checkpoint
    to resume from (`start` 0), a record left by an earlier start is checked the same way.
    """
    record = workdir / RUN_RECORD
    # Without a checkpoint (none saved yet, or deleted) the run starts again from step 0, but
    # over its metrics, TensorBoard events, evaluations and best params: only the same run may.
    # One that stopped before logging anything (a refusal mid-start, a NaN loss at step 1)
    # left nothing to mix with, and may start again with other settings.
    if not start and not (record.exists() and _left_results(workdir)):
        return
    run = f"the run at step {start}" if start else "a run that left no checkpoint"
    if not record.exists():
        print(
            f"warning: {workdir} has no {RUN_RECORD} (a run started by an older stam-jax), so "
            "this restart cannot check that its settings are the run's; resuming.",
            file=sys.stderr,
            flush=True,
        )
        return
    try:
        saved = json.loads(record.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a {type(saved).__name__}, not the settings")
    except (OSError, ValueError) as e:
        raise TrainConfigError(
            f"cannot read {record} ({e}), which holds the settings of {run} in {workdir}; "
            "restore it, or start a new --workdir."
        ) from None
    now = json.loads(json.dumps(_run_record(config, folder)))  # tuples as lists, as saved
    # Only fields both know: one added or removed by another stam-jax version is not compared.
    changed = [k for k in sorted(saved) if now.get(k, saved[k]) != saved[k]]
    if changed == ["train.root"] and saved.get(_LISTING) == now[_LISTING]:
        print(
            f"the training data moved from {saved['train.root']} to {now['train.root']}: the "
            f"same {len(folder.items)} videos, classes and labels; "
            f"{'resuming' if start else 'starting it again'}.",
            file=sys.stderr,
            flush=True,
        )
        return
    changed = [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        if k != _LISTING
        else f"{k}: the videos, classes or labels of the training data differ"
        for k in changed
    ]
    if changed:
        steps = any(line.startswith("train.steps:") for line in changed)
        raise TrainConfigError(
            f"{workdir} holds {run} made with other settings; "
            f"{'resuming' if start else 'starting over it'} would mix two runs"
            + (
                " (the learning-rate schedule spans train.steps, so a longer run is not a "
                "continuation)"
                if steps
                else ""
            )
            + ". Changed:\n  "
            + "\n  ".join(changed)
            + f"\nRestore those values to {'resume' if start else 'run it again'} (the "
            "training data may move to another "
            "--config.train.root, with the same files), or start a new --workdir"
            + (
                f" (to train longer: --config.checkpoint={workdir / 'final'} there)"
                if steps and (workdir / "final").exists()
                else ""
            )
            + f". {record} holds the run's settings."
        )


def _initial_params(model: STAM, fresh: Any, config: Any) -> tuple[Any, str]:
    """The params a run starts from, fresh or from `config.checkpoint`, and the report naming
    where each tensor came from (for `init_report.txt`)."""
    std = config.train.temporal_pos_embed_std
    if config.checkpoint:
        try:
            params, report = init_from_checkpoint(
                model, fresh, config.checkpoint, temporal_pos_embed_std=std
            )
        except (ValueError, OSError) as e:  # InitError, CheckpointError, unreadable ViT files
            raise TrainConfigError(f"--config.checkpoint={config.checkpoint}: {e}") from None
    else:
        params, report = fresh, ["no --config.checkpoint: every tensor freshly initialised"]
        if std > 0 and "aggregate" in params and "pos_embed" in params["aggregate"]:
            params = redraw_temporal_pos_embed(params, std)
            report.append(f"aggregate/pos_embed: drawn with std {std}")
    source = config.checkpoint or "fresh"
    name = variant_name(model) or "a custom STAM"
    return params, "\n".join([f"initialisation of {name} from {source}", *report])


def _truncate_log(path: Path, step: int) -> list[str]:
    """Drops rows past `step` (logged after the checkpoint a resumed run restarts from); returns
    the rows kept."""
    if not path.exists():
        return []
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return kept
