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
    with pytest.raises(ValueError, match=r"batch_size=4 does not divide over 6 devices"):
        sharding.local_batch_size(4, mesh(0, 0, 0, 1, 1, 1))
