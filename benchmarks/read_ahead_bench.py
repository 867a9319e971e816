"""Reading processes on a prepared train dataset: records read ahead, and clips/s, with each
reading process's read buffer shared out of `prefetch` (as the library does) or of its own
(`prefetch` each), alternating in one run.

    python benchmarks/read_ahead_bench.py --videos 16 --workers 2 --prefetch 8 --clips 48

Writes `--videos` Kinetics-like H.264 videos (10 s, 30 fps, 340x256), prepares a JPEG `train`
dataset with the STAM-16 protocol, then, for each variant in turn (`--rounds` times), draws
`--clips` training clips through `reading.train_loader` with `--workers` reading processes and
counts the records read while the consumer holds one clip (each record is a video's frames).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from stam_jax.data.prepare import prepare
from stam_jax.data.prepared import PreparedDataset, open_prepared
from stam_jax.data.synthetic import write_index_video
from stam_jax.data.video import ClipSpec


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


def main() -> None:
    """Prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="s before counting reads")
    parser.add_argument("--frames", type=int, default=16, help="T of the clip spec")
    parser.add_argument("--frame-rate", type=float, default=1.6)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=340)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args()
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
        spec = ClipSpec(args.frames, args.frame_rate, resize=args.resize, crop=args.crop)
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
