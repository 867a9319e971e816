r"""Evaluate a STAM checkpoint on a Kinetics-style video folder with the official protocol.

    python run_eval.py --config configs/stam_16.py --config.checkpoint=CKPT_DIR \
        --config.data.root=VAL_DIR --config.dtype=bfloat16 --workdir OUT_DIR

Writes OUT_DIR/results.json and OUT_DIR/predictions.jsonl. Exit status: 0 when every video was
evaluated, 2 when the run is refused before any compute, with one `error: ...` line saying why
(a bad flag or config value, checkpoint, data root or workdir), 3 when it finished but some
videos were skipped (too short, undecodable, or NaN/Inf logits: listed in results.json), 1
when it stopped on an error (one `error: ...` line when the cause is known: decoding processes
that cannot be started; a traceback otherwise), 5 in a multi-process run when another process
failed (its error is named) or was killed, 130 interrupted (Ctrl-C, or SIGTERM). The results
of the videos evaluated so far are kept in OUT_DIR/partial as the run goes: the same command,
after a Ctrl-C, a crash or a killed machine, evaluates only the videos left (with other
settings it is refused; delete that folder to start again).
"""

from __future__ import annotations

import sys
from pathlib import Path

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
_WORKDIR = flags.DEFINE_string("workdir", None, "the folder results are written to")


def main(argv: list[str]) -> None:
    """Entry point."""
    del argv
    keep_interrupts()
    if not flags.FLAGS["verbosity"].present:  # keep orbax's INFO lines out of the report
        logging.set_verbosity(logging.WARNING)
    try:
        sys.exit(_evaluate())
    except KeyboardInterrupt as e:  # the decoding processes have already been ended
        print(_interrupted(_WORKDIR.value), file=sys.stderr)
        exit_interrupted(e, EXIT_INTERRUPTED)


def _interrupted(workdir: str) -> str:
    """The line that says what an interrupted run left: results to resume from, or none."""
    return f"interrupted: {_left(workdir)}"


def _left(workdir: str) -> str:
    """What a run that stopped early left: the results kept to resume from, or none."""
    try:
        with interrupts_held():  # it imports JAX, if the interrupt came before evaluate did
            from stam_jax.partial import PARTIAL, kept_count

        kept = kept_count(Path(workdir) / PARTIAL)
    except Exception:  # the line must come whatever the folder holds
        kept = 0
    if not kept:
        return "no results were kept yet; the same command starts again."
    return (
        f"the results of {kept} videos are kept in {Path(workdir) / PARTIAL}; run the same "
        "command again to evaluate the others (results.json comes at the end)."
    )


def _evaluate() -> int:
    with interrupts_held():
        from stam_jax.data.loader import DecoderStartError
        from stam_jax.evaluate import EXIT_SKIPPED, EvalConfigError, evaluate
        from stam_jax.sharding import stop_together

    def status(error: BaseException) -> int:  # the one mapping of errors to exit statuses
        if isinstance(error, EvalConfigError):
            return EXIT_REFUSED
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else 1

    try:
        # One process fails: all stop, saying why. A Ctrl-C is one however it comes.
        with stop_together(status, EXIT_PEER_FAILED), interrupts_unwrapped():
            results = evaluate(_CONFIG.value, _WORKDIR.value)
    except EvalConfigError as e:  # a refusal before any compute
        print(f"error: {e}", file=sys.stderr)
        sys.exit(status(e))
    except DecoderStartError as e:  # the system cannot start processes: its message says why
        print(stopped(e, _left(_WORKDIR.value)), file=sys.stderr)
        sys.exit(status(e))
    counts = results["counts"]
    skipped = counts["dropped_too_short"] or counts["failed"] or counts["non_finite"]
    return EXIT_SKIPPED if skipped else 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
