"""The cost of resumable evaluation: keeping each batch's results, and reading them back.

    python benchmarks/partial_bench.py --batch 32 --classes 400 --videos 20000

`evaluate` appends every finished batch's results to `WORKDIR/partial` (`stam_jax.partial`),
from the loop that feeds the device. This times, in a temporary folder:

- `append_ms`: the median time of one `Journal.add` of `--batch` videos' logits and scores
  (`--classes` each), what the loop spends per batch;
- `bytes_per_video`: the size kept per video;
- `read_s`: `read_kept` of `--videos` kept videos, what a resumed run spends before its first
  batch (Kinetics-400 validation has about 20,000 videos).

Compare `append_ms` with a batch's forward time (BENCHMARKS.md). Needs numpy and jax.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import whole

from stam_jax.cli import ArgumentParser
from stam_jax.partial import Journal, read_kept, record_dtype


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--batch", default=32, action=whole(1))
    parser.add_argument("--classes", default=400, action=whole(1))
    parser.add_argument("--videos", default=20000, action=whole(1))
    args = parser.parse_args(argv)
    settings = {"--config.dtype": "float32"}
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(args.batch, args.classes)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "partial"
        journal = Journal(folder, 0, args.classes, lambda: settings)
        times, done = [], 0
        while done < args.videos:
            n = min(args.batch, args.videos - done)
            positions = np.arange(done, done + n)
            start = time.perf_counter()
            journal.add(positions, logits[:n], logits[:n], {})
            times.append(time.perf_counter() - start)
            done += n
        start = time.perf_counter()
        kept = read_kept(folder, 0, 1, args.classes, lambda: settings, "--workdir=w", done)
        read_s = time.perf_counter() - start
        assert kept.positions.size == args.videos
    print(
        json.dumps(
            {
                "batch": args.batch,
                "classes": args.classes,
                "videos": args.videos,
                "append_ms": round(1e3 * statistics.median(times), 4),
                "bytes_per_video": record_dtype(args.classes).itemsize,
                "read_s": round(read_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
