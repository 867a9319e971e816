"""Training with optax: one jitted, data-parallel step, orbax checkpoints and exact resume.

`train_and_evaluate(config, workdir)` trains on `config.train.root` (a Kinetics-style folder) and
writes `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tensorboard/` (process 0),
checkpoints in `workdir/checkpoints/` (orbax, asynchronous, atomic: a half-written one is never
restored) and, at the end, the params and their EMA as
stam-jax checkpoints `workdir/final` and `workdir/final_ema` (for `run_eval.py`, `convert.to_torch`,
`stam_jax.explain`).

The step, the train state and the optimizer are in `stam_jax.train_step`, the periodic
evaluation in `stam_jax.train_eval`, and what a restart must keep in `stam_jax.resume`.

Exact resume: everything random is a function of (seed, step) — the data order of an epoch, each
clip's augmentation, the dropout keys — so the train state (step, params, optimizer state, EMA)
is all a checkpoint needs. A run killed at any moment and restarted from its workdir reaches the
same params, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from stam_jax import checkpoints, sharding
from stam_jax.configs import model_from_run_config, name_data_flags
from stam_jax.data.folder import ClassListError, DatasetError, VideoFolder, VideoItem
from stam_jax.data.loader import decode_train_item, ordered_map, worker_count
from stam_jax.data.prepared import PreparedError, list_root
from stam_jax.data.video import ClipSpec
from stam_jax.init import init_from_checkpoint, redraw_temporal_pos_embed
from stam_jax.interrupts import interrupts_held
from stam_jax.model import STAM
from stam_jax.paths import (
    made_and_claimed,
    missing_folders,
    unwritable,
    within_data,
)
from stam_jax.progress import progress_bar
from stam_jax.resume import (
    check_same_run,
    data_form,
    process_settings,
    truncate_log,
    write_run_record,
)
from stam_jax.train_eval import check_eval_root, periodic_eval
from stam_jax.train_step import (
    TrainConfigError,
    check_param_dtype,
    check_train_config,
    frozen_paths,
    frozen_summary,
    initial_state,
    loss_scaled,
    make_optimizer,
    make_train_step,
)
from stam_jax.variants import model_from_config, variant_name

KILL_HOOK = "STAM_TEST_KILL_AFTER_SAVE"  # tests: SIGKILL this process while a save is underway
# tests: "K:N:raise" or "K:N:kill": process K raises (or is SIGKILLed) as it starts step N
# (0: before the processes compare their initial params, nothing compiled for the step yet)
FAIL_HOOK = "STAM_TEST_FAIL_AT_STEP"


class TrainStopped(RuntimeError):
    """Training stopped partway, with the step; the checkpoints saved so far are intact."""


class NonFiniteError(TrainStopped):
    """The loss or the gradient went NaN/Inf; raised with the step number."""


class UnusableDataError(TrainStopped):
    """Most of the training videos seen so far could not be decoded or were too short."""


# The stop rule for failing videos: more than this share of at least this many videos seen.
_UNUSABLE_SHARE, _UNUSABLE_AFTER = 0.5, 32


class _Unusable:
    """The training videos that could not be used: each named once on stderr, listed in
    `WORKDIR/failed_videos.jsonl` (with several processes, each lists the videos it decoded in
    `failed_videos.process_K.jsonl`), and the run stopped when they are most of what it has
    seen (`_UNUSABLE_SHARE` of at least `_UNUSABLE_AFTER` videos): a folder of files that do
    not decode trains nothing."""

    def __init__(self, workdir: Path, start: int) -> None:
        name = "failed_videos.jsonl"
        if jax.process_count() > 1:
            name = f"failed_videos.process_{jax.process_index()}.jsonl"
        self.log = workdir / name
        # A resume keeps the rows of the steps up to its checkpoint (later ones are redone),
        # and does not name those videos again: the log is the uninterrupted run's. A video is
        # known by its path in the data root, so a resume from data moved elsewhere (the same
        # listing) does not name it again either; rows from before `video` was recorded by
        # their full path.
        self.named: set[str] = set()
        for line in truncate_log(self.log, start):
            row = json.loads(line)
            self.named.add(row.get("video", row["path"]))
        self.start, self.seen, self.used = start, 0, 0.0

    def add(self, step: int, path: str, item: Any, video: str | None = None) -> None:
        """Reports one video that failed at `step` (a `Decoded` with its status and reason):
        `path` in full, `video` in the data root (the folder listing's path)."""
        if (video or path) in self.named or path in self.named:
            return  # it fails again in every epoch: named once
        self.named.add(video or path)
        print(
            f"warning: step {step}: {path} skipped ({item.status}: {item.reason}); it will be "
            "skipped in every epoch.",
            file=sys.stderr,
            flush=True,
        )
        row = {"step": step, "path": path, "status": item.status, "reason": item.reason}
        if video is not None:
            row["video"] = video
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
    ) -> None:
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
        epoch, slot = self._slot(position)
        path = str(self.folder.root / self.folder.items[self.order(epoch)[slot]].path)
        return position, path, self.spec, (self.seed, epoch, slot)

    def _slot(self, position: int) -> tuple[int, int]:
        """The epoch of `position`, and its slot in that epoch's order."""
        step, row = divmod(position, self.local)
        epoch, k = divmod(step + self.start, self.per_epoch)
        return epoch, k * self.batch + jax.process_index() * self.local + row

    def _item(self, position: int) -> VideoItem:
        epoch, slot = self._slot(position)
        return self.folder.items[self.order(epoch)[slot]]

    def label(self, position: int) -> int:
        """The label of the video at `position`."""
        return self._item(position).label

    def video(self, position: int) -> str:
        """The path in the data root of the video at `position`."""
        return self._item(position).path


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


