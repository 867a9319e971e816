"""stam_jax.sharding's helpers, on this process's devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, xla_flags

from stam_jax import sharding


def test_put_replicated_takes_arrays_and_scalars() -> None:
    mesh = sharding.data_mesh()
    tree = {
        "kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf16": jnp.ones(3, jnp.bfloat16),
        "step": 7,
        "rate": 0.5,
        "f64": np.float64(2.25),
        "flag": True,
    }
    placed = sharding.put_replicated(tree, mesh)
    want = sharding.replicated(mesh)
    for name, leaf in placed.items():
        assert isinstance(leaf, jax.Array), name
        assert leaf.sharding == want, name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(tree[name]), err_msg=name)
    assert placed["kernel"].shape == (2, 3)
    assert placed["bf16"].dtype == jnp.bfloat16
    assert (placed["step"].dtype, placed["step"].shape) == (np.int32, ())
    assert placed["rate"].dtype == np.float32
    assert placed["f64"].dtype == np.float32  # JAX's dtype without x64, as device_put gives
    assert placed["flag"].dtype == np.bool_


def test_local_batch_size_refuses_processes_with_different_device_counts() -> None:
    # 2 + 1 devices: the batch divides over 3 devices, but no equal share per process exists;
    # it used to fail after the compile, in make_array_from_process_local_data.
    def mesh(*processes: int) -> SimpleNamespace:
        devices = [SimpleNamespace(process_index=p) for p in processes]
        return SimpleNamespace(devices=np.array(devices, dtype=object))

    assert sharding.local_batch_size(8, mesh(0, 0, 1, 1)) == 4
    assert sharding.local_batch_size(6, mesh(0, 0, 0)) == 6
    with pytest.raises(
        ValueError, match=r"different numbers of devices \(process 0: 2, process 1: 1\)"
    ):
        sharding.local_batch_size(3, mesh(0, 0, 1))
    # The library's message names the argument; it named the flag, --config.batch_size.
    with pytest.raises(ValueError) as info:
        sharding.local_batch_size(4, mesh(0, 0, 0, 1, 1, 1))
    assert str(info.value) == (
        "global_batch=4 does not divide over 6 devices; use a multiple of 6, e.g. "
        "global_batch=6 or 12."
    )
    with pytest.raises(
        ValueError, match=r"^global_batch=0: must be at least 1 .*global_batch=3\.$"
    ):
        sharding.local_batch_size(0, mesh(0, 0, 0))
    with pytest.raises(
        ValueError, match=r"^--config.batch_size=4 does not divide .*size=6 or 12\.$"
    ):
        sharding.local_batch_size(4, mesh(0, 0, 0, 1, 1, 1), "--config.batch_size")


def test_processes_agree_names_a_refusal_or_each_setting_that_differs(monkeypatch) -> None:
    # Process 1 of 2 started with another batch size and other data, or refusing the run:
    # every process refuses, naming it, rather than training or evaluating each its own way
    # (or waiting for the other until the collectives time out).
    others: list = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "allgather_json", lambda mine: [mine, *others])
    same = {"--config.batch_size": 6, "--config.data.root's listing": "/a (digest 1)"}
    others[:] = [{"settings": dict(same), "refusal": None}]
    assert sharding.processes_agree(same) is None
    others[:] = [{"settings": {**same, "--config.batch_size": 12}, "refusal": None}]
    assert sharding.processes_agree(same) == (
        "the processes were started with different settings: --config.batch_size (process 0: 6, "
        "process 1: 12). Start every process with the same command, only "
        "--config.distributed.process_id differing (data and checkpoints may be at other paths "
        "on other hosts, holding the same)."
    )
    others[:] = [{"settings": None, "refusal": "--config.data.root: /x does not exist."}]
    assert sharding.processes_agree(same) == (
        "process 1 refused the run: --config.data.root: /x does not exist."
    )
    assert sharding.processes_agree(None, "mine") == "mine"  # a refusal is its own message

    # shared_refusals: a refusal before agree() is shared with the others, then raised.
    shared = []
    monkeypatch.setattr(sharding, "allgather_json", lambda mine: shared.append(mine) or [mine])
    with pytest.raises(KeyError, match="bad root"), sharding.shared_refusals(KeyError):
        raise KeyError("bad root")
    assert shared == [{"settings": None, "refusal": "'bad root'"}]
    others[:] = [{"settings": {**same, "--config.batch_size": 12}, "refusal": None}]
    monkeypatch.setattr(sharding, "allgather_json", lambda mine: [mine, *others])
    with pytest.raises(KeyError, match="batch_size"), sharding.shared_refusals(KeyError) as agree:
        agree(lambda: same)
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with sharding.shared_refusals(KeyError) as agree:  # one process: settings() is not called
        agree(lambda: 1 / 0)


def test_compiler_options_turn_triton_gemms_off_on_gpu_only(monkeypatch) -> None:
    assert jax.default_backend() == "cpu"
    assert sharding.compiler_options(False) is None  # no such option outside the GPU backend
    monkeypatch.setattr(sharding.jax, "default_backend", lambda: "gpu")
    assert sharding.compiler_options(False) == {"xla_gpu_enable_triton_gemm": False}
    assert sharding.compiler_options(True) is None  # XLA's default


def test_tree_digest_tells_params_apart() -> None:
    params = {"a": np.arange(4, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
    other = {"a": params["a"], "b": {"c": params["b"]["c"] * 2}}
    assert sharding.tree_digest(params) == sharding.tree_digest(jax.tree.map(np.copy, params))
    assert sharding.tree_digest(params) != sharding.tree_digest(other)
    # Every byte of every leaf counts, and where the leaf is.
    last = {"a": params["a"].copy(), "b": params["b"]}
    last["a"][-1] += 1
    assert sharding.tree_digest(params) != sharding.tree_digest(last)
    moved = {"a": params["a"], "d": params["b"]}
    assert sharding.tree_digest(params) != sharding.tree_digest(moved)


BATCHES = """
import jax, numpy as np
from jax.sharding import Mesh
from stam_jax import sharding

