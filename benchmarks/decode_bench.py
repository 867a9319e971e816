"""Raw-video input pipeline throughput (per core) and memory over a long run.

    python benchmarks/decode_bench.py --videos 12 --repeat 200 --workers 1
    python benchmarks/decode_bench.py --videos 8 --repeat 5 --compare-skipping --bframes forced
    python benchmarks/decode_bench.py --videos 8 --repeat 6 --workers 2 --compare-threads

Writes Kinetics-like test videos (10 s, 30 fps, 340x256, H.264; the size of the common
"Kinetics-400 scaled to 256" copies) and decodes them with the official STAM-16 protocol
(16 frames at 1.6 fps, resize 256, centre crop 224). Reports videos/s for `--workers` decoding
processes (videos/s per core = that / workers), and the consumer's RSS at the start and end of
a long stream (the file list repeated `--repeat` times), which stays flat when prefetch is bounded.

`--compare-skipping` instead times `load_views` in this process on each video twice in turn:
as it runs (the decoder skipping the non-reference frames the clip does not take) and with
every frame decoded in order (the official pipeline's way), `--repeat` rounds; it reports the
median milliseconds per video of each and their ratio, and checks the two give the same clips.

`--compare-threads` streams the videos (4 times over, timed from the first decoded) through
`--workers` decoding processes `--repeat` times, in turn with each video's decoder on the
processes' share of the cores (`loader.decoder_threads`, what the loaders use) and on FFmpeg's
default of one thread per core in every process, and reports the videos/s of each (the median
of the rounds) and their ratio.

`--bframes` sets how the videos are encoded: `default` leaves the frame types to x264 (on
these frames, 221 of 300 are B-frames, a third of those references: b-pyramid), `forced` puts a
B-frame in every slot x264 allows (3 between references), `none` writes no B-frame (nothing to
skip: what the skipping costs). The first video's frame types are reported.

`--workers` takes what `--config.data.workers` does: -1 is one decoding process per core, 0
decodes in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import clip_spec, even_side, number, whole, workers

from stam_jax.cli import ArgumentParser
from stam_jax.data import video
from stam_jax.data.loader import decode_in_order, decoder_threads, worker_count
from stam_jax.data.synthetic import index_frame, write_index_video, write_video
from stam_jax.data.video import ClipSpec

B_FRAMES = {
    "forced": {"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"},
    "none": {"x264-params": "bframes=0"},
}


def rss_mib() -> float:
    """Current resident set size of this process."""
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--videos", default=12, action=whole(1))
    parser.add_argument(
        "--repeat", default=1, action=whole(1), help="stream the list this many times"
    )
    parser.add_argument("--workers", default=1, action=workers(), help="-1: one per core")
    parser.add_argument("--frame-rate", default=1.6, action=number(0, what="frames per second"))
    parser.add_argument("--frames", default=16, action=whole(1))
    parser.add_argument("--height", default=256, action=even_side())
    parser.add_argument("--width", default=340, action=even_side())
    parser.add_argument("--resize", default=256, action=whole(1))
    parser.add_argument("--crop", default=224, action=whole(1))
    parser.add_argument("--bframes", choices=("default", "forced", "none"), default="default")
    parser.add_argument("--compare-skipping", action="store_true")
    parser.add_argument("--compare-threads", action="store_true")
    args = parser.parse_args(argv)
    spec = clip_spec(parser, args)
    args.workers = worker_count(args.workers)
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as workdir:
        paths = _videos(args, Path(workdir))
        if args.compare_skipping:
            _compare_skipping(args, paths, spec)
        elif args.compare_threads:
            _compare_threads(args, paths, spec)
        else:
            _measure(args, paths, spec)


def _videos(args: argparse.Namespace, workdir: Path) -> list[Path]:
    """10-s 30-fps H.264 index videos, their frame types as `--bframes` says."""
    if args.bframes == "default":
        return [
            write_index_video(workdir / f"v{i}.mp4", i, args.height, args.width)
            for i in range(args.videos)
        ]
    return [
        write_video(
            workdir / f"v{i}.mp4",
            (index_frame(j, args.height, args.width, seed=i) for j in range(300)),
            30,
            options=B_FRAMES[args.bframes],
        )
        for i in range(args.videos)
    ]


def _frame_types(path: Path) -> dict[str, int]:
    """How many I, P and B frames the stream has."""
    import av
    from av.video.frame import PictureType

    counts: dict[str, int] = {}
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            kind = PictureType(frame.pict_type).name
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _compare_skipping(args: argparse.Namespace, paths: list[Path], spec: ClipSpec) -> None:
    probe_stream = video.probe_stream

    def in_order(path: Path) -> video.Probed:  # no stamps: every frame decoded in order
        return dataclasses.replace(probe_stream(path), stamps=None)

    times: dict[str, list[float]] = {"skipping": [], "in_order": []}
    for _ in range(args.repeat):
        for path in paths:
            clips = {}
            for arm, probe in (("skipping", probe_stream), ("in_order", in_order)):
                video.probe_stream = probe
                start = time.perf_counter()
                clips[arm] = video.load_views(path, spec)
                times[arm].append(time.perf_counter() - start)
            video.probe_stream = probe_stream
            assert np.array_equal(clips["skipping"], clips["in_order"]), path
    ms = {arm: round(1000 * statistics.median(t), 2) for arm, t in times.items()}
    print(
        json.dumps(
            {
                "videos": len(paths),
                "rounds": args.repeat,
                "bframes": args.bframes,
                "frame_types_first_video": _frame_types(paths[0]),
                "skipping_stamps_found": probe_stream(paths[0]).stamps is not None,
                "median_ms_per_video": ms,
                "in_order_over_skipping": round(ms["in_order"] / ms["skipping"], 3),
            }
        )
    )


def _compare_threads(args: argparse.Namespace, paths: list[Path], spec: ClipSpec) -> None:
    share = decoder_threads(args.workers)
    rates: dict[str, list[float]] = {"share": [], "one_per_core": []}
    for _ in range(args.repeat):
        for arm, threads in (("share", share), ("one_per_core", 0)):
            # Timed from the first video decoded: the processes' start is not decoding.
            stream = decode_in_order(paths * 4, spec, args.workers, 2 * args.workers, threads)
            assert next(stream).status == "ok"
            start = time.perf_counter()
            assert all(decoded.status == "ok" for decoded in stream)
            rates[arm].append((4 * len(paths) - 1) / (time.perf_counter() - start))
    median = {arm: round(statistics.median(r), 2) for arm, r in rates.items()}
    print(
        json.dumps(
            {
                "videos": len(paths),
                "workers": args.workers,
                "rounds": args.repeat,
                "threads_per_decoder": {"share": share, "one_per_core": os.cpu_count()},
                "videos_per_s": median,
                "share_over_one_per_core": round(median["share"] / median["one_per_core"], 3),
            }
        )
    )


def _measure(args: argparse.Namespace, paths: list[Path], spec: ClipSpec) -> None:
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
