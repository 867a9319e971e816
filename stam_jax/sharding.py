"""Data parallelism: one 'data' mesh axis over every device of every process.

This is what `pmap` means today: `jax.jit` with the batch sharded on the 'data' axis and the
params replicated (`NamedSharding`). Multi-host runs join with `jax.distributed.initialize`, and
each process feeds its own share of every global batch.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stam_jax.interrupts import terminated

DATA = "data"


# Seconds the processes of a multi-process run are given to join (jax's own default); a process
# still waiting then ends with a message saying what to check (`initialize_distributed`).
JOIN_TIMEOUT_S = 300
_JOIN_MARGIN_S = 30  # jax's own join timeout is this much later, so that ours ends the wait


def distributed_settings(dist: Any) -> tuple[str, int, int, int]:
    """(coordinator, num_processes, process_id, join_timeout) of a run config's `distributed`
    section, for `check_distributed` and `initialize_distributed` (a section written before
    `join_timeout` existed gets the default)."""
    timeout = dist.get("join_timeout", JOIN_TIMEOUT_S)
    return dist.coordinator, dist.num_processes, dist.process_id, timeout


def check_distributed(
    coordinator: str, num_processes: int, process_id: int, join_timeout: int = JOIN_TIMEOUT_S
) -> None:
    """Refuses `--config.distributed.*` settings that `jax.distributed` would fail on.

    Raises:
      ValueError: naming the flag and the fix.
    """
    n, pid = num_processes, process_id
    if isinstance(join_timeout, bool) or not isinstance(join_timeout, int) or join_timeout < 1:
        raise ValueError(
            f"--config.distributed.join_timeout={join_timeout!r}; give the seconds the processes "
            f"may take to join, a whole number >= 1 (default {JOIN_TIMEOUT_S})."
        )
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
    if n == 0 and coordinator:  # jax.distributed's own refusal of 0 named no flag
        raise ValueError(
            f"--config.distributed.num_processes=0 with --config.distributed.coordinator="
            f"{coordinator}: give the processes' count, num_processes=N (the same in every "
            "process), with the coordinator, or leave the coordinator out to let JAX discover "
            "a cluster it knows (SLURM, TPU pods)."
        )
    if n >= 1 and not 0 <= pid < n:
        raise ValueError(
            f"--config.distributed.process_id={pid} with num_processes={n}; give each process "
            f"a distinct id from 0 to {n - 1}."
        )
    host, colon, port = coordinator.rpartition(":")
    # jax.distributed failed on these with an IndexError (no port) or "Failed to start RPC
    # server" (a port that is no number), each as a traceback.
    if coordinator and not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            f"--config.distributed.coordinator={coordinator}: use HOST:PORT, process 0's host "
            "and a free port from 1 to 65535 (e.g. localhost:12355 or 10.0.0.1:12355), the "
            "same in every process."
        )
    # Process 0 starts the coordination service there: on a port in use, jax crashed with a
    # segmentation fault. (Already joined, as the periodic evaluation is, it holds the port.)
    busy = pid == 0 and coordinator and not jax.distributed.is_initialized() and _unbindable(port)
    if busy:
        raise ValueError(
            f"--config.distributed.coordinator={coordinator}: process 0 cannot listen on port "
            f"{port} of this host ({busy}): another program, or an earlier run still ending, "
            "holds it; give a free port, the same in every process."
        )


def _unbindable(port: str) -> str | None:
    """Why a server could not listen on `port` of every interface of this host (jax's
    coordination service does), or None."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here: the IPv4 address decides
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            try:
                probe.bind((address, int(port)))
            except OSError as e:
                return e.strerror or str(e)
            return None
    return None


