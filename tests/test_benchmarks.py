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
    # JSON objects start at the beginning of a line; children print other lines around them.
    decoder, objects, at = json.JSONDecoder(), [], 0
    for match in re.finditer(r"^\{", result.stdout, re.MULTILINE):
        if match.start() < at:
            continue  # inside an object already read
        obj, at = decoder.raw_decode(result.stdout, match.start())
        objects.append(obj)
    return objects


def test_forward_bench_smoke():
    rows = run_script("benchmarks/forward_bench.py", "--smoke")
    assert rows[0]["matmul_size"] == 256
    model = rows[1]
    assert model["matmul_tflops"]["matmul_jax"] > 0 and model["matmul_tflops"]["matmul_torch"] > 0
    paths = ["auto", "xla", "auto_chunk2", "xla_chunk2"]
    paths += [f"{p}_lastall" for p in paths]  # the last ViT block on every token
    assert model["model"] == "stam_tiny" and model["attention"] == paths
    # 2 videos x 4 frames: the tiny model runs at once by default, in 4 steps of 2 with chunk 2
    assert model["frames_per_step"] == {p: 2 if "chunk2" in p else 8 for p in paths}
    # The last block's other tokens are 29% of the tiny model's FLOPs.
    assert model["gflop_per_video"] < 0.8 * model["gflop_per_video_lastall"]
    for runner in [f"jax_{p}" for p in paths] + ["torch_eager", "torch_sdpa"]:
        assert model[f"{runner}_videos_per_s"] > 0
    assert model["jax_auto_over_torch_eager"] > 0 and model["jax_auto_mfu_vs_matmul"] > 0
    assert model["gflop_per_video"] > 0 and model["flop_source"] == "xla"  # XLA's count
    assert rows[-1]["peak_rss_MiB"] > 0


def test_forward_bench_reports_a_failed_torch_compile(monkeypatch):
    # torch.compile compiles on the first call; where that fails (no compiler, an inductor
    # error), the step reports it and still times the other runners.
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import forward_bench

    def broken(module):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(forward_bench.torch, "compile", broken)
    args = argparse.Namespace(
        attention="auto",
        frame_chunk="auto",
        last_block="cls",
        no_torch=False,
        torch_sdpa=False,
        torch_compile=True,
        matmul_size=64,
        repeats=1,
        inner=1,
    )
    row = forward_bench.bench_model("stam_tiny", 1, "float32", args)
    assert row["errors"] == {"torch_compile": "RuntimeError: no compiler here"}
    assert "torch_compile_videos_per_s" not in row and "torch_compile" not in row["compile_s"]
    assert row["jax_auto_videos_per_s"] > 0 and row["jax_auto_over_torch_eager"] > 0


def test_train_bench_smoke():
    args = ("--batch", "4", "--steps", "2", "--remat", "--frame-chunk", "8", "--last-block", "all")
    (row,) = run_script("benchmarks/train_bench.py", *args, "--freeze", "blocks_0")
    assert row["model"] == "stam_tiny" and row["remat"] is True and row["frames_per_step"] == 8
    assert row["last_block"] == "all" and row["freeze"] == "blocks_0"
    assert row["steps_per_s"] > 0 and row["tflop_per_step"] >= 0 and row["peak_rss_MiB"] > 0
    assert row["flop_source"] == "xla" and row["gflop_per_step"] > 0
    assert 0 < row["loss"] < 10


