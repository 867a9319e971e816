"""What importing TensorBoard's writer costs a training start, with and without PyTorch.

    python benchmarks/tensorboard_import.py --repeats 5

tensorboardX imports torch whenever it is installed; `stam_jax.train` imports it without
(`_summary_writer`). Each run is a fresh process that first imports `stam_jax.train` (jax,
flax, optax, orbax: what a training start has loaded by then), then times only the import and
the opening of a writer. The two ways alternate, so that drift on a shared machine hits both.
Prints one JSON line: the median seconds of each and their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _args import whole

from stam_jax.cli import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent

TIMED = """
import sys, time
from pathlib import Path
import stam_jax.train as train
start = time.perf_counter()
if sys.argv[1] == "with_torch":
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(sys.argv[2])
else:
    writer = train._summary_writer(Path(sys.argv[2]), None)
seconds = time.perf_counter() - start
writer.close()
print(seconds, "torch" in sys.modules)
"""

WAYS = ("with_torch", "stam_jax")


def main(argv: list[str] | None = None) -> None:
    """Runs the comparison and prints the JSON line."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", default=5, action=whole(1), help="processes per way")
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    torch_loaded: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as logs:
        for repeat in range(args.repeats):
            for way in WAYS:
                result = subprocess.run(
                    [sys.executable, "-c", TIMED, way, f"{logs}/{way}_{repeat}"],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                value, loaded = result.stdout.split()[-2:]
                seconds[way].append(float(value))
                torch_loaded[way] = loaded == "True"
    median = {way: round(statistics.median(values), 3) for way, values in seconds.items()}
    print(
        json.dumps(
            {
                "repeats": args.repeats,
                "median_s": median,
                "torch_imported": torch_loaded,
                "saved_s": round(median["with_torch"] - median["stam_jax"], 3),
                "ratio": round(median["with_torch"] / median["stam_jax"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
