"""Reading processes on a prepared train dataset: records read ahead, and clips/s, with each
reading process's read buffer shared out of `prefetch` (as the library does) or of its own
(`prefetch` each), alternating in one run.

    python benchmarks/read_ahead_bench.py --videos 16 --workers 2 --prefetch 8 --clips 48

Writes `--videos` Kinetics-like H.264 videos (10 s, 30 fps, 340x256), prepares a JPEG `train`
dataset with the STAM-16 protocol, then, for each variant in turn (`--rounds` times), draws
`--clips` training clips through `reading.train_loader` with `--workers` reading processes and
counts the records read while the consumer holds one clip (each record is a video's frames).
`--workers` takes what `--config.data.workers` does (-1: one reading process per core, 0: read
in this process).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from _args import clip_spec, even_side, number, whole, workers

from stam_jax.cli import ArgumentParser
from stam_jax.data.loader import worker_count
from stam_jax.data.prepare import prepare
from stam_jax.data.prepared import PreparedDataset, open_prepared
from stam_jax.data.synthetic import write_index_video


class _Counted:
    """A data source that appends each record it reads to a file (from any process)."""

    def __init__(self, source, log: Path) -> None:
        self.source, self.log = source, log

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return self.source[i]


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--videos", default=16, action=whole(1))
    parser.add_argument("--workers", default=2, action=workers(), help="-1: one per core")
    parser.add_argument(
        "--prefetch", default=8, action=whole(0), help="records read ahead (--config.data.prefetch)"
    )
    parser.add_argument("--clips", default=48, action=whole(1))
    parser.add_argument("--rounds", default=3, action=whole(1))
    parser.add_argument(
        "--settle",
        default=3.0,
        action=number(0, inclusive=True, what="seconds"),
        help="s before counting reads",
    )
    parser.add_argument("--frames", default=16, action=whole(1), help="T of the clip spec")
    parser.add_argument("--frame-rate", default=1.6, action=number(0, what="frames per second"))
    parser.add_argument("--height", default=256, action=even_side())
    parser.add_argument("--width", default=340, action=even_side())
    parser.add_argument("--resize", default=256, action=whole(1))
    parser.add_argument("--crop", default=224, action=whole(1))
    args = parser.parse_args(argv)
    spec = clip_spec(parser, args)
    args.workers = worker_count(args.workers)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags
    import grain

    from stam_jax.data import reading

    shared = reading._buffers

    def own(prefetch: int, workers: int) -> dict:
        """The library's buffers with a read buffer of the whole prefetch in each process."""
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(prefetch, 1))
        return {**shared(prefetch, workers), "read_options": options}

    variants = {"shared": shared, "own": own}
    with tempfile.TemporaryDirectory(prefix="read_ahead_bench_") as tmp:
        work = Path(tmp)
        for i in range(args.videos):
            path = work / "src" / f"class_{i % 4}" / f"v{i}.mp4"
            write_index_video(path, i, args.height, args.width)
        prepare(
            work / "src",
            work / "train",
            spec,
            kind="train",
            encoding="jpeg",
            workers=0,
            progress=False,
        )
        data_source = PreparedDataset.data_source
        results: dict = {name: {"ahead": [], "clips_per_s": []} for name in variants}
        for r in range(args.rounds):
            for name, options in variants.items():
                log = work / f"reads_{name}_{r}"
                log.touch()
                reading._buffers = options
                PreparedDataset.data_source = lambda self, log=log: _Counted(data_source(self), log)
                try:
                    dataset = open_prepared(work / "train")
                    clips = iter(
                        reading.train_loader(dataset, spec, 0, 1, args.workers, args.prefetch)
                    )
                    next(clips)
                    time.sleep(args.settle)
                    results[name]["ahead"].append(len(log.read_text().split()) - 1)
                    start = time.perf_counter()
                    for _ in range(args.clips):
                        next(clips)
                    seconds = time.perf_counter() - start
                    results[name]["clips_per_s"].append(round(args.clips / seconds, 2))
                    reading.close(clips)
                finally:
                    reading._buffers = shared
                    PreparedDataset.data_source = data_source
    for name in variants:
        results[name]["median_clips_per_s"] = statistics.median(results[name]["clips_per_s"])
    results["speed_shared_over_own"] = round(
        results["shared"]["median_clips_per_s"] / results["own"]["median_clips_per_s"], 3
    )
    results["args"] = vars(args)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