class _Board:
    """The loop's TensorBoard events (process 0), on disk before each checkpoint is saved.

    tensorboardX's `flush()` writes only what its writer thread has taken off its queue (the
    thread takes the rest within `flush_secs`, 120 s): a run killed after a save lost the
    events logged just before it for good, as the resumed run purges those after its
    checkpoint and logs none before it. So the writer is closed (which writes everything
    queued) before each save, and the next event opens a new file, named in order.
    """

    files = itertools.count()  # of this process, in the order they are made

    def __init__(self, logdir: Path, purge_step: int) -> None:
        self.logdir, self.purge_step, self.writer = logdir, purge_step, None
        _import_tensorboardx()  # now, before the loop, not at its first log

    def add(self, tag: str, value: float, step: int) -> None:
        """Logs scalar `value` of `tag` at `step`."""
        if self.writer is None:
            # Files made within one second would have one name (the second's), the later
            # overwriting the earlier: a suffix of this process and a count keeps them apart,
            # in the order they were made.
            suffix = f".{os.getpid()}.{next(_Board.files):06d}"
            self.writer = _summary_writer(self.logdir, self.purge_step, suffix)
            self.purge_step = None
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Writes every event logged so far to disk and closes the file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _import_tensorboardx() -> None:
    """Imports tensorboardX without importing PyTorch.

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


def _summary_writer(logdir: Path, purge_step: int | None, suffix: str = "") -> Any:
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch
    (`_import_tensorboardx`)."""
    _import_tensorboardx()
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir), purge_step=purge_step, filename_suffix=suffix)


