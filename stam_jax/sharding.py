"""Data parallelism: one 'data' mesh axis over every device of every process.

This is what `pmap` means today: `jax.jit` with the batch sharded on the 'data' axis and the
params replicated (`NamedSharding`). Multi-host runs join with `jax.distributed.initialize`, and
each process feeds its own share of every global batch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run (no-op for a single process, or when already joined).

    Args:
      coordinator: 'host:port' of process 0; '' for a single-process run, or to let JAX
        discover a cluster it knows (SLURM, TPU pods, ...) when `num_processes` is 0.
      num_processes: total processes (1: single process).
      process_id: this process's rank.
    """
    if (num_processes == 1 and not coordinator) or jax.distributed.is_initialized():
        return  # single process, or already joined (training's periodic evaluation)
    # CPU collectives across processes need gloo (GPU runs use NCCL and ignore this). The
    # backend must not be touched before initialize(), so this is set unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory` ('' leaves it off)."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    # Cache every program: eval compiles once, and even a one-second compile is worth skipping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices (all processes), axis 'data'."""
    return Mesh(np.asarray(jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of values every device holds whole (params)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batches: the leading axis split over 'data'."""
    return NamedSharding(mesh, P(DATA))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch, refusing sizes that do not divide.

    Every process must hold as many devices as every other: each feeds an equal share of
    every batch (and of the videos).

    Raises:
      ValueError: naming the batch size, the device count and the nearest valid sizes, or
        the processes whose device counts differ.
    """
    devices = mesh.devices.size
    per_process: dict[int, int] = {}
    for device in mesh.devices.flat:
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    if len(set(per_process.values())) > 1:
        counts = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
        raise ValueError(
            f"the processes hold different numbers of devices ({counts}); each feeds an equal "
            "share of every batch, so start every process with as many devices (the same "
            "GPUs per host, or the same XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "on CPU)."
        )
    if global_batch < 1:
        raise ValueError(
            f"batch_size={global_batch}: must be at least 1 (a multiple of the {devices} "
            f"device(s)), e.g. --config.batch_size={devices}."
        )
    if global_batch % devices:
        lower = max(devices, global_batch // devices * devices)
        raise ValueError(
            f"batch_size={global_batch} does not divide over {devices} devices; use a multiple "
            f"of {devices}, e.g. --config.batch_size={lower} or {lower + devices}."
        )
    return global_batch // len(per_process)


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles the global batch from each process's local rows."""
    return jax.make_array_from_process_local_data(sharding, local)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it fed them."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a tree of host values on every device of the mesh.

    Leaves may be numpy or jax arrays, or Python / numpy scalars (0-d arrays). Dtypes are
    JAX's (float64 becomes float32 unless `jax_enable_x64` is on), as `jax.device_put` gives.
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)  # a scalar has no .shape; a jax array is fetched once
        host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
        return jax.make_array_from_callback(host.shape, sharding, lambda _: host)

    return jax.tree.map(put, tree)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a plain list for a single process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)])) for row, n in zip(gathered, sizes.ravel(), strict=True)
    ]
