"""Data parallelism: one 'data' mesh axis over every device of every process.

This is what `pmap` means today: `jax.jit` with the batch sharded on the 'data' axis and the
params replicated (`NamedSharding`). Multi-host runs join with `jax.distributed.initialize`, and
each process feeds its own share of every global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def check_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Refuses `--config.distributed.*` settings that `jax.distributed` would fail on.

    Raises:
      ValueError: naming the flag and the fix.
    """
    n, pid = num_processes, process_id
    if n < 0:
        raise ValueError(
            f"--config.distributed.num_processes={n}; use 1 (one process), N > 1 with a "
            "coordinator, or 0 (JAX discovers the cluster)."
        )
    if n > 1 and not coordinator:
        raise ValueError(
            f"--config.distributed.num_processes={n} needs --config.distributed.coordinator="
            "HOST:PORT (process 0's address, the same in every process), or set num_processes=0 "
            "to let JAX discover a cluster it knows (SLURM, TPU pods)."
        )
    if n >= 1 and not 0 <= pid < n:
        raise ValueError(
            f"--config.distributed.process_id={pid} with num_processes={n}; give each process "
            f"a distinct id from 0 to {n - 1}."
        )


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


def local_batch_size(global_batch: int, mesh: Mesh, name: str = "global_batch") -> int:
    """This process's share of a global batch, refusing sizes that do not divide.

    Every process must hold as many devices as every other: each feeds an equal share of
    every batch (and of the videos).

    Raises:
      ValueError: naming the batch size (as `name`: the flag, for a command line), the device
        count and the nearest valid sizes, or the processes whose device counts differ.
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
            f"{name}={global_batch}: must be at least 1 (a multiple of the {devices} "
            f"device(s)), e.g. {name}={devices}."
        )
    if global_batch % devices:
        lower = max(devices, global_batch // devices * devices)
        raise ValueError(
            f"{name}={global_batch} does not divide over {devices} devices; use a multiple "
            f"of {devices}, e.g. {name}={lower} or {lower + devices}."
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


def tree_digest(tree: Any) -> str:
    """A short checksum of a tree of host arrays (params), to compare across processes."""
    crc = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        crc = zlib.crc32(jax.tree_util.keystr(path).encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(leaf).view(np.uint8).reshape(-1), crc)
    return f"{crc:08x}"


def by_content(shown: str, content: str) -> dict[str, str]:
    """A setting of `processes_agree` compared by its `content` alone (a digest), named as
    `shown` (with the path it was read from): the processes of one run may read the same data
    or checkpoint at other paths."""
    return {"shown": shown, "content": content}


def _compared(value: Any) -> Any:
    """What `processes_agree` compares of a setting: the content of a `by_content` one."""
    is_content = isinstance(value, dict) and set(value) == {"shown", "content"}
    return value["content"] if is_content else value


def _shown(value: Any) -> Any:
    """A setting as `processes_agree` names it."""
    is_content = isinstance(value, dict) and set(value) == {"shown", "content"}
    return value["shown"] if is_content else value


def processes_agree(settings: dict[str, Any] | None, refusal: str | None = None) -> str | None:
    """Compares this process's run with every other's (a single process: nothing to compare).

    Args:
      settings: what must be the same in every process (flag -> JSON-able value, or a
        `by_content` one, compared by content only); None for a process that refuses the run.
      refusal: why this process refuses the run (None: it would go on).

    Returns:
      None when every process may go on; else why not: this process's refusal, another
      process's (named), or each setting whose value differs, with every process's value.
    """
    if jax.process_count() == 1:
        return refusal
    everyone = allgather_json({"settings": settings, "refusal": refusal})
    if refusal is not None:
        return refusal
    for pid, part in enumerate(everyone):
        if part["refusal"] is not None:
            return f"process {pid} refused the run: {part['refusal']}"
    differ = []
    for key in settings:
        values = [part["settings"].get(key) for part in everyone]
        if any(_compared(v) != _compared(values[0]) for v in values):
            each = ", ".join(f"process {pid}: {_shown(v)}" for pid, v in enumerate(values))
            differ.append(f"{key} ({each})")
    if not differ:
        return None
    return (
        f"the processes were started with different settings: {'; '.join(differ)}. Start "
        "every process with the same command, only --config.distributed.process_id differing "
        "(data and checkpoints may be at other paths on other hosts, holding the same)."
    )


@contextlib.contextmanager
def shared_refusals(
    error: type[Exception],
) -> Iterator[Callable[[Callable[[], dict[str, Any]]], None]]:
    """Makes a refusal in one process of a multi-process run a refusal in all of them.

    Yields `agree(settings)`, to call once every check of the run has passed: it raises
    `error` in every process if any process refused (an `error` raised in the block before
    `agree`) or if the dicts `settings()` returns differ between processes (see
    `processes_agree`; `settings` is called only when there are several processes). Without
    it a process left alone would wait for the others' data until the collectives time out,
    then fail on a message of theirs.
    """
    agreed = False

    def agree(settings: Callable[[], dict[str, Any]]) -> None:
        nonlocal agreed
        agreed = True
        problem = processes_agree(settings() if jax.process_count() > 1 else {})
        if problem:
            raise error(problem)

    try:
        yield agree
    except error as e:
        if not agreed:
            processes_agree(None, str(e))
        raise
