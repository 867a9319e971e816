"""Input pipeline per core: decoding videos vs reading a prepared dataset, side by side.

    python benchmarks/prepared_bench.py --videos 24 --repeat 3

Writes `--videos` Kinetics-like H.264 videos (10 s, 30 fps, 340x256), prepares them with the
STAM-16 protocol (16 frames at 1.6 fps, resize 256, crop 224) as `eval` and `train` datasets
(raw and JPEG each), then, with the whole process pinned to ONE core, measures videos/s
of: decoding the files (the raw-video evaluation path), reading each prepared eval dataset
(the model inputs, through grain as run_eval.py reads it) and drawing training clips from the
train dataset (the files' path vs the prepared one). Ratios are against decoding, in this run.

With `--check-ckpt CKPT --check-src VAL_DIR --check-config CONFIG` it also evaluates a trained
checkpoint on VAL_DIR from the videos and from both prepared encodings and reports how many
top-1 predictions agree and whether raw logits are bit-identical (the three go together;
`--check-only` needs them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import clip_spec, even_side, existing, number, whole, workers

from stam_jax.cli import ArgumentParser
from stam_jax.data.loader import decode_in_order, decode_train_item
from stam_jax.data.prepare import prepare
from stam_jax.data.prepared import open_prepared
from stam_jax.data.synthetic import write_index_video
from stam_jax.data.video import ClipSpec

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, int]:
    """(seconds, items) of fn(), which returns how many items it produced."""
    start = time.perf_counter()
    count = fn()
    return time.perf_counter() - start, count


CHECK_FLAGS = ("--check-ckpt", "--check-src", "--check-config")


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--videos", default=24, action=whole(1))
    parser.add_argument(
        "--repeat", default=3, action=whole(1), help="read the prepared data N times"
    )
    parser.add_argument("--frames", default=16, action=whole(1))
    parser.add_argument("--frame-rate", default=1.6, action=number(0, what="frames per second"))
    parser.add_argument("--height", default=256, action=even_side())
    parser.add_argument("--width", default=340, action=even_side())
    parser.add_argument("--resize", default=256, action=whole(1))
    parser.add_argument("--crop", default=224, action=whole(1))
    parser.add_argument("--check-ckpt", default="", action=existing("folder"))
    parser.add_argument("--check-src", default="", action=existing("folder"))
    parser.add_argument("--check-config", default="", action=existing("file"))
    parser.add_argument("--check-only", action="store_true", help="skip the throughput part")
    parser.add_argument(
        "--check-workers",
        default=None,
        action=workers(),
        help="decoding processes of the check's prepare and run_eval.py (-1: one per core; "
        "default: theirs)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile JPEG training clips (one core)"
    )
    args = parser.parse_args(argv)
    given = [args.check_ckpt, args.check_src, args.check_config]
    if any(given) and not all(given):
        missing = [flag for flag, value in zip(CHECK_FLAGS, given, strict=True) if not value]
        parser.error(f"the check needs {', '.join(CHECK_FLAGS)} together; add {', '.join(missing)}")
    if args.check_only and not all(given):
        parser.error(f"--check-only needs {', '.join(CHECK_FLAGS)}")
    clip_spec(parser, args)
    with tempfile.TemporaryDirectory(prefix="prepared_bench_") as work:
        _measure(args, Path(work))


def _measure(args: argparse.Namespace, work: Path) -> None:
    if args.check_only:
        print(json.dumps({"agreement": check(args, work)}, indent=1))
        return
    src = work / "videos"
    for i in range(args.videos):
        write_index_video(src / f"class_{i % 4}" / f"video_{i}.mp4", i, args.height, args.width)
    spec = ClipSpec(args.frames, args.frame_rate, resize=args.resize, crop=args.crop)
    paths = sorted(src.rglob("*.mp4"))
    results: dict = {"videos": args.videos, "spec": spec.__dict__}

    prepare_s = {}
    for name, kind, encoding in [
        ("eval_raw", "eval", "raw"),
        ("eval_jpeg", "eval", "jpeg"),
        ("train_jpeg", "train", "jpeg"),
        ("train_raw", "train", "raw"),
    ]:
        start = time.perf_counter()
        prepare(src, work / name, spec, kind=kind, encoding=encoding, workers=0, progress=False)
        prepare_s[name] = time.perf_counter() - start
    results["prepare_videos_per_s_one_core"] = {
        k: round(args.videos / v, 2) for k, v in prepare_s.items()
    }
    results["dataset_MiB"] = {
        name: round(sum(p.stat().st_size for p in (work / name).iterdir()) / 2**20, 1)
        for name in prepare_s
    }

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core from here on
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags
    from stam_jax.data import reading

    def decode_files() -> int:
        return sum(d.status == "ok" for d in decode_in_order(paths, spec, 0, 2))

    def read_eval(name: str):
        # The repeats in one reading: ending one runs a garbage collection (to free grain's
        # shared memory; about 0.1 s in this process), which once per pass of these few videos
        # halved the rate measured (2026-12-03). A real run ends its reading once.
        def go() -> int:
            dataset = open_prepared(work / name)
            records = np.tile(np.arange(dataset.num_records), args.repeat)
            items = reading.eval_items(dataset, 0, 4, 0, 1, records)
            return sum(item.views.shape[0] > 0 for item in items)

        return go

    def train_files() -> int:
        for i, path in enumerate(paths):
            assert decode_train_item(i, str(path), spec, (0, i)).status == "ok"
        return len(paths)

    def train_prepared(name: str):
        def go() -> int:
            clips = iter(reading.train_loader(open_prepared(work / name), spec, 0, 1, 0, 4))
            n = args.videos * args.repeat
            for _ in range(n):
                next(clips)
            return n

        return go

    rates = {}
    for name, fn in [
        ("decode_videos", decode_files),
        ("read_eval_raw", read_eval("eval_raw")),
        ("read_eval_jpeg", read_eval("eval_jpeg")),
        ("train_clips_from_videos", train_files),
        ("train_clips_from_train_jpeg", train_prepared("train_jpeg")),
        ("train_clips_from_train_raw", train_prepared("train_raw")),
    ]:
        seconds, count = timed(fn)
        rates[name] = count / seconds
    results["videos_per_s_one_core"] = {k: round(v, 2) for k, v in rates.items()}
    results["ratio_vs_decoding"] = {
        "read_eval_raw": round(rates["read_eval_raw"] / rates["decode_videos"], 1),
        "read_eval_jpeg": round(rates["read_eval_jpeg"] / rates["decode_videos"], 1),
        **{
            name: round(rates[name] / rates["train_clips_from_videos"], 1)
            for name in ("train_clips_from_train_jpeg", "train_clips_from_train_raw")
        },
    }
    if args.profile:
        results["profile_train_jpeg"] = profile_train_jpeg(work / "train_jpeg", spec, args.repeat)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if args.check_ckpt:
        results["agreement"] = check(args, work)
    print(json.dumps(results, indent=1))


def profile_train_jpeg(path: Path, spec: ClipSpec, repeat: int) -> dict:
    """Where a JPEG training clip's time goes: PIL's JPEG decoding, its resize, the rest."""
    import cProfile
    import pstats

    from stam_jax.data.prepared import train_clip

    source = open_prepared(path).data_source()
    records = [source[i] for i in range(len(source))] * repeat
    rng = np.random.default_rng(0)
    profiler = cProfile.Profile()
    profiler.enable()
    for record in records:
        train_clip(record, "jpeg", spec, rng)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, _)
    total = sum(row[2] for row in stats.values())

    def seconds(name: str) -> float:
        return sum(row[2] for key, row in stats.items() if key[2] == name)

    decode = seconds("<method 'decode' of 'ImagingDecoder' objects>")
    resize = seconds("<method 'resize' of 'ImagingCore' objects>")
    return {
        "clips": len(records),
        "frames": len(records) * spec.num_frames,
        "total_s": round(total, 6),
        "jpeg_decode_s": round(decode, 6),
        "resize_s": round(resize, 6),
        "other_s": round(total - decode - resize, 6),
    }


def check(args, work: Path) -> dict:
    """Evaluates a checkpoint from the videos and from raw and JPEG prepared copies."""
    out = {}
    for name in ("videos", "raw", "jpeg"):
        root = args.check_src
        if name != "videos":
            root = work / f"check_{name}"
            cmd = [sys.executable, "-m", "stam_jax.data.prepare", f"--src={args.check_src}"]
            cmd += [f"--out={root}", f"--config={args.check_config}", f"--encoding={name}"]
            if args.check_workers is not None:
                cmd.append(f"--workers={args.check_workers}")
            subprocess.run([*cmd, "--config.progress=False"], cwd=ROOT, check=False)
        cmd = [sys.executable, "run_eval.py", f"--config={args.check_config}"]
        cmd += [f"--config.checkpoint={args.check_ckpt}", f"--config.data.root={root}"]
        cmd += ["--config.progress=False", f"--workdir={work / f'eval_{name}'}"]
        if args.check_workers is not None:
            cmd.append(f"--config.data.workers={args.check_workers}")
        subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True)
        lines = (work / f"eval_{name}" / "predictions.jsonl").read_text().splitlines()
        out[name] = [json.loads(line) for line in lines]
    base = out["videos"]
    report = {"videos": len(base)}
    for name in ("raw", "jpeg"):
        got = out[name]
        assert [p["path"] for p in got] == [p["path"] for p in base]
        top1 = np.mean([g["top5"][0] == b["top5"][0] for g, b in zip(got, base, strict=True)])
        labels = np.array([b["label"] for b in base])
        report[name] = {
            "top1_agreement": float(top1),
            "logits_bit_identical": all(
                g["logits"] == b["logits"] for g, b in zip(got, base, strict=True)
            ),
            "top1_accuracy": float(np.mean([g["top5"][0] for g in got] == labels)),
        }
    report["videos_top1_accuracy"] = float(np.mean([b["top5"][0] for b in base] == labels))
    return report


if __name__ == "__main__":
    main()
