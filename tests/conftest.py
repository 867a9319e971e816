"""Shared fixtures: official-format checkpoints from the PyTorch reference with random weights."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

# jax, flax and torch are imported where they are used, not here: a test file's function that a
# test runs in a process started with 'spawn' (a stand-in decoder) has that process import the
# test file, and with it this file; importing them took 4.5 s of CPU in each such process.

ROOT = Path(__file__).resolve().parent.parent

# XLA flags for this test session and the processes its tests start (set here, before any test
# starts JAX's CPU backend). XLA:CPU spends most of a
# compile in LLVM's optimisation passes, and compiling is most of this suite's time: at
# optimisation level 0 the demo model's train step compiles in 4.5-5.1 s of CPU instead of
# 11.6-11.8 s, and runs in 0.055 s instead of 0.03 s, which the tests' few steps do not feel
# (benchmarks/compile_opt_level.py, BENCHMARKS.md). Results may differ from the default
# level's in the last bits (float operations in another order), which the tests' tolerances
# allow; bit-identical checks compare two runs under the same flags. The default level, which
# users get, is what the full-size parity test runs at (`USER_XLA_FLAGS`).
# XLA:CPU's fusion emitters off as well: at level 0 that halves a train step's compile CPU time
# (the tiny model's: 3.7-4.3 s instead of 7.3-7.7 s) and slows its run by up to 1.75x (the tiny
# one's 1.5x, the demo model's 1.4-1.75x at batch 16), with the same loss. The suite: pytest
# 742 s -> 667 s (benchmarks/compile_opt_level.py, BENCHMARKS.md).
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_missing = [f for f in TEST_XLA_FLAGS.split() if f not in USER_XLA_FLAGS.split()]
os.environ["XLA_FLAGS"] = " ".join([*USER_XLA_FLAGS.split(), *_missing])


# The commands keep compiled programs in `$XDG_CACHE_HOME/stam_jax/xla` (`~/.cache/...` where it
# is unset) by default: this session and the processes its tests start have a home and a cache
# folder of their own, so that no test writes into the user's or starts from programs that an
# earlier session cached. A process a test starts with multiprocessing that imports this file
# (to run a test file's function) has that home already, and may end by os._exit, which would
# leave a home of its own behind.
if multiprocessing.parent_process() is None:
    os.environ["HOME"] = tempfile.mkdtemp(prefix="stam-jax-tests-home-")
    os.environ["XDG_CACHE_HOME"] = str(Path(os.environ["HOME"]) / ".cache")
    atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child process with `devices` CPU devices (and this session's flags)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


# The test files that take longest (seconds in `make test`'s --durations on 2 cores), run first:
# pytest-xdist hands out whole files (--dist loadfile, in this order with
# --no-loadscope-reorder), so a long file started last would leave the other worker idle.
LONGEST_FIRST = (
    "test_benchmarks.py",  # ~215 s
    "test_prepare.py",  # ~140 s
    "test_train.py",  # ~135 s
    "test_demo.py",  # ~100 s
    "test_train_step.py",  # ~90 s
    "test_model.py",  # ~70 s
    "test_parity.py",  # ~50 s
    "test_eval.py",  # ~45 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts the longest files first, the rest in their usual order (the sort is stable)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@contextlib.contextmanager
def held_here(folder: Path) -> Iterator[str]:
    """Holds `folder` as an earlier run in this process would (`stam_jax.paths.claimed`, process
    index 0); yields the end of the message another run is refused with, after its flag."""
    from stam_jax.paths import LOCK_FILE, claimed

    with claimed(folder, 0, "--workdir"):
        holder = json.loads((folder / LOCK_FILE.format(process=0)).read_text())
        yield (
            f" is in use by another run (process {os.getpid()} on {holder['host']} since "
            f"{holder['since']}: {holder['command']}); wait for it to end or stop it, or give "
            "another folder."
        )


def files_in(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` with its contents, but the claims on it (`held_here`)."""
    return {
        p: p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".stam-jax-p")
    }