def initialize_distributed(
    coordinator: str,
    num_processes: int,
    process_id: int,
    join_timeout: int = JOIN_TIMEOUT_S,
    preemption: bool = True,
) -> None:
    """Joins a multi-process run (no-op for a single process, or when already joined).

    jax waits for every process to join, then ends a process still waiting by a fatal log and a
    C++ stack trace. Here a process that has waited `join_timeout` seconds ends first, with one
    `error:` line saying what to check and the exit status of a process whose peers failed
    (`stop_together`'s); and a Ctrl-C while it waits (its main thread in C, where Python's
    handler cannot run) ends it at once, as interrupted.

    Args:
      coordinator: 'host:port' of process 0; '' for a single-process run, or to let JAX
        discover a cluster it knows (SLURM, TPU pods, ...) when `num_processes` is 0.
      num_processes: total processes (1: single process).
      process_id: this process's rank.
      join_timeout: seconds to wait for every process to join.
      preemption: whether jax.distributed's preemption notifier takes SIGTERM over, for the
        processes to agree on a step to save and end at (`reached_preemption_sync_point`;
        training). Without it SIGTERM keeps the command's own handling (a Ctrl-C:
        `stam_jax.interrupts.keep_interrupts`).

    Raises:
      ValueError: `num_processes` 0 without a coordinator, and no cluster JAX can discover
        (naming the flags to give instead).
    """
    if (num_processes == 1 and not coordinator) or jax.distributed.is_initialized():
        return  # single process, or already joined (training's periodic evaluation)
    # CPU collectives across processes need gloo (GPU runs use NCCL and ignore this). The
    # backend must not be touched before initialize(), so this is set unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", preemption)
    joined = threading.Event()
    waiting = threading.Thread(
        target=_end_if_not_joined,
        args=(joined, coordinator, num_processes, process_id, join_timeout),
        name="stam-join-wait",
        daemon=True,
    )
    waiting.start()
    timeout = {"initialization_timeout": join_timeout + _JOIN_MARGIN_S}
    try:
        if coordinator:
            jax.distributed.initialize(coordinator, num_processes, process_id, **timeout)
        else:
            try:
                jax.distributed.initialize(**timeout)
            except (ValueError, RuntimeError) as e:  # no cluster found: a traceback, exit 1
                raise ValueError(
                    f"--config.distributed.num_processes={num_processes}: JAX found no cluster "
                    f"to join ({e}); run it in one JAX discovers (SLURM, a TPU pod, ...), or give "
                    "--config.distributed.num_processes=N and --config.distributed.coordinator="
                    "HOST:PORT (num_processes=1: one process)."
                ) from None
    finally:
        with _Stop.lock:  # taken by the waiting thread while it ends this process
            joined.set()
    waiting.join()
    _start_watching()