def test_gpu_suite_runs_its_steps_at_tiny_sizes(tmp_path):
    # Two of its steps (the forward and train benchmarks have their own smoke tests): ONLY
    # picks them, and they run in the suite's order whatever the order ONLY names them in.
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["ONLY"] = "decode_threads transfer kprof_float32"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    steps = (tmp_path / "steps.log").read_text().splitlines()
    assert [line.split(":")[0] for line in steps[:-1]] == [
        "step kprof_float32",
        "step transfer",
        "step decode_threads",
    ]
    assert all("rc=0" in line for line in steps[:-1]) and steps[-1] == "done"
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "step" in row] == [
        "kprof_float32",
        "transfer",
        "decode_threads",
    ]
    assert any(row.get("workers") == 2 and "share_over_one_per_core" in row for row in rows)
    assert any(row.get("batch_shape", [0])[0] == 4 for row in rows)  # the smoke batch
    (kprof,) = [row for row in rows if "jax_auto" in row]  # the kernel profile's row
    for lib in ("jax_auto", "torch_sdpa"):
        assert kprof[lib]["kernel_ms_per_forward"] > 0 and kprof[lib]["top_kernels_ms"]
        assert sum(kprof[lib]["ms_by_kind"].values()) > 0.99 * kprof[lib]["kernel_ms_per_forward"]
    # stam-jax's top kernels are traced back to the model's modules through the HLO metadata.
    assert any("STAM/blocks_0/" in op for op in kprof["jax_auto"]["top_kernels_source"].values())
    # PyTorch's CPU ops are named: its convolution, matmuls and fused attention are told apart.
    assert {"convolution", "matmul", "attention"} <= set(kprof["torch_sdpa"]["ms_by_kind"])


def test_decode_bench_smoke():
    args = ["--videos", "2", "--workers", "1", "--height", "48", "--width", "64", "--resize"]
    args += ["36", "--crop", "32", "--frames", "4"]
    (row,) = run_script("benchmarks/decode_bench.py", *args)
    assert row["videos"] == 2 and row["videos_per_s"] > 0
    args += ["--repeat", "1"]
    (row,) = run_script(
        "benchmarks/decode_bench.py", *args, "--compare-skipping", "--bframes", "forced"
    )
    assert row["skipping_stamps_found"] and row["frame_types_first_video"]["B"] > 0
    assert row["median_ms_per_video"]["skipping"] > 0 and row["in_order_over_skipping"] > 0
    (row,) = run_script("benchmarks/decode_bench.py", *args, "--compare-threads")
    assert row["threads_per_decoder"]["share"] >= 1 and row["share_over_one_per_core"] > 0


def test_convert_bench_smoke(tmp_path):
    rows = run_script(
        "benchmarks/convert_bench.py", "--model", "stam_tiny", "--workdir", str(tmp_path)
    )
    report = rows[-1]
    assert report["convert"]["peak_rss_MiB"] > 0 and report["to_torch"]["s"] > 0


def test_precision_smoke():
    (row,) = run_script("benchmarks/precision.py", "--model", "stam_tiny", "--videos", "2")
    assert row["jax"]["float32"]["max_rel_error"] < 1e-5
    assert row["torch"]["float32"]["max_rel_error"] < 1e-5
    assert 0 < row["jax"]["bfloat16"]["max_rel_error"] < 0.1
    assert 0 < row["torch"]["autocast_float16"]["max_rel_error"] < 0.1


def test_eval_bench_smoke():
    args = ["--model", "stam_tiny", "--config", "configs/tiny.py", "--videos", "4", "--batch", "2"]
    args += ["--unique", "3"]  # three encoded, the fourth a link to the first
    rows = run_script(
        "benchmarks/eval_bench.py",
        *[*args, "--height", "48", "--width", "64", "--workers", "0", "--inputs", "videos,raw"],
    )
    setup, *rows = rows
    assert setup["videos_written"] == 4 and setup["videos_encoded"] == 3 and setup["setup_s"] > 0
    assert [(row["run"], row["inputs"]) for row in rows] == [(0, "videos"), (1, "raw")]
    assert all(row["videos"] == 4 and row["videos_per_s"] > 0 for row in rows)
    assert all(row["input_wait_s"] >= 0 for row in rows)


def test_transfer_bench_smoke():
    args = ["--batch", "2", "--frames", "3", "--size", "8", "--repeats", "2"]
    (row,) = run_script("benchmarks/transfer_bench.py", *args)
    assert row["batch_shape"] == [2, 3, 8, 8, 3]
    assert row["uint8"]["bytes"] == 1152 and row["float32"]["bytes"] == 4608
    assert row["float32_put_only"]["bytes"] == 4608 and row["float32"]["ms"] > 0
    assert row["scale_table"]["ms"] > 0 and row["scale_divide"]["ms"] > 0


