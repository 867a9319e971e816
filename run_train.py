r"""Train or fine-tune STAM with optax; resumes from WORKDIR automatically.

    python run_train.py --config configs/stam_16.py --config.checkpoint=INIT_DIR \
        --config.train.root=TRAIN_DIR --workdir OUT_DIR

Writes OUT_DIR/metrics.jsonl, OUT_DIR/checkpoints/ (the train state, for resuming) and at the
end OUT_DIR/final and OUT_DIR/final_ema (stam-jax checkpoints for run_eval.py; no final_ema
with train.ema_decay=0). Exit status: 0 done, 2 refused before any compute, 4 stopped on a
non-finite loss or gradient or on training videos that mostly cannot be used, 1 stopped on an
error (one `error: ...` line when the cause is known: decoding processes that cannot be
started; a traceback otherwise), 5 in a multi-process run when another process failed (its
error is named) or was killed, 130 interrupted (Ctrl-C), 143 told to end (SIGTERM: a scheduler's
preemption, `kill`; once training steps have begun, the step it was at is saved first, in every
process of a multi-process run). After a stop or an interruption the checkpoints are kept, and
the same command resumes from the last one.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from stam_jax.cli import (
    EXIT_INTERRUPTED,
    EXIT_PEER_FAILED,
    EXIT_REFUSED,
    parse_flags,
    stopped,
)
from stam_jax.interrupts import (
    exit_interrupted,
    interrupts_held,
    interrupts_unwrapped,
    keep_interrupts,
)

# JAX and the rest are imported in main(): the decoding processes (spawned) import this module
# too, and would each spend about 2 s importing JAX and Flax they never use.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "the run config file, e.g. configs/stam_16.py", lock_config=True
)
_EXIT_STOPPED = 4  # a non-finite loss or gradient, or unusable training videos
_EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it ended
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "the folder of the run: checkpoints, metrics, final params"
)


def main(argv: list[str]) -> None:
    """Entry point."""
    del argv
    keep_interrupts()
    if not flags.FLAGS["verbosity"].present:  # keep orbax's INFO lines out of the output
        logging.set_verbosity(logging.WARNING)
    try:
        _train()
    except KeyboardInterrupt as e:
        print(_interrupted(_WORKDIR.value), file=sys.stderr)
        exit_interrupted(e, EXIT_INTERRUPTED)


def _interrupted(workdir: str) -> str:
    """The line that says what an interrupted run left: checkpoints to resume from, or none."""
    return f"interrupted: {_left(workdir)}"


def _left(workdir: str) -> str:
    """What a run that stopped early left: checkpoints to resume from, or none."""
    kept = (
        f"the checkpoints in {workdir}/checkpoints are kept; run the same command again to "
        "resume from the last one."
    )
    try:
        from pathlib import Path

        from stam_jax.export import saved_steps

        complete, _ = saved_steps(Path(workdir) / "checkpoints")
    except Exception:  # the line must come whatever the folder holds
        return kept
    if complete:
        return kept
    return (
        f"no checkpoint was saved yet (none in {workdir}/checkpoints); the same command starts "
        "the run again."
    )


def _train() -> None:
    with interrupts_held():
        from stam_jax.data.loader import DecoderStartError
        from stam_jax.sharding import stop_together
        from stam_jax.train import TrainConfigError, TrainStopped, train_and_evaluate

    def status(error: BaseException) -> int:  # the one mapping of errors to exit statuses
        if isinstance(error, TrainConfigError):
            return EXIT_REFUSED
        if isinstance(error, TrainStopped):  # a non-finite loss, or videos that cannot be used
            return _EXIT_STOPPED
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else 1

    try:
        # One process fails: all stop, saying why. A Ctrl-C is one however it comes.
        with stop_together(status, EXIT_PEER_FAILED), interrupts_unwrapped():
            summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (TrainConfigError, TrainStopped) as e:  # a refusal, or a stop: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(status(e))
    except DecoderStartError as e:  # the system cannot start processes: its message says why
        print(stopped(e, _left(_WORKDIR.value)), file=sys.stderr)
        sys.exit(status(e))
    resumed = f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else ""
    if summary.get("terminated"):
        print(
            f"terminated ({summary['terminated']}) at step {summary['step']}{resumed}: its "
            f"checkpoint is saved in {_WORKDIR.value}/checkpoints; run the same command again "
            "to resume from it.",
            file=sys.stderr,
        )
        sys.exit(_EXIT_TERMINATED)
    print(f"trained to step {summary['step']}{resumed}; final params in {summary.get('final')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)  # a bad flag: one `error:` line, exit 2
