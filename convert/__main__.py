"""`python -m convert PATH.pth OUT_DIR`: official STAM checkpoint -> stam-jax checkpoint."""

from __future__ import annotations

import sys
import time

from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser
from stam_jax.interrupts import interrupts_held, keep_interrupts


def main(argv: list[str] | None = None) -> int:
    """Runs the converter CLI; returns the exit status (0 ok, 2 refused input, 130 interrupted)."""
    parser = ArgumentParser(  # a bad command line: one error line, exit 2
        prog="python -m convert",
        description="Convert an official STAM .pth (stam_16.pth, stam_64.pth) into a stam-jax "
        "checkpoint directory holding the Flax params and the model config.",
    )
    parser.add_argument("pth", help="official checkpoint file")
    parser.add_argument("out_dir", help="checkpoint directory to create")
    parser.add_argument("--strict", action="store_true", help="refuse unexpected keys")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR if it is a stam-jax checkpoint holding nothing else, or empty",
    )
    parser.add_argument("--num-heads", type=int, help="ViT heads (default: width / 64)")
    parser.add_argument("--temporal-heads", type=int, help="temporal heads (default: 8)")
    parser.add_argument("--num-frames", type=int, help="T, for mean-aggregate checkpoints only")
    args = parser.parse_args(argv)

    keep_interrupts()
    start = time.perf_counter()
    interrupted = "interrupted: nothing was written (a checkpoint already there is kept)."
    try:
        with interrupts_held():  # a Ctrl-C inside JAX's import would abort the process
            from convert.core import ConversionError, convert_checkpoint
            from stam_jax.checkpoints import CheckpointError
            from stam_jax.variants import model_from_config, variant_name
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        path, config, report = convert_checkpoint(
            args.pth,
            args.out_dir,
            strict=args.strict,
            overwrite=args.force,
            num_heads=args.num_heads,
            temporal_heads=args.temporal_heads,
            num_frames=args.num_frames,
        )
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:  # what was being written is removed or never renamed into place
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    for warning in report.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    name = variant_name(model_from_config(config)) or "custom"
    print(f"model: {name} {config}")
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