def test_block_profile_smoke():
    (row,) = run_script("benchmarks/block_profile.py", "--smoke", "--torch-sdpa")
    parts = {"block", "attention", "attention_core", "mlp", "layernorm", "gelu", "dense_to_mlp"}
    parts |= {"patch_embed", "gelu_erfc", "patch_embed_conv", "attention_sliced_qkv"}
    for lib in ("jax", "torch"):
        assert set(row[lib]) == parts | {"matmul_gflops"}
        assert all(value > 0 for value in row[lib].values())
    assert row["jax_attention"] == "heads_first" and row["torch_attention"] == "sdpa"


def test_prepared_bench_smoke(tmp_path):
    from conftest import TINY_CONFIGS, random_params
    from test_eval import make_folder

    from stam_jax import checkpoints, create_model

    checkpoints.save(
        tmp_path / "ckpt", create_model("stam_tiny"), random_params(TINY_CONFIGS["tiny"])
    )
    src = make_folder(tmp_path / "videos", per_class=1)
    size = ["--height", "48", "--width", "64", "--resize", "36", "--crop", "32", "--frames", "4"]
    check = ["--check-ckpt", str(tmp_path / "ckpt"), "--check-src", str(src)]
    check += ["--check-workers", "0"]  # in-process: decoding processes cost 4 s each to start
    (row,) = run_script(
        "benchmarks/prepared_bench.py",
        *["--videos", "2", "--repeat", "1", "--frame-rate", "4", *size, *check],
        *["--check-config", "configs/tiny.py", "--profile"],
    )
    profile = row["profile_train_jpeg"]
    assert profile["clips"] == 2 and profile["jpeg_decode_s"] > 0 and profile["resize_s"] > 0
    assert set(row["ratio_vs_decoding"]) == {
        "read_eval_raw",
        "read_eval_jpeg",
        "train_clips_from_train_jpeg",
        "train_clips_from_train_raw",
    }
    assert row["agreement"]["videos"] == 10
    assert row["agreement"]["raw"]["logits_bit_identical"]


def test_xla_cpu_flags_smoke():
    (row,) = run_script("benchmarks/xla_cpu_flags.py", "--rounds", "1", "--repeats", "1")
    assert set(row["gflop_per_s"]) == {"default", "onednn", "onednn_dot_fusion", "xnnpack", "torch"}
    assert all(r[0]["gemm"] > 0 and r[0]["gemm_gelu"] > 0 for r in row["gflop_per_s"].values())


def test_kernel_profile_kinds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_profile import kind_of, summarise

    # Kernel names as the GPU profilers report them (cuBLAS, cuDNN, XLA fusions, PyTorch).
    assert kind_of("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT [custom-call.12]") == "matmul"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_knob_7 [custom-call.3]") == "attention"
    assert kind_of("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16 [convolution.1]") == "convolution"
    assert kind_of("gemm_fusion_dot_7") == "matmul"
    assert kind_of("loop_add_fusion_3") == "other"
    assert kind_of("vectorized_layer_norm_kernel") == "other"
    got = summarise([("gemm_a", 0.004), ("gemm_a", 0.002), ("loop_add", 0.001)], 2, 0.01, 1)
    assert got["ms_by_kind"] == {"matmul": 3.0, "other": 0.5}
    assert got["wall_ms_per_forward"] == 5.0 and got["kernel_ms_per_forward"] == 3.5
    assert got["top_kernels_ms"] == {"gemm_a": 3.0} and got["kernels_per_forward"] == 1.5


def test_tensorboard_import_smoke():
    (row,) = run_script("benchmarks/tensorboard_import.py", "--repeats", "1")
    assert row["torch_imported"] == {"with_torch": True, "stam_jax": False}
    assert row["median_s"]["with_torch"] > 0 and row["median_s"]["stam_jax"] > 0