def free_port() -> int:
    """A free localhost TCP port (for jax.distributed's coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pools_refusing_after(submits: int) -> list[str]:
    """`python -c SCRIPT`, the command line's start for a script (the next argument) and its
    flags, in which decoding processes start for the first `submits` jobs and the system then
    refuses any more, as one out of processes does (BlockingIOError from every pool's submit)."""
    script = f"""
import runpy, sys
from stam_jax.data import loader
submit, taken = loader._submit, []
def refusing(*args, **kwargs):
    taken.append(1)
    if len(taken) > {submits}:
        raise BlockingIOError(11, "Resource temporarily unavailable")
    return submit(*args, **kwargs)
loader._submit = refusing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    return [sys.executable, "-c", script]


# What a command says when no decoding process can be started, before what it kept.
NO_DECODING_PROCESSES = (
    "error: cannot start decoding processes: a new process pool refused work twice "
    "(BlockingIOError: [Errno 11] Resource temporarily unavailable), so no video can be "
    "decoded. The system is likely short of processes, memory or open files (see `ulimit "
    "-u` and `ulimit -n`): free some, or use fewer decoding processes "
    "(--config.data.workers, or --workers of stam_jax.data.prepare; 0 decodes in this "
    "process). "
)


def jaxpr_equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those of nested jaxprs (scan, remat, jit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from jaxpr_equations(inner)


def process_running(pid: int) -> bool:
    """Whether process `pid` runs: not ended, nor ended and not yet reaped (a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False  # already reaped
    return state not in ("Z", "X")


def child_pids() -> set[int]:
    """The pids of this process's multiprocessing children that still run (decoding workers).

    A child that has exited but is not yet reaped (a zombie) has ended, and is left out:
    `active_children()` alone may still list a worker that was terminated and waited for, while
    the pool's own manager thread is reaping it at the same moment.
    """
    return {c.pid for c in multiprocessing.active_children() if process_running(c.pid)}


def run_processes(
    commands: Sequence[list[str]],
    devices_each: int,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> list[tuple[int, str, str]]:
    """Starts the processes of one multi-process run together; (exit status, stdout, stderr)."""
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(devices_each),
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in commands
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def __getattr__(name: str) -> Any:
    """`TINY_CONFIGS`, made on first use (`from conftest import TINY_CONFIGS` included)."""
    if name == "TINY_CONFIGS":
        return _tiny_configs()
    raise AttributeError(f"module 'conftest' has no attribute {name!r}")


@functools.cache
def _tiny_configs() -> dict[str, dict[str, Any]]:
    """Small architectures that exercise every size knob of the converter and the model."""
    from stam_jax import create_model, model_config

    return {
        "tiny": model_config(create_model("stam_tiny")),
        "odd_sizes": model_config(
            create_model(
                "stam_tiny",
                num_frames=8,
                num_classes=7,
                hidden_size=48,
                num_heads=3,
                mlp_dim=96,
                depth=3,
                temporal_depth=1,
                temporal_heads=6,
                temporal_mlp_dim=40,
            )
        ),
        "patch16_400cls": model_config(
            create_model(
                "stam_tiny",
                num_frames=2,
                image_size=48,
                patch_size=16,
                hidden_size=64,
                num_classes=400,
            )
        ),
        "mean": model_config(create_model("stam_tiny_mean")),
    }


def convert_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The converter options a config needs (head counts are not stored in checkpoints)."""
    return dict(
        num_heads=config["num_heads"],
        temporal_heads=config.get("temporal_heads"),
        num_frames=config["num_frames"] if config["aggregate"] == "mean" else None,
    )


def cli_args(config: dict[str, Any]) -> list[str]:
    """`convert_kwargs` as command-line flags of `python -m convert`."""
    args = ["--num-heads", str(config["num_heads"])]
    if config["aggregate"] == "mean":
        return [*args, "--num-frames", str(config["num_frames"])]
    return [*args, "--temporal-heads", str(config["temporal_heads"])]


def random_videos(config: dict[str, Any], batch: int, seed: int = 0) -> np.ndarray:
    """uint8 videos `(B, T, H, W, 3)` for a model config."""
    t, s = config["num_frames"], config["image_size"]
    return np.random.default_rng(seed).integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8)


def torch_logits(reference: torch.nn.Module, videos: np.ndarray) -> np.ndarray:
    """The reference model's logits for uint8 videos."""
    import torch

    from convert.torch_reference import frames_from_videos

    with torch.inference_mode():
        return reference(frames_from_videos(videos)).numpy()


def random_params(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Flax params converted from the reference with `randomize_` weights.

    Unlike a fresh Flax init (whose attention is nearly uniform), every part of the network
    then visibly shapes the output.
    """
    from convert.mapping import torch_to_flax
    from convert.torch_reference import randomize_, reference_from_config

    reference = randomize_(reference_from_config(config), seed=seed)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    return torch_to_flax(state_dict, **convert_kwargs(config))[1]


@pytest.fixture
def official_pth(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: writes an official-format `.pth` of a random reference model."""

    def make(
        config: dict[str, Any],
        *,
        seed: int = 0,
        wrap: Callable[[dict], Any] = lambda sd: {"model": sd},
        edit: Callable[[dict], None] | None = None,
        name: str = "official.pth",
        **reference_kwargs: Any,
    ) -> tuple[Path, torch.nn.Module]:
        import torch

        from convert.torch_reference import randomize_, reference_from_config

        reference = randomize_(reference_from_config({**config, **reference_kwargs}), seed=seed)
        state_dict = dict(reference.state_dict())
        if edit is not None:
            edit(state_dict)
        path = tmp_path / name
        torch.save(wrap(state_dict), path)
        return path, reference

    return make
