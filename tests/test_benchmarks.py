"""The benchmark scripts run (smoke mode: tiny sizes, no timing assertions)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
        triton_gemm="off,on",  # a GPU compiler setting: on the CPU both compile alike
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
    # The same forward compiled with XLA's Triton GEMMs (XLA's default) runs beside it.
    assert row["attention"] == ["auto", "auto_triton_gemm"]
    assert row["jax_auto_triton_gemm_videos_per_s"] > 0


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
    # XLA's type conversions are not convolutions (an H200 profile counted the GELU's
    # 'loop_convert_fusion' as one); a convolution it runs is.
    assert kind_of("loop_convert_fusion_10 [command_buffer_1]") == "other"
    assert kind_of("wrapped_convert_5") == "other"
    assert kind_of("cudnn-conv-bias-activation.2") == "convolution"
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


# Refusals: a bad command line is one `error:` line, exit status 2, before anything is written.


def bench(name: str):
    """A benchmark script as a module, its folder on the path as `python benchmarks/x.py` has
    it (eval_bench sets JAX_PLATFORMS for itself on import: this process's is kept)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    platforms = os.environ.get("JAX_PLATFORMS")
    try:
        return importlib.import_module(name)
    finally:
        if platforms is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = platforms


def refusal(name: str, argv: list[str], capsys, monkeypatch, tmp_path) -> str:
    """The one stderr line of `name`'s main(argv), which must exit with status 2 leaving its
    temporary folder (here `tmp_path/tmp`) empty."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    module = bench(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("\n")
    assert list(temp.iterdir()) == []
    (line,) = captured.err.splitlines()
    return line


def _variants() -> str:
    from stam_jax import VARIANTS

    return ", ".join(VARIANTS)


COUNT = "use a whole number >= 1"
DTYPES = "use one of float32, bfloat16, float16"
SIDE = "use an even whole number of pixels >= 2 (H.264 needs even sides)"
REFUSALS = [
    ("block_profile", ["--frames", "0"], f"--frames=0: {COUNT}"),
    ("block_profile", ["--smoke", "--repeats", "-1"], f"--repeats=-1: {COUNT}"),
    (
        "block_profile",
        ["--dtype", "float64"],
        "--dtype=float64: use one of float32, bfloat16, float16",
    ),
    ("block_profile", ["--matmul-size", "1.5"], f"--matmul-size=1.5: {COUNT}"),
    (
        "compile_opt_level",
        ["--levels", "default,4/nofusion"],
        "--levels=default,4/nofusion: '4/nofusion' is not a level; use a comma list of default, "
        "0, 1, 2, 3, each optionally with '/nofusion'",
    ),
    (
        "compile_opt_level",
        ["--levels", "0/fusion"],
        "--levels=0/fusion: '0/fusion' is not a level; use a comma list of default, 0, 1, 2, 3, "
        "each optionally with '/nofusion'",
    ),
    ("compile_opt_level", ["--batch", "0"], f"--batch=0: {COUNT}"),
    ("compile_opt_level", ["--repeats", "0"], f"--repeats=0: {COUNT}"),
    (
        "ctrl_c_bench",
        ["--workers", "0"],
        "--workers=0: use -1 (one process per core) or a number of processes >= 1 (the "
        "benchmark interrupts reading processes)",
    ),
    # --smoke's 4 videos, the explicit --unique: explicit options win over --smoke.
    (
        "ctrl_c_bench",
        ["--smoke", "--unique", "5"],
        "--unique=5 is more than --videos=4; use at most --videos",
    ),
    ("ctrl_c_bench", ["--videos", "0"], f"--videos=0: {COUNT}"),
    ("ctrl_c_bench", ["--batch", "0"], f"--batch=0: {COUNT}"),
    ("ctrl_c_bench", ["--smoke", "--repeats", "0"], f"--repeats=0: {COUNT}"),
    ("ctrl_c_bench", ["--timeout", "0"], "--timeout=0: use a number > 0 (seconds)"),
    (
        "ctrl_c_bench",
        ["--moments", "spawned,spawned+x"],
        "--moments=spawned,spawned+x: 'spawned+x' is not a moment; use a comma list of spawned, "
        "spawned+SECONDS or first_batch",
    ),
    ("decode_bench", ["--videos", "0"], f"--videos=0: {COUNT}"),
    ("decode_bench", ["--repeat", "0"], f"--repeat=0: {COUNT}"),
    ("decode_bench", ["--frames", "0"], f"--frames=0: {COUNT}"),
    ("decode_bench", ["--height", "47"], f"--height=47: {SIDE}"),
    ("decode_bench", ["--width", "0"], f"--width=0: {SIDE}"),
    ("decode_bench", ["--resize", "0"], f"--resize=0: {COUNT}"),
    (
        "decode_bench",
        ["--resize", "36", "--crop", "48"],
        "--crop=48 is larger than --resize=36; use a --crop of at most --resize",
    ),
    (
        "decode_bench",
        ["--frame-rate", "0"],
        "--frame-rate=0: use a number > 0 (frames per second)",
    ),
    (
        "decode_bench",
        ["--frame-rate", "2000"],
        "--frame-rate=2000.0; use a number of frames per second in (0, 1000] (1.6 for stam_16, "
        "6.4 for stam_64).",
    ),
    ("eval_bench", ["--videos", "0"], f"--videos=0: {COUNT}"),
    ("eval_bench", ["--unique", "-1"], "--unique=-1: use a whole number >= 0"),
    ("eval_bench", ["--batch", "0"], f"--batch=0: {COUNT}"),
    ("eval_bench", ["--repeat", "0"], f"--repeat=0: {COUNT}"),
    ("eval_bench", ["--height", "33"], f"--height=33: {SIDE}"),
    ("eval_bench", ["--timeout", "-1"], "--timeout=-1: use a number > 0 (seconds)"),
    (
        "eval_bench",
        ["--dtype", "float64"],
        "--dtype=float64: use one of float32, bfloat16, float16",
    ),
    (
        "eval_bench",
        ["--inputs", "videos,mp4"],
        "--inputs=videos,mp4: 'mp4' not known; use a comma list of videos, raw, jpeg",
    ),
    (
        "eval_bench",
        ["--config", "configs/stam_tiny.py"],
        "--config=configs/stam_tiny.py: no such file; name an existing file",
    ),
    (
        "forward_bench",
        ["--models", "stam_16,stam_99"],
        "--models=stam_16,stam_99: 'stam_99' not known; use a comma list of {variants}",
    ),
    (
        "forward_bench",
        ["--batches", "1,0"],
        "--batches=1,0: use a comma list of whole numbers >= 1",
    ),
    ("forward_bench", ["--smoke", "--inner", "0"], f"--inner=0: {COUNT}"),
    ("forward_bench", ["--matmul-size", "0"], f"--matmul-size=0: {COUNT}"),
    (
        "forward_bench",
        ["--attention", "auto,flash"],
        "--attention=auto,flash: 'flash' not known; use a comma list of auto, xla, cudnn, "
        "heads_first",
    ),
    (
        "forward_bench",
        ["--triton-gemm", "off,auto"],
        "--triton-gemm=off,auto: 'auto' not known; use a comma list of on, off",
    ),
    (
        "forward_bench",
        ["--last-block", "cls,none"],
        "--last-block=cls,none: 'none' not known; use a comma list of cls, all",
    ),
    (
        "forward_bench",
        ["--frame-chunk", "auto,-2"],
        "--frame-chunk=auto,-2: '-2' is not a setting; use a comma list of 'auto', 0 (all frames "
        "at once) or frames per step",
    ),
    # stam_16 at batch 1: 16 frames, which 3 does not divide.
    (
        "forward_bench",
        ["--frame-chunk", "3"],
        "--frame-chunk=3: with stam_16 at batch 1, frame_chunk=3 does not divide the batch's 16 "
        "frames (batch x 16); use a divisor of 16, or 0 for all frames at once.",
    ),
    (
        "kernel_profile",
        ["--model", "stam_99"],
        "--model=stam_99: not a registered model; use one of {variants}",
    ),
    ("kernel_profile", ["--smoke", "--calls", "0"], f"--calls=0: {COUNT}"),
    ("kernel_profile", ["--top", "0"], f"--top=0: {COUNT}"),
    ("kernel_profile", ["--batch", "0"], f"--batch=0: {COUNT}"),
    (
        "kernel_profile",
        ["--attention", "flash"],
        "--attention=flash: use one of auto, xla, cudnn, heads_first",
    ),
    ("partial_bench", ["--classes", "0"], f"--classes=0: {COUNT}"),
    ("partial_bench", ["--videos", "0"], f"--videos=0: {COUNT}"),
    ("partial_bench", ["--batch", "0"], f"--batch=0: {COUNT}"),
    ("precision", ["--videos", "0"], f"--videos=0: {COUNT}"),
    (
        "precision",
        ["--dtypes", "float32,float32-fast"],
        "--dtypes=float32,float32-fast: 'float32-fast' is not a dtype; use a comma list of "
        "float32, bfloat16, float16, each optionally with a matmul precision: -default, -high, "
        "-highest",
    ),
    (
        "precision",
        ["--model", "stam_8"],
        "--model=stam_8: not a registered model; use one of {variants}",
    ),
    ("prepared_bench", ["--videos", "0"], f"--videos=0: {COUNT}"),
    ("prepared_bench", ["--repeat", "0"], f"--repeat=0: {COUNT}"),
    ("prepared_bench", ["--crop", "0"], f"--crop=0: {COUNT}"),
    ("prepared_bench", ["--width", "341"], f"--width=341: {SIDE}"),
    (
        "prepared_bench",
        ["--check-config", "configs/tiny.py"],
        "the check needs --check-ckpt, --check-src, --check-config together; add --check-ckpt, "
        "--check-src",
    ),
    (
        "prepared_bench",
        ["--check-only"],
        "--check-only needs --check-ckpt, --check-src, --check-config",
    ),
    (
        "prepared_bench",
        ["--check-config", "configs/none.py"],
        "--check-config=configs/none.py: no such file; name an existing file",
    ),
    (
        "prepared_bench",
        ["--check-src", "no_such_folder"],
        "--check-src=no_such_folder: no such folder; name an existing folder",
    ),
    ("read_ahead_bench", ["--clips", "0"], f"--clips=0: {COUNT}"),
    ("read_ahead_bench", ["--rounds", "0"], f"--rounds=0: {COUNT}"),
    ("read_ahead_bench", ["--prefetch", "-1"], "--prefetch=-1: use a whole number >= 0"),
    ("read_ahead_bench", ["--settle", "nan"], "--settle=nan: use a number >= 0 (seconds)"),
    ("tensorboard_import", ["--repeats", "0"], f"--repeats=0: {COUNT}"),
    (
        "train_bench",
        ["--model", "stam_99"],
        "--model=stam_99: not a registered model; use one of {variants}",
    ),
    ("train_bench", ["--steps", "0"], f"--steps=0: {COUNT}"),
    ("train_bench", ["--batch", "0"], f"--batch=0: {COUNT}"),
    ("train_bench", ["--dtype", "int8"], f"--dtype=int8: {DTYPES}"),
    (
        "train_bench",
        ["--drop-path", "1"],
        "--drop-path=1: use a number in [0, 1) (a probability; 0: off)",
    ),
    ("train_bench", ["--frame-chunk", "-1"], "--frame-chunk=-1: use a whole number >= 0"),
    # stam_tiny at batch 1: 4 frames, which 3 does not divide.
    (
        "train_bench",
        ["--batch", "1", "--frame-chunk", "3"],
        "--frame-chunk=3: frame_chunk=3 does not divide the batch's 4 frames (batch x 4); use a "
        "divisor of 4, or 0 for all frames at once.",
    ),
    ("transfer_bench", ["--size", "0"], f"--size=0: {COUNT}"),
    ("transfer_bench", ["--frames", "x"], f"--frames=x: {COUNT}"),
    (
        "worker_start",
        ["--workers", "0"],
        "--workers=0: use -1 (one process per core) or a number of processes >= 1 (the "
        "benchmark times their start)",
    ),
    ("worker_start", ["--repeats", "0"], f"--repeats=0: {COUNT}"),
    ("xla_cpu_flags", ["--rounds", "x"], f"--rounds=x: {COUNT}"),
    ("xla_cpu_flags", ["--repeats", "0"], f"--repeats=0: {COUNT}"),
]


@pytest.mark.parametrize(("name", "argv", "message"), REFUSALS)
def test_benchmark_refuses_a_bad_command_line(name, argv, message, capsys, monkeypatch, tmp_path):
    line = refusal(name, argv, capsys, monkeypatch, tmp_path)
    assert line == "error: " + message.replace("{variants}", _variants())


@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("decode_bench", "--workers"),
        ("eval_bench", "--workers"),
        ("read_ahead_bench", "--workers"),
        ("prepared_bench", "--check-workers"),
    ],
)
def test_benchmark_worker_counts_follow_the_library(name, flag, capsys, monkeypatch, tmp_path):
    # -1 (one per core) and 0 (in this process) are taken as --config.data.workers takes them.
    from stam_jax.data.loader import WORKERS_RULE

    line = refusal(name, [flag, "-2"], capsys, monkeypatch, tmp_path)
    assert line == f"error: {flag}=-2: {WORKERS_RULE}"


def test_convert_bench_refuses_to_overwrite_an_earlier_run(capsys, monkeypatch, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "official.pth").write_bytes(b"earlier")
    (workdir / "back.pth").write_bytes(b"earlier too")
    argv = ["--model", "stam_tiny", "--workdir", str(workdir)]
    line = refusal("convert_bench", argv, capsys, monkeypatch, tmp_path)
    assert line == (
        f"error: --workdir={workdir} holds official.pth, back.pth from an earlier run; pass "
        "--force to overwrite them, or name another folder"
    )
    assert (workdir / "official.pth").read_bytes() == b"earlier"
    assert sorted(p.name for p in workdir.iterdir()) == ["back.pth", "official.pth"]


def test_convert_bench_refuses_a_workdir_that_is_a_file(capsys, monkeypatch, tmp_path):
    workdir = tmp_path / "notes.txt"
    workdir.write_text("mine")
    argv = ["--workdir", str(workdir), "--force"]
    line = refusal("convert_bench", argv, capsys, monkeypatch, tmp_path)
    assert line == f"error: --workdir={workdir} is a file; name a folder (created if missing)"
    assert workdir.read_text() == "mine"


def test_convert_bench_refuses_a_workdir_under_a_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    workdir = tmp_path / "notes.txt" / "run"
    line = refusal("convert_bench", ["--workdir", str(workdir)], capsys, monkeypatch, tmp_path)
    assert line == (
        f"error: --workdir={workdir} cannot be written: {tmp_path / 'notes.txt'} is a file, not "
        "a folder; name another folder"
    )


@pytest.mark.parametrize("name", ["forward_bench", "eval_bench"])
def test_benchmark_refuses_a_cache_dir_it_cannot_write(name, capsys, monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cache = tmp_path / "notes.txt" / "cache"
    line = refusal(name, ["--cache-dir", str(cache)], capsys, monkeypatch, tmp_path)
    assert line == (
        f"error: --cache-dir={cache}: cannot be written: {tmp_path / 'notes.txt'} is a file, not "
        "a folder; name a folder this process can write to, or '' to compile without the "
        "persistent cache"
    )


def test_convert_bench_refuses_an_unknown_model_before_creating_the_workdir(
    capsys, monkeypatch, tmp_path
):
    workdir = tmp_path / "new"
    argv = ["--model", "stam_8", "--workdir", str(workdir)]
    line = refusal("convert_bench", argv, capsys, monkeypatch, tmp_path)
    assert line == f"error: --model=stam_8: not a registered model; use one of {_variants()}"
    assert not workdir.exists()


def test_eval_bench_default_config_samples_the_models_clips(monkeypatch, tmp_path):
    eval_bench = bench("eval_bench")
    assert eval_bench.default_config("stam_16") == "configs/stam_16.py"
    assert eval_bench.default_config("stam_64") == "configs/stam_64.py"
    assert eval_bench.default_config("stam_tiny") == "configs/tiny.py"
    assert eval_bench.default_config("stam_tiny_mean") == "configs/tiny.py"
    for name in ("stam_16", "stam_tiny", "stam_demo"):
        assert (ROOT / eval_bench.default_config(name)).is_file()
    # main runs the benchmark with it (the measurement left out here).
    seen = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(eval_bench, "_measure", lambda args, work: seen.append(args.config))
    eval_bench.main(["--model", "stam_tiny"])
    assert seen == ["configs/tiny.py"]
    # A --config given is checked where the command runs, and passed on as a whole path.
    eval_bench.main(["--model", "stam_tiny", "--config", "configs/tiny.py"])
    assert seen[1] == str(ROOT / "configs" / "tiny.py")


def test_forward_bench_smoke_leaves_explicit_options_alone(monkeypatch):
    forward_bench = bench("forward_bench")
    seen = []
    monkeypatch.setattr(forward_bench, "bench_model", lambda *a: seen.append(a) or {})
    monkeypatch.setattr(forward_bench.sharding, "enable_compilation_cache", lambda d: None)
    forward_bench.main(["--smoke", "--repeats", "2", "--attention", "xla"])
    ((name, batch, dtype, args),) = seen
    assert (name, batch, dtype) == ("stam_tiny", 2, "float32")
    assert args.repeats == 2 and args.attention == "xla"  # given: kept
    assert args.matmul_size == 256 and args.frame_chunk == "auto,2" and args.torch_sdpa  # --smoke


def test_benchmark_model_dtypes_are_the_librarys():
    from stam_jax.variants import parse_dtype

    dtypes = bench("_args").MODEL_DTYPES
    for name in dtypes:
        parse_dtype(name)
    with pytest.raises(ValueError) as refused:
        parse_dtype("float64")
    assert str(sorted(dtypes)) in str(refused.value)
