"""End-to-end `run_eval.py` throughput on generated Kinetics-like videos.

    python benchmarks/eval_bench.py --model stam_16 --videos 8 --batch 2 --dtype float32

Writes `--videos` H.264 videos (10 s, 30 fps, 340x256) into a Kinetics-style folder with a
400-name class list, a random-weight checkpoint of the model, and runs `run_eval.py` on them,
reporting what it reports: videos/s over the evaluation loop (input and model together,
compile excluded), compile seconds, the seconds the loop waited for input, and the whole
command's wall time. `--inputs videos,raw,jpeg` runs it, one after the other, on the videos and
on prepared copies of them (`python -m stam_jax.data.prepare`, not timed), one JSON each;
`--repeat 2` runs each twice (with `--cache-dir`: a cold start, then one hitting the cache).
The videos are written by one process per core; `--unique N` encodes only N of them and
fills the rest with hard links to those (decoding costs the same; writing is the slow part).
`--config` defaults to the file of `configs/` that samples the model's frames and size
(`configs/<model>.py` where there is one; `configs/tiny.py` for the tiny models).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This process writes the videos and the checkpoint on the CPU, leaving the accelerator and its
# memory to run_eval.py (on a GPU, a JAX process here would hold 60-75% of its memory).
_CALLER_PLATFORMS = os.environ.get("JAX_PLATFORMS")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _args import (  # noqa: E402
    MODEL_DTYPES,
    cache_folder,
    even_side,
    existing,
    number,
    one_of,
    one_of_list,
    variant,
    whole,
    workers,
)

from stam_jax import checkpoints, create_model  # noqa: E402
from stam_jax.cli import ArgumentParser  # noqa: E402
from stam_jax.configs import config_files_for  # noqa: E402
from stam_jax.data.synthetic import write_index_video  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def default_config(model_name: str) -> str | None:
    """The run config (relative to the repository) that samples the clips `model_name` takes:
    `configs/<model_name>.py` where it does, else the first file of `configs/` that does (None
    if none does)."""
    built = create_model(model_name)
    files = config_files_for(built.num_frames, built.image_size)
    own = f"configs/{model_name}.py"
    return own if own in files else next(iter(files), None)


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_16", action=variant())
    parser.add_argument("--videos", default=8, action=whole(1))
    parser.add_argument("--batch", default=2, action=whole(1))
    parser.add_argument("--dtype", default="float32", action=one_of(MODEL_DTYPES))
    parser.add_argument(
        "--workers", default=-1, action=workers(), help="--config.data.workers (-1: one per core)"
    )
    parser.add_argument(
        "--config",
        default=None,
        action=existing("file"),
        help="run config (default: the file of configs/ for the model's frames and size)",
    )
    parser.add_argument(
        "--cache-dir",
        default="",
        action=cache_folder(),
        help="persistent compilation cache ('' off)",
    )
    parser.add_argument("--height", default=256, action=even_side())
    parser.add_argument("--width", default=340, action=even_side())
    parser.add_argument(
        "--inputs",
        default="videos",
        action=one_of_list(("videos", "raw", "jpeg")),
        help="comma list of videos, raw, jpeg",
    )
    parser.add_argument(
        "--repeat", default=1, action=whole(1), help="runs of run_eval.py per input"
    )
    parser.add_argument(
        "--timeout",
        default=None,
        action=number(0, what="seconds"),
        help="seconds per run_eval.py (default: no limit)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument(
        "--unique", default=0, action=whole(0), help="videos to encode, the rest linked (0: all)"
    )
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = default_config(args.model)
        if args.config is None:
            parser.error(
                f"--model={args.model}: no file in configs/ samples its clips; pass --config FILE"
            )
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        _measure(args, work)
    finally:
        if args.keep:
            print(json.dumps({"work_folder": str(work)}), flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path) -> None:
    start = time.perf_counter()
    model = create_model(args.model)
    classes = [f"class_{c:03d}" for c in range(model.num_classes)]
    (work / "classes.txt").write_text("\n".join(classes) + "\n")
    folders = min(4, len(classes))  # stam_demo has 2 classes
    paths = [work / "val" / classes[i % folders] / f"video_{i}.mp4" for i in range(args.videos)]
    unique = min(args.unique or args.videos, args.videos)
    with concurrent.futures.ProcessPoolExecutor(min(os.cpu_count() or 1, unique)) as pool:
        writes = [
            pool.submit(write_index_video, paths[i], i, args.height, args.width)
            for i in range(unique)
        ]
        for write in writes:
            write.result()
    for i in range(unique, args.videos):
        paths[i].parent.mkdir(parents=True, exist_ok=True)
        os.link(paths[i % unique], paths[i])
    video = np.zeros((1, model.num_frames, model.image_size, model.image_size, 3), np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), video)["params"]
    checkpoints.save(work / "ckpt", model, params)
    del params
    setup_s = round(time.perf_counter() - start, 1)
    written = {"videos_written": args.videos, "videos_encoded": unique, "setup_s": setup_s}
    print(json.dumps(written), flush=True)
    config = args.config
    # The repository first, then whatever the caller's path holds (packages carried to a GPU).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("JAX_PLATFORMS")
    if _CALLER_PLATFORMS is not None:
        env["JAX_PLATFORMS"] = _CALLER_PLATFORMS
    runs = [name for name in args.inputs.split(",") for _ in range(args.repeat)]
    for run, inputs in enumerate(runs):
        root = work / "val"
        if inputs != "videos":
            root = work / f"prepared_{inputs}"
        if inputs != "videos" and not root.exists():
            prepare = [sys.executable, "-m", "stam_jax.data.prepare", f"--src={work / 'val'}"]
            prepare += [f"--out={root}", f"--config={config}", f"--encoding={inputs}"]
            prepare += [f"--config.data.class_list={work / 'classes.txt'}"]
            subprocess.run([*prepare, "--config.progress=False"], cwd=ROOT, check=True, env=env)
        cmd = [
            sys.executable,
            "run_eval.py",
            f"--config={config}",
            f"--config.checkpoint={work / 'ckpt'}",
            f"--config.data.root={root}",
            f"--config.batch_size={args.batch}",
            f"--config.dtype={args.dtype}",
            f"--config.data.workers={args.workers}",
            "--config.progress=False",
            f"--config.compilation_cache_dir={args.cache_dir}",
            f"--workdir={work / f'out_{run}_{inputs}'}",
        ]
        if inputs == "videos":
            cmd.append(f"--config.data.class_list={work / 'classes.txt'}")
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env=env, timeout=args.timeout)
        wall = time.perf_counter() - start
        results = json.loads((work / f"out_{run}_{inputs}" / "results.json").read_text())
        timing = results["timing"]
        print(
            json.dumps(
                {
                    "model": args.model,
                    "inputs": inputs,
                    "run": run,
                    "dtype": args.dtype,
                    "videos": results["counts"]["evaluated"],
                    "batch": args.batch,
                    "devices": results["devices"],
                    "videos_per_s": timing["videos_per_s"],
                    "input_wait_s": timing["input_wait_s"],
                    "eval_s": timing["eval_s"],
                    "compile_s": timing["compile_s"],
                    "first_batch_after_s": timing["first_batch_after_s"],
                    "command_wall_s": round(wall, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
