"""The benchmark scripts run (smoke mode: tiny sizes, no timing assertions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # JSON objects start at the beginning of a line; children may print other lines first.
    text = result.stdout[re.search(r"^\{", result.stdout, re.MULTILINE).start() :]
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(text):
        obj, end = decoder.raw_decode(text, at)
        objects.append(obj)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return objects


def test_forward_bench_smoke():
    rows = run_script("benchmarks/forward_bench.py", "--smoke")
    assert rows[0]["matmul_tflops"] > 0
    model = rows[1]
    assert model["model"] == "stam_tiny"
    assert model["jax_videos_per_s"] > 0 and model["torch_eager_videos_per_s"] > 0
    assert model["jax_over_torch_eager"] > 0 and model["mfu_vs_matmul"] > 0
    assert rows[-1]["peak_rss_MiB"] > 0


def test_decode_bench_smoke():
    args = ["--videos", "2", "--workers", "1", "--height", "48", "--width", "64"]
    (row,) = run_script(
        "benchmarks/decode_bench.py", *args, "--resize", "36", "--crop", "32", "--frames", "4"
    )
    assert row["videos"] == 2 and row["videos_per_s"] > 0


def test_convert_bench_smoke(tmp_path):
    rows = run_script(
        "benchmarks/convert_bench.py", "--model", "stam_tiny", "--workdir", str(tmp_path)
    )
    report = rows[-1]
    assert report["convert"]["peak_rss_MiB"] > 0 and report["to_torch"]["s"] > 0


def test_precision_smoke():
    (row,) = run_script("benchmarks/precision.py", "--model", "stam_tiny", "--videos", "2")
    assert 0 <= row["bfloat16"]["max_rel_error"] < 0.1


def test_eval_bench_smoke():
    args = ["--model", "stam_tiny", "--config", "configs/tiny.py", "--videos", "4", "--batch", "2"]
    (row,) = run_script(
        "benchmarks/eval_bench.py", *args, "--height", "48", "--width", "64", "--workers", "0"
    )
    assert row["videos"] == 4 and row["videos_per_s"] > 0


def test_block_profile_runs():
    (row,) = run_script("benchmarks/block_profile.py")
    assert row["jax"]["block"] > 0 and row["torch"]["block"] > 0
    assert row["jax"]["matmul_gflops"] > 0