mesh = sharding.data_mesh()
assert mesh.axis_names == ("data",) and mesh.devices.tolist() == jax.devices(), mesh
rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
batch = sharding.to_global(rows, sharding.batch_sharded(mesh))
assert batch.shape == (8, 3)
for shard in batch.addressable_shards:  # two rows on each device, in device order
    start = 2 * mesh.devices.tolist().index(shard.device)
    assert shard.index[0] == slice(start, start + 2), shard.index
    np.testing.assert_array_equal(np.asarray(shard.data), rows[start : start + 2])
doubled = jax.jit(lambda x: x * 2, out_shardings=sharding.batch_sharded(mesh))(batch)
np.testing.assert_array_equal(sharding.local_rows(doubled), rows * 2)
# The rows come back in the order they were fed, whichever devices hold which.
backwards = Mesh(np.asarray(jax.devices()[::-1]), ("data",))
placed = sharding.to_global(rows, sharding.batch_sharded(backwards))
np.testing.assert_array_equal(sharding.local_rows(placed), rows)
params = sharding.put_replicated({"w": rows[0]}, mesh)["w"]
assert [np.asarray(s.data).tolist() for s in params.addressable_shards] == [[0, 1, 2]] * 4
print("ok", jax.device_count())
"""


def test_batches_are_split_over_the_data_axis_and_read_back_in_order() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", BATCHES], env=env, capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "4"]


def test_allgather_json_gives_every_process_object_whole(monkeypatch) -> None:
    # Two processes, this one (0) with the shorter JSON: each row is padded to the longest.
    from jax.experimental import multihost_utils

    other = {"settings": {"root": "/data/kinetics/" * 3}, "refusal": None}
    theirs = np.frombuffer(json.dumps(other).encode(), np.uint8)

    def allgather(mine: np.ndarray) -> np.ndarray:
        if mine.dtype == np.int64:  # the sizes
            return np.stack([mine, np.array([theirs.size])])
        padded = np.zeros_like(mine)
        padded[: theirs.size] = theirs
        return np.stack([mine, padded])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    mine = {"settings": {"root": "/d"}, "refusal": "no \u00e9"}
    assert sharding.allgather_json(mine) == [mine, other]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert sharding.allgather_json(mine) == [mine]


def test_by_content_settings_are_compared_by_content_and_shown_by_name() -> None:
    setting = sharding.by_content("/host1/ckpt (checksum 1a2b)", "1a2b")
    assert sharding.is_by_content(setting)
    assert (sharding.compared(setting), sharding.shown(setting)) == ("1a2b", setting["shown"])
    # Any other value, a dict with other keys included, is compared and shown whole.
    for value in ({"shown": "a", "content": "b", "seed": 0}, {"content": "b"}, "1a2b", 3, None):
        assert not sharding.is_by_content(value), value
        assert sharding.compared(value) == value and sharding.shown(value) == value


def test_check_distributed_refuses_what_jax_distributed_would_fail_on() -> None:
    for ok in [("", 1, 0), ("", 0, 0), ("host:1234", 2, 1)]:
        sharding.check_distributed(*ok)
    with pytest.raises(ValueError, match=r"^--config.distributed.num_processes=-1; use 1 \(one"):
        sharding.check_distributed("", -1, 0)
    with pytest.raises(ValueError, match=r"^--config.distributed.num_processes=2 needs --config"):
        sharding.check_distributed("", 2, 0)
    with pytest.raises(ValueError, match=r"^--config.distributed.num_processes=0 with --config"):
        sharding.check_distributed("host:1234", 0, 0)  # jax: a line naming no flag
    with pytest.raises(ValueError, match=r"process_id=2 with num_processes=2; .* from 0 to 1\.$"):
        sharding.check_distributed("host:1234", 2, 2)
    with pytest.raises(ValueError, match=r"process_id=-1 with num_processes=1"):
        sharding.check_distributed("", 1, -1)


@pytest.mark.parametrize(
    "coordinator", ["localhost", "localhost:", ":1234", "host:http", "h:0", "h:65536"]
)
def test_a_coordinator_that_is_not_host_and_port_is_refused(coordinator) -> None:
    # jax.distributed failed on these with a traceback (IndexError: list index out of range
    # without a port; "Failed to start RPC server" for a port that is no number).
    for ok in ["localhost:12355", "10.0.0.1:1", "[::1]:65535"]:
        sharding.check_distributed(ok, 2, 1)  # process 1: its port is not bound here
    with pytest.raises(
        ValueError,
        match=rf"^--config.distributed.coordinator={re.escape(coordinator)}: use HOST:PORT, "
        r"process 0's host and a free port from 1 to 65535 \(e.g. localhost:12355 ",
    ):
        sharding.check_distributed(coordinator, 2, 0)


def test_a_coordinator_port_in_use_is_refused_in_process_0() -> None:
    # jax.distributed's coordination service, started by process 0 on a port another program
    # listens on, ended the process with a segmentation fault.
    import socket

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(
            ValueError,
            match=rf"^--config.distributed.coordinator=localhost:{port}: process 0 cannot listen "
            rf"on port {port} of this host \(Address already in use\): another program, or an "
            r"earlier run still ending, holds it; give a free port, the same in every process\.$",
        ):
            sharding.check_distributed(f"localhost:{port}", 2, 0)
        sharding.check_distributed(f"localhost:{port}", 2, 1)  # not process 0: it connects
    sharding.check_distributed(f"localhost:{port}", 2, 0)  # free again


def test_a_port_left_in_time_wait_by_an_ended_run_is_free_to_the_coordinator() -> None:
    # The coordination service listens with SO_REUSEADDR, as servers do: a port whose last
    # connection is in TIME_WAIT (an earlier run that just ended) is free to it, and must not
    # be refused as in use.
    import socket

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server's side closes first: its end enters TIME_WAIT
            client.recv(1)
    with socket.socket() as plain, pytest.raises(OSError, match="Address already in use"):
        plain.bind(("0.0.0.0", port))  # what a check without SO_REUSEADDR would see
    sharding.check_distributed(f"localhost:{port}", 2, 0)


def test_processes_agree_on_data_at_other_paths_and_name_the_paths_of_data_that_differs(
    monkeypatch,
) -> None:
    # Hosts that hold the same checkpoint at other paths start one run; other params do not.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mine = {"--config.checkpoint's params": sharding.by_content("/a/ckpt (checksum 1a)", "1a")}
    other = {"--config.checkpoint's params": sharding.by_content("/b/ckpt (checksum 1a)", "1a")}
    gathered = [{"settings": mine, "refusal": None}, {"settings": other, "refusal": None}]
    monkeypatch.setattr(sharding, "allgather_json", lambda _: gathered)
    assert sharding.processes_agree(mine) is None
    other["--config.checkpoint's params"] = sharding.by_content("/a/ckpt (checksum 2b)", "2b")
    assert sharding.processes_agree(mine).startswith(
        "the processes were started with different settings: --config.checkpoint's params "
        "(process 0: /a/ckpt (checksum 1a), process 1: /a/ckpt (checksum 2b)). "
    )


def test_the_compilation_cache_is_set_up_to_keep_every_program(tmp_path, monkeypatch) -> None:
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "env"))
        sharding.enable_compilation_cache("")  # off, whatever JAX_COMPILATION_CACHE_DIR says
        assert jax.config.jax_compilation_cache_dir is None
        sharding.enable_compilation_cache("~/xla")
        # JAX takes '~' as a folder named '~' in the working directory.
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        # Eval compiles once: even a quick compile, or a small program, is kept.
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


@pytest.mark.parametrize("setting, kept_in", [("", None), ("{tmp}/config", "config")])
def test_the_config_decides_the_cache_whatever_the_environment_says(tmp_path, setting, kept_in):
    # JAX_COMPILATION_CACHE_DIR turns JAX's cache on for every program of a process; the
    # config's setting decides for the commands: '' is off, a folder is the cache.
    script = (
        "import sys, jax; from stam_jax import sharding; "
        "sharding.enable_compilation_cache(sys.argv[1]); jax.jit(lambda x: x * 3)(1.0)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "env"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # keep even this quick compile
    }
    command = [sys.executable, "-c", script, setting.format(tmp=tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = {p.parent.name for p in tmp_path.rglob("*-cache")}
    assert kept == ({kept_in} if kept_in else set())
