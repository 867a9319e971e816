"""stam_jax.sharding's helpers, on this process's devices."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_tree_digest_tells_params_apart() -> None:
    params = {"a": np.arange(4, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
    other = {"a": params["a"], "b": {"c": params["b"]["c"] * 2}}
    assert sharding.tree_digest(params) == sharding.tree_digest(jax.tree.map(np.copy, params))
    assert sharding.tree_digest(params) != sharding.tree_digest(other)
