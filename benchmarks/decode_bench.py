"""Raw-video input pipeline throughput (per core) and memory over a long run.

    python benchmarks/decode_bench.py --videos 12 --repeat 200 --workers 1

Writes Kinetics-like test videos (10 s, 30 fps, 340x256, H.264; the size of the common
"Kinetics-400 scaled to 256" copies) and decodes them with the official STAM-16 protocol
(16 frames at 1.6 fps, resize 256, centre crop 224). Reports videos/s for `--workers` decoding
processes (videos/s per core = that / workers), and the consumer's RSS at the start and end of
a long stream (the file list repeated `--repeat` times), which stays flat when prefetch is bounded.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from stam_jax.data.loader import decode_in_order
from stam_jax.data.synthetic import write_index_video
from stam_jax.data.video import ClipSpec


def rss_mib() -> float:
    """Current resident set size of this process."""
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    """Prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=1, help="stream the list this many times")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--frame-rate", type=float, default=1.6)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=340)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as workdir:
        _measure(args, Path(workdir))


def _measure(args: argparse.Namespace, workdir: Path) -> None:
    paths = [
        write_index_video(workdir / f"v{i}.mp4", i, args.height, args.width)
        for i in range(args.videos)
    ]
    spec = ClipSpec(args.frames, args.frame_rate, resize=args.resize, crop=args.crop)
    stream = paths * args.repeat
    start, first_rss, count = time.perf_counter(), None, 0
    for decoded in decode_in_order(stream, spec, args.workers, prefetch=2 * max(args.workers, 1)):
        assert decoded.status == "ok", decoded.reason
        count += 1
        if count == len(paths):
            first_rss = rss_mib()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "videos": count,
                "workers": args.workers,
                "seconds": round(seconds, 2),
                "videos_per_s": round(count / seconds, 2),
                "videos_per_s_per_worker": round(count / seconds / max(args.workers, 1), 2),
                "rss_after_first_pass_MiB": round(first_rss or 0),
                "rss_end_MiB": round(rss_mib()),
                "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