def _end_if_not_joined(
    joined: threading.Event, coordinator: str, n: int, pid: int, join_timeout: int
) -> None:
    """The thread of `initialize_distributed`: ends this process once it has waited
    `join_timeout` seconds to join, or on a Ctrl-C while it waits; returns once it has joined."""
    deadline = time.monotonic() + join_timeout
    while not joined.wait(_POLL_S / 2):
        _read_written_signals()
        late = time.monotonic() >= deadline
        if not (late or _Stop.interrupted):
            continue
        with _Stop.lock:
            if joined.is_set():
                return
            if _Stop.interrupted:
                line = (
                    "interrupted: while waiting for the other processes to join; nothing was "
                    "written."
                )
                status = _Stop.status_of(KeyboardInterrupt()) if _Stop.status_of else 130
            else:
                line = f"error: {_not_joined(coordinator, n, pid, join_timeout)}"
                status = _Stop.peer_status
            print(line, file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(status)


def _not_joined(coordinator: str, n: int, pid: int, join_timeout: int) -> str:
    """What to check when the processes have not all joined within `join_timeout` seconds."""
    waited = f"within --config.distributed.join_timeout={join_timeout} s"
    start = (
        f"Start every process with the same --config.distributed.coordinator and "
        f"num_processes={n}, each with its own process_id from 0 to {n - 1}; where they start "
        "at different times (a scheduler's queue), raise join_timeout."
    )
    if not coordinator:
        return (
            f"the processes of the cluster JAX found did not all join {waited}. Start every "
            "process of the job, or raise join_timeout."
        )
    if pid == 0:
        return (
            f"not every one of the {n} processes joined {waited} (this is process 0, listening "
            f"at {coordinator}). {start}"
        )
    return (
        f"process {pid} could not join the run at {coordinator} {waited}: process 0 is not "
        "listening there (not started, another host or port, a firewall), or not every one of "
        f"the {n} processes has started. {start}"
    )


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory`; '' turns it off, even where
    JAX_COMPILATION_CACHE_DIR in the environment turns it on for every JAX program. Called
    before anything is compiled (JAX settles whether it caches at its first compile).

    Raises:
      ValueError: `directory` cannot be written (a file on its path, no permission, a
        read-only file system), naming it and the fix; JAX alone would warn at every compile
        and run on without the cache.
    """
    if not directory:
        jax.config.update("jax_compilation_cache_dir", None)
        return
    from stam_jax.paths import unwritable  # (paths imports nothing of the package)

    path = os.path.expanduser(directory)
    why = unwritable(path, into=True)
    if why:
        raise ValueError(
            f"--config.compilation_cache_dir={directory} cannot be written: {why}. Give a "
            "folder this process can write to, or --config.compilation_cache_dir='' to "
            "compile without the persistent cache."
        )
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: eval compiles once, and even a one-second compile is worth skipping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compiler_options(triton_gemm: bool) -> dict[str, Any] | None:
    """XLA options for compiling the forward and the train step (`config.triton_gemm`).

    None (XLA's defaults) except on GPU with `triton_gemm` False, where XLA's Triton GEMM
    fusions are turned off: every matmul then goes to cuBLAS with its bias add in the kernel's
    epilogue, which ran the STAM forward 1.15x faster on an H200 and compiled it 2.8x faster
    (BENCHMARKS.md). Other backends have no such option, so they get None.
    """
    if triton_gemm or jax.default_backend() != "gpu":
        return None
    return {"xla_gpu_enable_triton_gemm": False}


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
    """A short checksum of a tree of host arrays (params), to compare across processes.

    Each leaf counts by its path and bytes. The checksum is kept with an interrupted
    evaluation's results (`stam_jax.partial`), so its form stays fixed: a new one would make
    kept results read as of other params. Dtype and shape are left out of it; one model's
    params with the same bytes in another dtype or shape cannot come from a checkpoint.
    """
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


def is_by_content(value: Any) -> bool:
    """Whether a setting was made by `by_content`."""
    return isinstance(value, dict) and set(value) == {"shown", "content"}


def compared(value: Any) -> Any:
    """What is compared of a setting: the content of a `by_content` one, else the value."""
    return value["content"] if is_by_content(value) else value


def shown(value: Any) -> Any:
    """A setting as messages name it: the shown part of a `by_content` one, else the value."""
    return value["shown"] if is_by_content(value) else value


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
    # Every process's keys: a setting only some hold differs too, seen alike by all of them.
    for key in dict.fromkeys(k for part in everyone for k in part["settings"]):
        values = [part["settings"].get(key) for part in everyone]
        if any(compared(v) != compared(values[0]) for v in values):
            each = ", ".join(f"process {pid}: {shown(v)}" for pid, v in enumerate(values))
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


# When one process of a multi-process run stops, the others stop too, saying why.
#
# Without this, jax 0.10.2 leaves them waiting: a process that raises runs jax's shutdown, whose
# barrier waits for every process (`shutdown_timeout_seconds`, 300 s) while the others wait for
# its part of their next collective, which never comes; both end after the 5 minutes in a page
# of coordination-service errors naming no cause. A process killed outright (SIGKILL, the
# out-of-memory killer) breaks the others' next collective at once ("Connection closed by
# peer"), but they then wait in the same shutdown barrier until jax's heartbeat timeout
# (`heartbeat_timeout_seconds`, 100 s) declares it dead. A process that raises therefore writes
# its one-line error into the coordination service's key-value store; a thread of every other
# process reads it there and ends its process with that line. Every process ends with
# `os._exit` once its output is written: jax's shutdown would wait for those already gone.
# Process 0 ends last, as the store lives in it: when it goes, jax ends the others at once
# (their own fatal message, which names no process).
_STOP_KEYS = "stam_jax/stop/"
_POLL_S = 0.25  # how often each process reads the others' reports
_GRACE_S = 3.0  # how long a deliberate stop (a refusal, a NaN loss) is left to this process's own
_LEAVE_S = 10.0  # how long process 0 waits for the others to end before it ends
# How long a deliberate stop is left to this process when its own Ctrl-C has arrived: it is
# stopping as itself, but its cleanup (grain's reading processes ended, a save let finish)
# comes before its report. Less than _LEAVE_S: the reporting process 0 ends then, and jax
# with it would end this one with its own fatal message.
_OWN_STOP_S = _LEAVE_S - 2.0


class _Stop:
    """This process's part in stopping together (one per process)."""

    lock = threading.Lock()
    claimed = False  # this process is stopping: its own failure, or another's
    status: int | None = None  # the exit status `_end_at_exit` ends this process with
    status_of: Callable[[BaseException], int] | None = None  # set by `stop_together`
    peer_status = 1
    watching = False
    checked = False  # `stop_if_another_failed` has looked
    interrupted = False  # a Ctrl-C has reached this process in the block of `stop_together`
    written: int | None = None  # the pipe's end Python's signal handler writes to (`_noted_in_c`)
    written_lock = threading.Lock()  # the watcher reads it while the main thread may close it
    watcher: threading.Thread | None = None
    ending = threading.Event()  # set once this process has left the run normally (`_end_at_exit`)


def _claim() -> bool:
    """Whether this caller is the first to stop this process (the watcher or the main thread)."""
    with _Stop.lock:
        first, _Stop.claimed = not _Stop.claimed, True
        return first


def _client() -> Any:
    """jax's coordination-service client (None: not a multi-process run)."""
    from jax._src import distributed

    return distributed.global_state.client


def _me() -> tuple[int, int]:
    """(this process's id, the number of processes), as jax.distributed was joined.

    Not `jax.process_index()`: the watcher thread starts before JAX's backend, which that call
    would start from the thread while the main thread may still be configuring it.
    """
    from jax._src import distributed

    return distributed.global_state.process_id, distributed.global_state.num_processes


def _one_line(error: BaseException) -> str:
    """`error` as one line: its message, or its type and message when it is no refusal."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (SIGTERM)" if terminated() else "interrupted (Ctrl-C)"
    text = " ".join(str(error).split())[:500]
    if _Stop.status_of is not None and _Stop.status_of(error) != 1:
        return text  # a refusal or a stop: its message says it all
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _reports(client: Any, me: int) -> dict[int, dict[str, Any]]:
    """The other processes' reports of their failures, by process id."""
    found = {}
    for key, value in client.key_value_dir_get(f"{_STOP_KEYS}failed/"):
        pid = int(key.rsplit("/", 1)[1])
        if pid != me:
            found[pid] = json.loads(value)
    return found


def _leave(message: str | None, status: int, gone: Sequence[int] = ()) -> NoReturn:
    """Ends this process with `status` after printing `error: message` (if any) and, on process
    0, after the others but those `gone` have ended (or `_LEAVE_S`): their next request to the
    store would fail."""
    if message:
        print(f"error: {message}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        client, (me, count) = _client(), _me()
        client.key_value_set(f"{_STOP_KEYS}ended/{me}", "1", allow_overwrite=True)
        deadline = time.monotonic() + _LEAVE_S
        while me == 0 and time.monotonic() < deadline:
            if len(client.key_value_dir_get(f"{_STOP_KEYS}ended/")) >= count - len(gone):
                break
            time.sleep(_POLL_S / 2)
    os._exit(status)


def _watch() -> None:
    """The watcher thread: ends this process when another reports a failure (see above), and
    counts this process alive for the others (`_silent`)."""
    client, (me, _) = _client(), _me()
    first_seen: dict[int, float] = {}
    tick = 0
    while not _Stop.ending.is_set():  # counting on after a claim: still answering
        tick += 1
        try:
            client.key_value_set(f"{_STOP_KEYS}alive/{me}", str(tick), allow_overwrite=True)
            reports = _reports(client, me)
        except Exception:  # the store is gone with process 0: jax ends this process
            return
        _read_written_signals()
        now = time.monotonic()
        for pid, report in sorted(reports.items()):
            seen = first_seen.setdefault(pid, now)
            # A deliberate stop (a refusal, a NaN loss) may be one every process comes to at
            # once: this process is given the time to come to it too, and end as itself.
            if _Stop.claimed:
                break
            grace = _OWN_STOP_S if _Stop.interrupted else _GRACE_S
            if (report["status"] == 1 or now - seen >= grace) and _claim():
                _leave(_failed(pid, report, me), _peer_stop_status(report))
        _Stop.ending.wait(_POLL_S)


def _peer_stop_status(report: dict[str, Any]) -> int:
    """The status of this process ended by another's `report`: `peer_status`, or, for a
    deliberate stop when its own Ctrl-C had arrived too, that of its own interrupt."""
    if _Stop.interrupted and report["status"] != 1 and _Stop.status_of is not None:
        return _Stop.status_of(KeyboardInterrupt())
    return _Stop.peer_status


def _failed(pid: int, report: dict[str, Any], me: int) -> str:
    return (
        f"process {pid} failed: {report['error']} (process {me} stopped with it; process "
        f"{pid}'s own output says more)."
    )


def _silent(client: Any, me: int, count: int) -> list[int]:
    """The other processes whose watcher stopped counting (`_watch`) and that reported nothing:
    killed outright (SIGKILL, out of memory) or their host gone."""
    before = dict(client.key_value_dir_get(f"{_STOP_KEYS}alive/"))
    time.sleep(6 * _POLL_S)
    after = dict(client.key_value_dir_get(f"{_STOP_KEYS}alive/"))
    return [
        pid
        for pid in range(count)
        if pid != me
        and after.get(f"{_STOP_KEYS}alive/{pid}") == before.get(f"{_STOP_KEYS}alive/{pid}")
    ]


def _start_watching() -> None:
    """Starts the watcher thread of `stop_together` (once, and only under it)."""
    if _Stop.status_of is None or _Stop.watching or _client() is None:
        return
    _Stop.watching = True
    # Run before jax's own exit handler (registered when jax was imported, so run after this
    # one): its shutdown would wait for the processes that have already ended.
    atexit.register(_end_at_exit)
    _Stop.watcher = threading.Thread(target=_watch, name="stam-stop-watch", daemon=True)
    _Stop.watcher.start()


def _end_at_exit() -> None:
    if _Stop.status is not None:
        _leave(None, _Stop.status)
    # A normal end. jax's exit handler, which runs after this one, would leave the run (a
    # barrier of every process) with the watcher still calling jax's client from its thread,
    # and a call still in progress once the interpreter finalises aborts the process ("terminate
    # called after throwing an instance of ''": a daemon thread is unwound through C++). So the
    # run is left here, the watcher still ending this process on another's report meanwhile,
    # and the watcher is then stopped (its calls to a client shut down fail at once).
    try:
        jax.distributed.shutdown()
    finally:
        _Stop.ending.set()
        if _Stop.watcher is not None:
            _Stop.watcher.join(timeout=_LEAVE_S)


@contextlib.contextmanager
def stop_together(status_of: Callable[[BaseException], int], peer_status: int) -> Iterator[None]:
    """Makes a failure of one process of a multi-process run end every process, promptly and
    saying which process failed and why (a command's `main`; nothing changes for one process).

    A failure in the block (an exception: a refusal, a NaN loss, a decoding error, Ctrl-C) is
    reported to the other processes, which end with exit status `peer_status` and the line
    `error: process K failed: <its error>`. A process killed outright (SIGKILL, out of memory)
    reports nothing: the others end at their next collective, naming it as one that stopped
    answering. This process itself leaves the block as usual (its message is printed as
    always), then ends with `status_of(error)` without jax's shutdown, which would wait for the
    processes already gone. A Ctrl-C that reaches every process ends each as interrupted: one
    whose own Ctrl-C has arrived (even while its main thread waits in C) is left `_OWN_STOP_S`
    (8 s) after another's report to report its own, and past that is ended with
    `status_of(KeyboardInterrupt())`, not `peer_status`.

    Args:
      status_of: the exit status the command ends with for an exception (1 for one it does not
        handle: a crash).
      peer_status: the exit status of a process ended by another's failure.
    """
    _Stop.status_of, _Stop.peer_status = status_of, peer_status
    _start_watching()  # already joined (a command that joins before the block)
    with _interrupts_noted():
        try:
            yield
        except BaseException as error:
            if _Stop.watching and not isinstance(error, SystemExit):
                stop_if_another_failed(error)
                _report(error)
            raise


@contextlib.contextmanager
def _interrupts_noted() -> Iterator[None]:
    """Notes in `_Stop.interrupted` each Ctrl-C that reaches this process in the block, as it
    arrives (SIGINT's handler, wrapped; from the main thread only, where handlers are set).

    A terminal's or a scheduler's Ctrl-C reaches every process at once, but each reports it
    only once its cleanup is done: one whose cleanup took more than `_GRACE_S` longer than
    another's was ended by the other's report, with status `peer_status` (5), not that of an
    interrupt. Noted, its own interrupt is left `_OWN_STOP_S` to be reported.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def noted(signum: int, frame: Any) -> Any:
        _Stop.interrupted = True
        return previous(signum, frame)

    signal.signal(signal.SIGINT, noted)
    try:
        with _noted_in_c():
            yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _noted_in_c() -> Iterator[None]:
    """Has Python's C-level signal handler write each signal's number to a pipe the watcher
    reads (`_read_written_signals`), as a wakeup fd (`signal.set_wakeup_fd`; from the main
    thread, and only where no other is set: that one is left as it was).

    SIGINT's Python handler runs only when the main thread next runs Python: a process whose
    main thread waits in C (a collective, a device's computation, a long call) when the Ctrl-C
    comes looked not interrupted for that long. The C-level handler writes at once.
    """
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        os.set_blocking(write, False)  # as set_wakeup_fd requires
        theirs = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except BaseException:
        os.close(read)
        os.close(write)
        raise
    if theirs != -1:  # another's (asyncio's): put back
        signal.set_wakeup_fd(theirs)
        os.close(read)
        os.close(write)
        yield
        return
    with _Stop.written_lock:
        _Stop.written = read
    try:
        yield
    finally:
        _read_written_signals()  # what the watcher had not read yet
        with _Stop.written_lock:
            _Stop.written = None
        mine = signal.set_wakeup_fd(-1)  # before the pipe is closed: it is written to till then
        if mine != write:  # replaced in the block by another's, which stays
            signal.set_wakeup_fd(mine)
        os.close(read)
        os.close(write)


def _read_written_signals() -> None:
    """Notes in `_Stop.interrupted` a SIGINT that Python's C-level handler wrote (`_noted_in_c`),
    emptying the pipe (the watcher thread, at each poll)."""
    written = b""
    with _Stop.written_lock:
        while _Stop.written is not None:
            try:
                chunk = os.read(_Stop.written, 4096)
            except OSError:  # BlockingIOError: nothing more written
                break
            written += chunk
            if len(chunk) < 4096:
                break
    if signal.SIGINT in written:
        _Stop.interrupted = True


def stop_if_another_failed(error: BaseException) -> None:
    """Ends this process (see `stop_together`) when `error` is another process's doing: a
    collective broken by a process that failed (its report is named) or that was killed (named
    as one that stopped answering). Returns when `error` is this process's own, to be cleaned
    up after (a save let finish) and reported as the block of `stop_together` ends.

    To call first where a failure is caught to wait for something the other processes take
    part in: a checkpoint save of a multi-process run waits for every process.
    """
    if not _Stop.watching or _Stop.checked:
        return
    _Stop.checked = True
    with _Stop.lock:
        mine = not _Stop.claimed
    if not mine:  # the watcher is ending this process with another's report
        threading.Event().wait()
    client, (me, count) = _client(), _me()
    status = _Stop.status_of(error) if _Stop.status_of else 1
    if status != 1:  # raised by this process itself: a refusal, a stop, Ctrl-C
        return
    try:
        for attempt in range(2):
            reports = _reports(client, me)
            if reports and _claim():  # an error this process did not raise: another's doing
                pid = min(reports)
                _leave(_failed(pid, reports[pid], me), _Stop.peer_status)
            if attempt == 0:
                gone = _silent(client, me, count)
    except Exception:  # the store is gone: process 0 ended without a word
        if me != 0 and _claim():
            _leave(
                "process 0 stopped answering without reporting an error (killed, out of "
                f"memory, or its host down), and process {me} stopped with it; look at process "
                "0's own log for why.",
                _Stop.peer_status,
            )
        return
    if gone and _claim():
        which = ", ".join(map(str, gone))
        _leave(
            f"process {which} stopped answering without reporting an error (killed, out of "
            f"memory, or its host down), and process {me} stopped with it; look at process "
            f"{which}'s own log for why. (Here: {_one_line(error)[:200]})",
            _Stop.peer_status,
            gone,
        )


def _report(error: BaseException) -> None:
    """Reports this process's own failure to the others (`_watch` ends them), and has this
    process end without jax's shutdown once its message is printed (`_end_at_exit`)."""
    if not _claim():  # the watcher is ending this process with another's report
        threading.Event().wait()
    client, (me, _) = _client(), _me()
    status = _Stop.status_of(error) if _Stop.status_of else 1
    with contextlib.suppress(Exception):  # the store is gone with process 0: jax ends this one
        client.key_value_set(
            f"{_STOP_KEYS}failed/{me}", json.dumps({"error": _one_line(error), "status": status})
        )
    _Stop.status = status
