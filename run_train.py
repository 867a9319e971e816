"""Train or fine-tune STAM with optax (AdamW, distillation, EMA, exact resume).

    python run_train.py --config configs/stam_16.py --config.checkpoint=INIT_DIR \
        --config.data.root=TRAIN_DIR --workdir OUT_DIR

Not implemented yet: the training loop, augmentation and orbax train-state checkpoints land
with the training issue. Until then this script validates its flags and says so.
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
        f"run_train.py: training of {_CONFIG.value.model} is not implemented yet "
        "(it lands with the training issue). Today: python -m convert and "
        "stam_jax.checkpoints.load; see README.md.",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
