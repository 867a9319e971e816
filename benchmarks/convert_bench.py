"""Converter time and peak memory on a full-size official-format checkpoint.

    python benchmarks/convert_bench.py --model stam_16 [--workdir DIR [--force]]

Writes a random-weight official `.pth` of the variant (in a separate process), then runs
`python -m convert` and `python -m convert.to_torch` as child processes and reports each one's
wall time and peak resident memory (ru_maxrss), next to the file size and to the peak RSS of a
process that only imports the same libraries (the floor no converter can go under).

The files go into a temporary folder, removed at the end, or into `--workdir` (created if
missing), where they are kept: `official.pth`, `ckpt` and `back.pth`. Where an earlier run left
any of them there, it refuses to start unless `--force` says to overwrite them.
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

from _args import variant

from stam_jax import create_model
from stam_jax.cli import ArgumentParser
from stam_jax.paths import unwritable

ROOT = Path(__file__).resolve().parent.parent

MAKE_PTH = """
import sys, torch
from convert.torch_reference import randomize_, reference_from_config
from stam_jax import create_model, model_config
model = randomize_(reference_from_config(model_config(create_model(sys.argv[1]))))
torch.save({"model": model.state_dict()}, sys.argv[2])
"""
WRITTEN = ("official.pth", "ckpt", "back.pth")  # what a run writes into --workdir
IMPORTS_ONLY = "import torch, jax, orbax.checkpoint, convert, convert.torch_io"


def run_child(args: list[str]) -> tuple[float, float]:
    """Runs one child process; returns (wall seconds, its peak RSS in MiB)."""
    start = time.perf_counter()
    pid = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{args} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    """Measures and prints one JSON line per step."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_16", action=variant())
    parser.add_argument(
        "--workdir", default=None, help="keep the files here (default: a temporary folder)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"overwrite what an earlier run left in --workdir ({', '.join(WRITTEN)})",
    )
    args = parser.parse_args(argv)
    if args.workdir:
        workdir = Path(args.workdir)
        if workdir.exists() and not workdir.is_dir():
            parser.error(f"--workdir={workdir} is a file; name a folder (created if missing)")
        left = [name for name in WRITTEN if os.path.lexists(workdir / name)]
        if left and not args.force:
            parser.error(
                f"--workdir={workdir} holds {', '.join(left)} from an earlier run; pass --force "
                "to overwrite them, or name another folder"
            )
        why = unwritable(workdir, into=True)
        if why:
            parser.error(f"--workdir={workdir} cannot be written: {why}; name another folder")
        workdir.mkdir(parents=True, exist_ok=True)
        _measure(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="convert_bench_") as workdir:
            _measure(args, Path(workdir))


def _measure(args: argparse.Namespace, workdir: Path) -> None:
    pth, ckpt, back = workdir / "official.pth", workdir / "ckpt", workdir / "back.pth"
    py = sys.executable
    model = create_model(args.model)  # head counts are not stored in checkpoints
    heads = ["--num-heads", str(model.num_heads), "--temporal-heads", str(model.temporal_heads)]
    run_child([py, "-c", MAKE_PTH, args.model, str(pth)])
    size = pth.stat().st_size / 2**20
    rows = {"file_MiB": round(size, 1)}
    floor_s, floor_rss = run_child([py, "-c", IMPORTS_ONLY])
    rows["imports_only"] = {"s": round(floor_s, 2), "peak_rss_MiB": round(floor_rss)}
    for name, cmd in [
        ("convert", [py, "-m", "convert", str(pth), str(ckpt), "--force", *heads]),
        ("to_torch", [py, "-m", "convert.to_torch", str(ckpt), str(back), "--force"]),
    ]:
        seconds, rss = run_child(cmd)
        rows[name] = {
            "s": round(seconds, 2),
            "peak_rss_MiB": round(rss),
            "peak_rss_over_file": round(rss / size, 2),
        }
    print(json.dumps({"model": args.model, **rows}, indent=1))


if __name__ == "__main__":
    if sys.platform != "linux":
        raise SystemExit("os.wait4 peak-RSS accounting needs Linux")
    main()