class _Termination:
    """SIGTERM (a scheduler's preemption, `kill`) in a single-process run, once its training
    steps have begun (`steps_begun`): noted (`requested`), for the loop to save the step it is
    at and end. Before them, or after, it is taken as a Ctrl-C (SIGINT sent to this process,
    as the commands take it: `keep_interrupts`), which ends the run at once: nothing of it is
    lost that a save would keep.

    A multi-process run leaves the signal to jax.distributed's preemption notifier (which
    takes it over when the run joins), whose sync point every process reaches at the same
    step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.steps_begun = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.steps_begun:
            self.requested = True
        else:
            os.kill(os.getpid(), signal.SIGINT)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Termination]:
        """This handler for SIGTERM while the block runs (from the main thread only, where
        Python lets a handler be set; elsewhere SIGTERM keeps its action)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains `config`'s model on `config.train.root`, resuming from `workdir` if possible.

    Args:
      config: a run config (`configs/*.py`).
      workdir: output folder (checkpoints, metrics, final params).

    Returns:
      A summary: final step, the step it resumed from (0: a fresh start), last metrics,
      where the outputs are. A run told to end (SIGTERM: a scheduler's preemption, `kill`)
      saves the checkpoint of the step it is at and ends there, without final params, with
      `terminated` in the summary naming the signal. A single process acts on the signal
      once its training steps have begun (before them it is taken as a Ctrl-C); the
      processes of a multi-process run agree on the step through jax.distributed's
      preemption sync point (one told to end before the steps begin ends at the first).

    Raises:
      TrainConfigError: before any compute, for bad data, batch or optimizer settings, a
        bad model, seed or workdir, an initial checkpoint or teacher that cannot be used,
        a restart whose settings differ from the run in `workdir`, or a `workdir` another
        run is using (each process claims it for the run: `stam_jax.paths.claimed`).
      NonFiniteError: a NaN/Inf loss or gradient, with the step; checkpoints stay intact.
      UnusableDataError: more than half of at least 32 training videos seen could not be used.
    """
    with _Termination().installed() as termination, contextlib.ExitStack() as held:
        return _train_and_evaluate(config, workdir, held, termination)


def _train_and_evaluate(
    config: Any, workdir: str | Path, held: contextlib.ExitStack, termination: _Termination
) -> dict[str, Any]:
    """`train_and_evaluate`; the workdir's claim, once made, is held by `held`; SIGTERM is
    noted in `termination`."""
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
    for flag, root in (
        ("--config.train.root", train.root),
        ("--config.train.eval_root", train.eval_root),
    ):
        problem = within_data(workdir, root, flag)
        if problem:
            raise TrainConfigError(f"--workdir={workdir} {problem}.")
    try:
        model = model_from_run_config(config)
    except ValueError as e:  # an unknown variant, dtype or attention implementation
        raise TrainConfigError(str(e)) from None
    try:
        check_param_dtype(model)
    except TrainConfigError:
        half = config.param_dtype
        raise TrainConfigError(
            f"--config.param_dtype={half!r}: training keeps float32 params (with their "
            "optimizer state and EMA), as updates smaller than a half-precision rounding step "
            f"would be lost; use --config.param_dtype=float32 --config.dtype={half} to compute "
            f"in {half} on them (a {half} param_dtype is for run_eval.py)."
        ) from None
    if train.freeze:  # a name that matches no param is refused before the data is listed
        frozen_paths(train, checkpoints.abstract_params(model))
    dist = config.distributed
    try:
        sharding.check_distributed(*sharding.distributed_settings(dist))
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    # Found before the processes join: whichever creates the workdir, each then knows it new.
    missing = missing_folders(workdir)
    try:
        sharding.initialize_distributed(*sharding.distributed_settings(dist))
    except ValueError as e:  # no cluster to discover
        raise TrainConfigError(str(e)) from None
    # A refusal in one process is one in all (each would otherwise wait for the others' data),
    # and processes started with different settings are refused.
    with sharding.shared_refusals(TrainConfigError) as agree:
        try:  # first: everything compiled after it is cached
            sharding.enable_compilation_cache(config.compilation_cache_dir)
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
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
            local_batch = sharding.local_batch_size(config.batch_size, mesh, "--config.batch_size")
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        try:  # the periodic evaluation's batches hold a multiple of these frames
            model.frames_per_step(config.batch_size * model.num_frames)
        except ValueError as e:
            raise TrainConfigError(f"--config.frame_chunk: {e}") from None
        eval_folder = None  # the periodic evaluation's listing, when it is on
        if train.eval_every > 0:
            if not train.eval_root:
                raise TrainConfigError(
                    f"train.eval_every={train.eval_every} needs --config.train.eval_root=VAL_DIR "
                    "(or set train.eval_every=0)."
                )
            eval_folder = check_eval_root(config, model, folder.classes)
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
        # The workdir is claimed before its checkpoints are read: two runs in one workdir
        # would overwrite each other's checkpoints and logs. It is created now, and removed
        # again if the run is refused.
        flag = f"--workdir={workdir}"
        made_and_claimed(held, workdir, jax.process_index(), flag, TrainConfigError, missing)
        form = data_form(prepared)
        agree(functools.partial(process_settings, config, folder, form, eval_folder, teacher_host))
    workers = worker_count(config.data.workers)
    # A restart in the same workdir resumes from its last checkpoint: what it finds is read
    # (nothing is written) before the run is allowed to go on.
    has_checkpoints = (workdir / "checkpoints").is_dir()
    manager = _checkpoint_manager(workdir, train) if has_checkpoints else None
    start = (manager.latest_step() or 0) if manager else 0
    check_same_run(config, workdir, start, folder, data_form(prepared))

    video = np.zeros((1, model.num_frames, model.image_size, model.image_size, 3), np.uint8)
    # Every process starts from the same params (each places its own copy on its devices as
    # the replicated value): the same contents of --config.checkpoint, wherever each reads it
    # from, or the same step to resume from. A process that cannot read its checkpoint refuses
    # the run in all of them.
    params = None
    _fail_hook(0)
    with sharding.shared_refusals(TrainConfigError) as agree:
        if not start:
            params, report, listing = _initial_params(model, config, video)
        agree(lambda: {"the initial params": _initial_params_setting(config, start, params)})
    replicated = sharding.replicated(mesh)
    float16 = loss_scaled(model)
    if start:  # the params, optimizer state and EMA come from the checkpoint
        abstract = checkpoints.abstract_params(model)
        tx, schedule = make_optimizer(train, abstract)
        state = jax.eval_shape(lambda p: initial_state(model, tx, train, p), abstract)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        manager = manager or _checkpoint_manager(workdir, train)
        write_run_record(config, workdir, folder, data_form(prepared))
        if jax.process_index() == 0:
            (workdir / "init_report.txt").write_text(report + "\n" + listing)
            if config.checkpoint or train.freeze:
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
            clips.set_state(_data_position(restored["data"]["grain"], workers, workdir))
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
        make_train_step(model, tx, schedule, train, config.seed, model.num_classes, teacher),
        in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=sharding.compiler_options(config.triton_gemm),
    )
    if not loader:
        jobs = _Jobs(folder, spec, config.seed, config.batch_size, start, train.steps)
        decoded = ordered_map(decode_train_item, jobs, workers, prefetch)
    kill_at = int(os.environ.get(KILL_HOOK, "-1"))
    log = workdir / "metrics.jsonl" if jax.process_index() == 0 else None
    board = None
    if log:
        truncate_log(log, start)
        # purge_step: a resumed run hides the events logged after its checkpoint (TensorBoard
        # hides those of steps >= purge_step; the checkpoint's own step is not logged again),
        # and a run started again without one hides all of the earlier start's.
        board = _Board(workdir / "tensorboard", purge_step=start + 1)
    progress = progress_bar(
        train.steps, "train", "step", config.progress and jax.process_index() == 0, start
    )
    last: dict[str, float] = {}
    timer, timer_step = time.perf_counter(), start
    named: set[str] = set()  # videos the periodic evaluation skipped, named once
    skipped = 0
    unusable = _Unusable(workdir, start)

    def log_step(done: int, metrics: dict, since: float, since_step: int) -> dict[str, float]:
        """The row of step `done` (its metrics, and the rate since step `since_step`, timed
        from `since`), written to metrics.jsonl and TensorBoard by process 0."""
        elapsed = time.perf_counter() - since
        rate = (done - since_step) / elapsed if elapsed > 0 else 0.0
        row = {
            "step": done,
            **metrics,
            "steps_per_s": rate,
            "videos_per_s": rate * config.batch_size,
            "failed_videos": unusable.failed,
        }
        if float16:
            row["skipped_steps"] = skipped
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            for name, value in row.items():
                if name != "step":
                    board.add(f"train/{name}", value, done)
        return row

    terminated = False
    termination.steps_begun = jax.process_count() == 1
    try:
        for step in range(start, train.steps):
            _fail_hook(step + 1)
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
                        unusable.add(
                            step + 1, jobs[item.position][1], item, jobs.video(item.position)
                        )
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
            # Told to end: this step is logged and saved, and the run ends. The processes of a
            # run all reach jax's preemption sync point at the same step.
            terminated = done < train.steps and (
                termination.requested
                if jax.process_count() == 1
                else manager.reached_preemption(done)
            )
            logged = done % train.log_every == 0 or done == train.steps or terminated
            if logged:
                last = log_step(done, metrics, timer, timer_step)
                timer, timer_step = time.perf_counter(), done
            # A step told to end is not evaluated (it could take longer than a scheduler waits).
            evaluating = train.eval_every > 0 and not terminated
            if evaluating and (done % train.eval_every == 0 or done == train.steps):
                began = time.perf_counter()
                scores = periodic_eval(config, Path(workdir), model, state, done, named)
                if log:  # no video evaluated: top-1 is null (strict JSON), not NaN
                    scores = {k: v if math.isfinite(v) else None for k, v in scores.items()}
                    with open(log, "a") as f:
                        f.write(json.dumps({"step": done, **scores}, allow_nan=False) + "\n")
                    for name, value in scores.items():
                        if value is not None:
                            board.add(f"eval/{name}", value, done)
                # Evaluation time is not training time: the clock of the steps since the last
                # log skips it (restarted, it counted those steps over the time since this one).
                timer += time.perf_counter() - began
            # Told to end during this step's evaluation (one process): the step is logged and
            # saved now.
            if not terminated and done < train.steps and jax.process_count() == 1:
                terminated = termination.requested
                if terminated and not logged:
                    last = log_step(done, metrics, timer, timer_step)
            items = {"state": ocp.args.StandardSave(state)}
            saving = manager.should_save(done) or done == train.steps or terminated
            if loader and saving:
                # Every process's grain iterator position, taken now (the save itself is async).
                position = sharding.allgather_json(clips.get_state().decode())
                items["data"] = ocp.args.JsonSave({"grain": position})
            if board and saving:
                board.close()  # the events up to this checkpoint on disk before it is saved
            with interrupts_held():  # started whole, or not at all
                saved = manager.save(
                    done,
                    args=ocp.args.Composite(**items),
                    force=done == train.steps or terminated,
                )
            if saved and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die while the async save runs
            progress.update(1)
            if terminated:
                break
    except BaseException as error:
        # A collective broken by another process's failure ends this process now, saying so:
        # a save under way would wait for the other process forever.
        sharding.stop_if_another_failed(error)
        # A save under way is let finish: its checkpoint is whole, and orbax's threads do not
        # fail (printing pages of errors) in an interpreter that is shutting down.
        with contextlib.suppress(Exception):
            manager.wait_until_finished()
        raise
    finally:  # however the loop ends, the input's workers stop now and the log is closed
        termination.steps_begun = False
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
    summary = {"step": int(state.step), "resumed_from": start, "last_metrics": last}
    if terminated:  # what told it to end, as the command names it
        who = "SIGTERM" if jax.process_count() == 1 else "SIGTERM to a process of the run"
        return {**summary, "terminated": who}
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
    return {**summary, **outputs}


def _fail_hook(step: int) -> None:
    """Tests (`FAIL_HOOK`): this process raises, is SIGKILLed, or is sent SIGTERM (and goes
    on, 2 s later), as it starts `step`."""
    process, at, how = (os.environ.get(FAIL_HOOK) or "-1:-1:").split(":")
    if int(at) == step and jax.process_index() == int(process):
        if how == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            # The other processes learn of it from jax's coordination service; on a loaded
            # machine that once took longer than the steps left, and the run ran to its end
            # (exit 0: nothing lost, but not the stop a test means to see). They wait for this
            # process at the step's first collective meanwhile.
            time.sleep(2.0)
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"test hook {FAIL_HOOK}: process {process} fails")


def _data_position(saved: list[str], workers: int, workdir: Path) -> bytes:
    """This process's grain iterator state from a checkpoint's positions (one per process of
    the run that saved it), refused where the run reads with other process or worker counts.

    Each process's position counts its own rows of the global batches, read by its workers:
    under another process count (the rows per process change) or worker count it would
    resume elsewhere in the data, or fail.
    """
    processes = jax.process_count()
    if len(saved) != processes:
        raise TrainConfigError(
            f"the run in {workdir} read its prepared data as {len(saved)} process(es), this one "
            f"runs {processes}; resume with --config.distributed.num_processes={len(saved)} (the "
            "data position is saved per process), or export a step (python -m stam_jax.export) "
            "and start a new --workdir from it."
        )
    position = saved[jax.process_index()]
    was = json.loads(position)["worker_count"]
    if was != workers:
        raise TrainConfigError(
            f"the run in {workdir} read its data with {was} worker processes, this one "
            f"would use {workers}; resume with --config.data.workers={was} (the data "
            "position is saved per worker)."
        )
    return position.encode()


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


def _initial_params_setting(config: Any, start: int, params: Any) -> Any:
    """What the processes of a multi-process run compare of the params they start from: the
    step resumed from, or the initial params' checksum (with where they came from, shown)."""
    if start:
        return f"resumed from the checkpoint of step {start}"
    source = config.checkpoint or f"a fresh initialisation (--config.seed={config.seed})"
    checksum = sharding.tree_digest(params)
    return sharding.by_content(f"{source} (checksum {checksum})", checksum)


def _initial_params(model: STAM, config: Any, video: np.ndarray) -> tuple[Any, str, str]:
    """The params a run starts from, fresh (initialised on `video`, a batch of one) or from
    `config.checkpoint`; the report (printed, and the head of `init_report.txt`); and, from a
    checkpoint, the rest of that file: every tensor by name with where its value came from."""
    fresh = jax.jit(model.init)(jax.random.key(config.seed), video)["params"]
    std = config.train.temporal_pos_embed_std
    sources: dict[str, str] = {}
    if config.checkpoint:
        try:
            params, report = init_from_checkpoint(
                model, fresh, config.checkpoint, temporal_pos_embed_std=std, sources=sources
            )
        except (ValueError, OSError) as e:  # InitError, CheckpointError, unreadable ViT files
            raise TrainConfigError(f"--config.checkpoint={config.checkpoint}: {e}") from None
    else:
        params, report = fresh, ["no --config.checkpoint: every tensor freshly initialised"]
        if std > 0 and "aggregate" in params and "pos_embed" in params["aggregate"]:
            params = redraw_temporal_pos_embed(params, std)
            report.append(f"aggregate/pos_embed: drawn with std {std}")
    frozen = frozen_paths(config.train, params)
    if frozen:
        report.append(frozen_summary(config.train, params, frozen))
        # A frozen tensor that no checkpoint gave (a head re-initialised for another class
        # count, a new temporal transformer, no checkpoint at all) keeps its random values.
        loaded = ("copied", "resampled")
        random = sorted(
            "/".join(path)
            for path in frozen
            if not sources.get("/".join(path), "").startswith(loaded)
        )
        if random:
            shown = ", ".join(random[:3]) + (
                f" and {len(random) - 3} more" if len(random) > 3 else ""
            )
            report.append(
                f"warning: train.freeze holds {len(random)} tensors that no checkpoint gave "
                f"({shown}): they stay at their random initial values"
            )
    source = config.checkpoint or "fresh"
    name = variant_name(model) or "a custom STAM"
    listing = "".join(f"  {path}: {how}\n" for path, how in sorted(sources.items()))
    if listing:
        listing = "\nevery tensor, by name:\n" + listing
    return params, "\n".join([f"initialisation of {name} from {source}", *report]), listing