def test_worker_start_smoke():
    rows = run_script("benchmarks/worker_start.py", "--repeats", "1", "--workers", "1")
    assert [row["variant"] for row in rows] == ["now", "jax_at_top"]
    assert all(
        row["first_results_s_median"] > 0 and row["worker_rss_mib_median"] > 0 for row in rows
    )


def test_compile_opt_level_smoke():
    # The frame-averaging tiny model: its train step compiles in a third of stam_tiny's time.
    args = ["--model", "stam_tiny_mean", "--batch", "2", "--repeats", "1"]
    rows = run_script("benchmarks/compile_opt_level.py", *args, "--levels", "default,0/nofusion")
    assert [row["level"] for row in rows] == ["default", "0/nofusion"]
    assert all(row["model"] == "stam_tiny_mean" for row in rows)
    assert all(row["compile_cpu_s"] > 0 and row["step_s_median"] > 0 for row in rows)
    # The levels order float operations differently: the same loss up to rounding.
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * abs(rows[0]["loss"])


def test_partial_bench_smoke():
    (row,) = run_script("benchmarks/partial_bench.py", "--batch", "4", "--videos", "10")
    assert row["bytes_per_video"] == 8 + 2 * 4 * 400 + 4  # position, logits, scores, CRC
    assert row["append_ms"] > 0 and row["read_s"] > 0


def test_ctrl_c_bench_smoke():
    setup, *rows = run_script("benchmarks/ctrl_c_bench.py", "--smoke")
    assert setup["setup"]["videos"] == 4 and setup["setup"]["workers"] == 2
    runs, summaries = rows[:2], rows[2:]
    assert [(r["moment"], r["variant"]) for r in runs] == [
        ("spawned", "early_stop"),
        ("spawned", "no_early_stop"),
    ]
    for row in runs:  # interrupted while both reading processes were there, and ended as asked
        assert row["ok"] and row["status"] == 130 and row["readers_at_sigint"] == 2, row
        assert row["stderr"] == (
            "interrupted: no results were kept yet; the same command starts again."
        )
        assert 0 < row["exit_s"] <= row["gone_s"]
    assert [(s["variant"], s["good"], s["statuses"], s["failures"]) for s in summaries] == [
        ("early_stop", 1, [130], []),
        ("no_early_stop", 1, [130], []),
    ]
    assert all(s["exit_s_median"] <= s["gone_s_median"] for s in summaries)


def test_ctrl_c_bench_variants_differ_only_in_stop_starting(tmp_path):
    # The children's sitecustomize replaces Reading.stop_starting with a no-op, or nothing.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ctrl_c_bench import SITECUSTOMIZE

    show = "from stam_jax.data import reading; print(reading.Reading.stop_starting.__qualname__)"
    names = {}
    for no_early_stop in (False, True):
        site = tmp_path / str(no_early_stop)
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(no_early_stop=no_early_stop))
        result = subprocess.run(
            [sys.executable, "-c", show],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        names[no_early_stop] = result.stdout.strip()
    assert names[False] == "Reading.stop_starting"
    assert names[True].endswith("<lambda>")
    assert SITECUSTOMIZE.format(no_early_stop=False).replace("False", "True") == (
        SITECUSTOMIZE.format(no_early_stop=True)
    )


def test_read_ahead_bench_smoke():
    args = ["--videos", "2", "--workers", "2", "--prefetch", "8", "--clips", "2", "--rounds", "1"]
    size = ["--height", "48", "--width", "64", "--resize", "36", "--crop", "32", "--frames", "4"]
    (row,) = run_script("benchmarks/read_ahead_bench.py", *args, *size, "--settle", "1")
    # Shared read buffers hold fewer records ahead than one of the whole prefetch per process.
    assert 0 < row["shared"]["ahead"][0] < row["own"]["ahead"][0], row
    assert row["shared"]["median_clips_per_s"] > 0 and row["own"]["median_clips_per_s"] > 0
