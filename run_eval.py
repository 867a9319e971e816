"""Evaluate a STAM checkpoint on a Kinetics-style video folder (the official protocol).

    python run_eval.py --config configs/stam_16.py --config.checkpoint=CKPT_DIR \
        --config.data.root=VAL_DIR --config.dtype=bfloat16 --workdir OUT_DIR

Not implemented yet: the video dataset, clip sampling and the data-parallel evaluation loop land
with the evaluation issue. Until then this script validates its flags and says so.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where results are written")


def main(argv: list[str]) -> None:
    """Entry point."""
    del argv
    print(
        f"run_eval.py: evaluation of {_CONFIG.value.model} is not implemented yet "
        "(it lands with the evaluation issue). Today: python -m convert and "
        "stam_jax.checkpoints.load; see README.md.",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
