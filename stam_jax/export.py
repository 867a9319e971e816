"""Params of any saved step of a training run, as a stam-jax checkpoint.

    python -m stam_jax.export RUN_DIR OUT_DIR [--step N] [--ema] [--force]

`run_train.py` writes `RUN_DIR/final` and `final_ema` at the end; during the run,
`RUN_DIR/checkpoints/N` hold the whole train state (params, optimizer state, EMA) for resuming.
This takes the params (or with `--ema` their EMA; not for a run with `train.ema_decay=0`) of
step N (default: the last complete one) out of that state into a checkpoint that `run_eval.py`,
`--config.checkpoint`, `convert.to_torch` and `stam_jax.explain` read: to evaluate a run
midway, or to start again from before it diverged. The architecture is the run's
(`RUN_DIR/run_config.json`). `RUN_DIR/checkpoints/N` may be given for RUN_DIR (then `--step` is
N). Exit status: 0 written, 2 refused (one `error:` line, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser


class ExportError(ValueError):
    """A run directory, step or output that cannot be exported; the message says what to do."""


# Orbax marks a step's folder as a finished save: with this file (0.12.8 and later, and on
# file systems without atomic renames), and with a commit time in its `_CHECKPOINT_METADATA`.
_COMMITTED = "commit_success.txt"


def _finished(folder: Path) -> bool:
    """Whether orbax finished writing the save in `folder` (either mark above)."""
    if (folder / _COMMITTED).is_file():
        return True
    try:
        metadata = json.loads((folder / "_CHECKPOINT_METADATA").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and bool(metadata.get("commit_timestamp_nsecs"))


def saved_steps(saved: Path) -> tuple[list[int], list[int]]:
    """(the complete saved steps, the step folders without orbax's mark of a finished save).

    Read from the folder, not through an orbax CheckpointManager: starting one deletes the
    unfinished saves it finds, which would be those of a run still training.
    """
    folders = [p for p in (saved.iterdir() if saved.is_dir() else ()) if p.name.isdigit()]
    finished = {int(p.name): _finished(p) for p in folders}  # one look at each folder
    complete = sorted(step for step, done in finished.items() if done)
    unfinished = sorted(step for step, done in finished.items() if not done)
    return complete, unfinished


def _some_steps(saved: Path, steps: list[int]) -> str:
    """'DIR/7 is' or 'DIR/N for N in [7, 9] are'."""
    if len(steps) == 1:
        return f"{saved / str(steps[0])} is"
    return f"{saved}/N for N in {steps} are"


def _others(complete: list[int], step: int) -> str:
    """What to do instead of reading `step`: the other complete steps to pass to --step."""
    others = [s for s in complete if s != step]
    if not others:
        return "the run has no other complete saved step to export."
    return f"export another saved step with --step N, N one of {others}."


def _run_and_step(run_dir: Path, step: int | None) -> tuple[Path, int | None]:
    """(the run directory, the step asked for) from RUN_DIR or RUN_DIR/checkpoints/N."""
    if run_dir.name.isdigit() and run_dir.parent.name == "checkpoints":
        named = int(run_dir.name)
        if step is not None and step != named:
            raise ExportError(f"{run_dir} is step {named}, but --step={step}; give one of them.")
        return run_dir.parent.parent, named
    return run_dir, step


def _run_record(run_dir: Path) -> dict[str, Any]:
    """The run's recorded settings (`RUN_DIR/run_config.json`, flattened: 'train.steps': 1000)."""
    from stam_jax.resume import RUN_RECORD

    if not run_dir.exists():
        raise ExportError(
            f"{run_dir} does not exist; pass the folder run_train.py wrote (its --workdir)."
        )
    if not run_dir.is_dir():
        raise ExportError(
            f"{run_dir} is a file, not a run directory; pass the folder run_train.py wrote (its "
            "--workdir)."
        )
    record_file = run_dir / RUN_RECORD
    if not record_file.is_file():
        what = "a run_train.py workdir" if (run_dir / "checkpoints").is_dir() else "a run"
        raise ExportError(
            f"{run_dir} has no {RUN_RECORD}, so the run's architecture is unknown: pass the "
            f"folder run_train.py wrote (--workdir), not {what} without one."
        )
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the run's architecture from {record_file}: {e}.") from None
    if not isinstance(record, dict):
        raise ExportError(
            f"cannot read the run's architecture from {record_file}: it holds a "
            f"{type(record).__name__}, not the run's settings (a JSON object, as run_train.py "
            "writes it); restore the file the run wrote."
        )
    return record


def _model(record: dict[str, Any], record_file: Path) -> Any:
    """The run's model (architecture only), from its run record."""
    from stam_jax.variants import create_model

    try:
        overrides = {
            key.split(".", 1)[1]: value
            for key, value in record.items()
            if key.startswith("model_overrides.") and value is not None
        }
        return create_model(record["model"], **overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read the run's architecture from {record_file}: {e}.") from None


def _check_outside_steps(run: Path, out_dir: str | Path) -> None:
    """Refuses an output inside `run/checkpoints`: orbax would take it for a saved step.

    A checkpoint written as `RUN_DIR/checkpoints/N` carries orbax's mark of a finished save, so
    the run would try to resume from it (and fail), and export would take it for the last step.

    Raises:
      ExportError: naming the output and the folder to keep it out of.
    """
    saved = (run / "checkpoints").resolve()
    out = Path(out_dir).resolve()
    if out == saved or saved in out.parents:
        where = "the folder" if out == saved else f"inside {run / 'checkpoints'},"
        raise ExportError(
            f"{Path(out_dir).absolute()} is {where} where the run keeps its saved training "
            "steps: a checkpoint there would be taken for one (the run could no longer resume); "
            f"write it outside, e.g. {run / 'exported'}."
        )


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    ema: bool = False,
    overwrite: bool = False,
) -> tuple[Path, int]:
    """Writes the params (or EMA params) of a saved step of a `run_train.py` run as a checkpoint.

    Args:
      run_dir: the run's workdir, or its `checkpoints/N` (then `step` is N).
      out_dir: the stam-jax checkpoint directory to write.
      step: the saved step; None: the last complete one.
      ema: the EMA of the params instead of the params.
      overwrite: replace `out_dir` if it is a stam-jax checkpoint (see `checkpoints.save`).

    Returns:
      (the checkpoint written, the step it holds).

    Raises:
      ExportError: no such run or step, an unfinished or damaged step, `ema` for a run that
        kept no EMA (`train.ema_decay=0`), naming what there is and what to do.
      checkpoints.CheckpointError: `out_dir` cannot or must not be written (checked first).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from stam_jax import checkpoints
    from stam_jax.resume import RUN_RECORD

    run, step = _run_and_step(Path(run_dir).absolute(), step)
    _check_outside_steps(run, out_dir)
    checkpoints.check_destination(out_dir, overwrite=overwrite)  # before the (long) read
    record = _run_record(run)
    model = _model(record, run / RUN_RECORD)
    if ema and record.get("train.ema_decay") == 0:
        raise ExportError(
            f"{run} kept no EMA of its params (train.ema_decay=0 in its {RUN_RECORD}), so "
            "there is none to export: drop --ema (ema=False from Python) to export the params."
        )
    saved = run / "checkpoints"
    complete, unfinished = saved_steps(saved)
    if step is None and not complete:
        raise ExportError(
            f"{run} has no complete saved training step (no {saved}/N that orbax marked "
            "finished"
            + (f"; {_some_steps(saved, unfinished)} unfinished" if unfinished else "")
            + "): export once the run has saved one (every train.save_every steps)."
        )
    if step is None:
        step = complete[-1]
    if step in unfinished:
        raise ExportError(
            f"{saved / str(step)} is not a complete saved step (orbax did not mark it finished: "
            "a save cut short, or a folder made by other means); " + _others(complete, step)
        )
    if step not in complete:
        raise ExportError(f"{run} has no saved step {step}; it has {complete}.")
    name = "ema_params" if ema else "params"
    folder = saved / str(step)
    state = folder / "state"  # the train state, in orbax's PyTree format
    checkpoints._quiet_abandoned_reads()  # orbax's noise after a failed read of a damaged state
    try:
        with ocp.PyTreeCheckpointer() as ckpt:
            stored = ckpt.metadata(state).item_metadata
            if not stored or name not in stored:
                raise ValueError(f"orbax finds no {name} in {state.name}/")
            wanted = {name: stored[name]}
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            restored = ckpt.restore(
                state,
                args=ocp.args.PyTreeRestore(
                    item=wanted, restore_args=as_numpy, partial_restore=True
                ),
            )
        params = restored[name]
    except MemoryError:
        raise
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
        raise ExportError(
            f"cannot read the {name} of step {step}: {folder} is damaged or incompletely "
            f"copied ({type(e).__name__}: {detail[:300]}); " + _others(complete, step)
        ) from None
    try:
        checkpoints.check_params(
            model,
            params,
            fix=f"{run / RUN_RECORD} does not describe this run's params: it was "
            "edited, or belongs to another run; put back the run's own record.",
        )
    except checkpoints.CheckpointError as e:
        raise ExportError(f"{folder} does not hold the run's model: {e}") from None
    metadata = {"source": str(folder), "step": step, "params": name}
    return checkpoints.save(out_dir, model, params, metadata=metadata, overwrite=overwrite), step


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = ArgumentParser(
        prog="python -m stam_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run_train.py workdir, or its checkpoints/N")
    parser.add_argument("out_dir", help="the stam-jax checkpoint directory to write")
    parser.add_argument("--step", type=int, help="the saved step (default: the last one)")
    parser.add_argument("--ema", action="store_true", help="the EMA of the params")
    parser.add_argument("--force", action="store_true", help="overwrite OUT_DIR")
    args = parser.parse_args(argv)
    for name, value in (("RUN_DIR", args.run_dir), ("OUT_DIR", args.out_dir)):
        if not value.strip():  # Path("") is the current directory
            parser.error(
                f"{name} is empty ({value!r}); give a folder's path (e.g. out/run1 for RUN_DIR, "
                "ckpt/finetuned for OUT_DIR), or '.' for the current directory."
            )
    from absl import logging

    from stam_jax.checkpoints import CheckpointError
    from stam_jax.interrupts import keep_interrupts

    keep_interrupts()
    logging.set_verbosity(logging.ERROR)  # orbax's notes on the train state's format
    try:
        path, step = export(
            args.run_dir, args.out_dir, step=args.step, ema=args.ema, overwrite=args.force
        )
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted: nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {path}: the {'EMA params' if args.ema else 'params'} of step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
