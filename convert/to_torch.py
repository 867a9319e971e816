"""`python -m convert.to_torch CKPT_DIR OUT.pth`: stam-jax checkpoint -> official `.pth`."""

from __future__ import annotations

import sys

from convert import TORCH_DTYPES
from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser
from stam_jax.interrupts import interrupts_held, keep_interrupts


def main(argv: list[str] | None = None) -> int:
    """Runs the exporter CLI; returns the exit status (0 ok, 2 refused input, 130 interrupted)."""
    parser = ArgumentParser(  # a bad command line: one error line, exit 2
        prog="python -m convert.to_torch",
        description="Write a stam-jax checkpoint as an official STAM {'model': state_dict} .pth, "
        "loadable by the official code.",
    )
    parser.add_argument("ckpt_dir", help="stam-jax checkpoint directory")
    parser.add_argument("out_pth", help=".pth file to write")
    parser.add_argument(
        "--dtype",
        choices=TORCH_DTYPES,
        help="tensor dtype (default: the dtype the checkpoint was converted from, else float32)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUT.pth if it exists")
    args = parser.parse_args(argv)
    keep_interrupts()
    interrupted = "interrupted: the .pth was not written."
    try:
        with interrupts_held():  # a Ctrl-C inside JAX's import would abort the process
            from convert.core import ConversionError, export_checkpoint
            from stam_jax.checkpoints import CheckpointError
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        path, dtype, notes = export_checkpoint(
            args.ckpt_dir, args.out_pth, dtype=args.dtype, overwrite=args.force
        )
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:  # what was being written is removed or never renamed into place
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    for note in notes:
        print(note, file=sys.stderr)
    print(f"wrote {path} ({dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
