"""Decoding videos in parallel worker processes, in order, with bounded prefetch.

The processes are started by `spawn` (forking a process that holds JAX's threads can
deadlock), which imports the calling script in each: a script must keep its code under
`if __name__ == "__main__":`, or each process fails at its start and every video is reported
as "the decoder process crashed". `workers=0` decodes in the calling process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from stam_jax.data.folder import as_text
from stam_jax.data.video import (
    ClipSpec,
    TooShortError,
    VideoError,
    load_train_clip,
    load_views,
    set_decoder_threads,
)

T = TypeVar("T")


@dataclasses.dataclass
class Decoded:
    """The outcome for one video: its views, or why there are none.

    Attributes:
      position: index of the video in the sequence given to the decoder.
      views: uint8 `(num_views, T, crop, crop, 3)`, or None.
      status: 'ok', 'too_short' or 'failed'.
      reason: for 'too_short' and 'failed', what happened.
    """

    position: int
    views: np.ndarray | None
    status: str
    reason: str = ""


# What a decoding-process count may be (`worker_count`), for the messages that refuse others.
WORKERS_RULE = (
    "use -1 (one decoding process per core), 0 (decode in this process) or a number of processes."
)


def worker_count(requested: int) -> int:
    """Decoding processes to use: `requested`, or one per available core when it is negative."""
    return requested if requested >= 0 else max(len(os.sched_getaffinity(0)), 1)


def decoder_threads(workers: int) -> int:
    """Threads for each video's decoder in each of `workers` decoding processes: their share
    of the cores, at least 1. With each decoder on one thread per core (FFmpeg's default),
    as many processes as cores contend: on 2 cores, 2 processes decoded 1.17-1.19x faster
    with one thread each (benchmarks/decode_bench.py --compare-threads, BENCHMARKS.md)."""
    return max(worker_count(-1) // max(workers, 1), 1)  # worker_count(-1): the cores


def decode_one(position: int, path: str, spec: ClipSpec) -> Decoded:
    """Decodes one video's evaluation views (see `decode_with`)."""
    return decode_with(load_views, position, path, spec)


def decode_with(
    load: Callable[[str, ClipSpec], Any], position: int, path: str, spec: ClipSpec
) -> Decoded:
    """`load(path, spec)` as a `Decoded`, every error turned into an outcome (never raises)."""
    try:
        return Decoded(position, load(path, spec), "ok")
    except TooShortError as e:
        return Decoded(position, None, "too_short", str(e))
    except VideoError as e:
        return Decoded(position, None, "failed", str(e))
    except Exception as e:  # a bad file must not end the run: it is counted and listed
        return Decoded(position, None, "failed", f"{type(e).__name__}: {e}".strip())


def with_listed_path(decoded: Decoded, opened: str | Path, listed: str) -> Decoded:
    """`decoded` with the path its file was opened by (`opened`, e.g. absolute) written as its
    path in the listing (`listed`, relative to the folder's root) in its reason.

    PyAV's messages name the file as opened; rewritten, the reasons of results (and of the
    results an interrupted evaluation kept) read the same wherever the videos are. A name
    whose bytes are not UTF-8 is spelled escaped there (`caf\\udce9.mp4`, as `repr` writes
    it): that spelling is rewritten too, to the listed path's `\\xNN` one (`folder.as_text`).
    """
    if not decoded.reason or str(opened) == listed:
        return decoded
    reason = decoded.reason.replace(str(opened), listed)
    escaped = repr(str(opened))[1:-1]
    if escaped != str(opened):
        reason = reason.replace(escaped, as_text(listed))
    return dataclasses.replace(decoded, reason=reason)


def decode_in_order(
    paths: Sequence[str | Path],
    spec: ClipSpec,
    workers: int,
    prefetch: int,
    threads: int | None = None,
) -> Generator[Decoded, None, None]:
    """Yields every video's `Decoded` (evaluation views), in the order of `paths`.

    At most `prefetch` videos are decoded ahead of the consumer, so memory stays flat however
    many videos there are. Closing the generator ends the worker processes.

    Args:
      paths: video files.
      spec: sampling and transform.
      workers: decoding processes; 0 decodes in this process.
      prefetch: videos in flight at most (>= 1).
      threads: as `ordered_map`'s.
    """
    jobs = [(position, str(path), spec) for position, path in enumerate(paths)]
    return ordered_map(decode_one, jobs, workers, prefetch, threads)


def ordered_map(
    fn: Callable[..., Decoded],
    jobs: Sequence[tuple],
    workers: int,
    prefetch: int,
    threads: int | None = None,
) -> Generator[Decoded, None, None]:
    """`fn(*job)` for every job, in order, in `workers` processes (0: in this one).

    `fn` must never raise (it returns a failed `Decoded` instead) and job[0] is its position.
    Each process's video decoders use `threads` threads (`video.set_decoder_threads`; default
    `decoder_threads(workers)`, their share of the cores); in this process, as set there.

    Raises:
      ValueError: `workers` is not a whole number >= 0 (-1 failed in the process pool with
        "max_workers must be greater than 0").
    """
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 0:
        raise ValueError(
            f"workers={workers!r}: use 0 (decode in this process) or a number of processes; "
            "worker_count(-1) gives one per core."
        )
    if workers == 0:
        return (fn(*job) for job in jobs)
    threads = decoder_threads(workers) if threads is None else threads
    return iter(_ParallelDecoder(fn, jobs, workers, prefetch, threads))


class Started(Iterator[T]):
    """`items`, begun now: a background thread asks for the first item at once.

    What `items` needs before its first item (starting worker processes, decoding the first
    videos) then overlaps whatever the caller does meanwhile, such as compiling, and the first
    batch is ready sooner. After the first item everything runs in the
    caller's thread, as `items` itself would. An error producing the first item is raised by
    the first `next()`. `close()` waits for that first item and closes `items` (when it has a
    `close`), whether or not anything was read; while it is still awaited, `close()` first
    calls `items.stop_starting()` (when it has one, callable from any thread), which makes it
    come sooner: grain's reading processes still starting end at once (a Ctrl-C then waited
    for every one of them to start and read a video: 7-40 s on a busy 2-core machine).
    """

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stam-input")
        self._first: concurrent.futures.Future | None = self._thread.submit(next, items, _END)
        self._thread.shutdown(wait=False)  # the thread ends once the first item is in

    def __next__(self) -> T:
        if self._first is not None:
            # Forgotten only once it is in: a Ctrl-C during the wait leaves the thread inside
            # `next(items)`, and `close()` must then wait for it before closing `items`.
            item = self._first.result()
            self._first = None
            if item is _END:
                raise StopIteration
            return item
        return next(self._items)

    def close(self) -> None:
        """Stops `items` (see above); nothing can be read afterwards."""
        if self._first is not None:
            first, self._first = self._first, None
            stop_starting = getattr(self._items, "stop_starting", None)
            if stop_starting is not None and not first.done():
                stop_starting()  # the first item will not be read: no need to wait for it
            concurrent.futures.wait([first])
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


_END = object()
# What `ProcessPoolExecutor.submit` raises after a worker died: BrokenProcessPool once the pool
# knows, or, in the moment its manager thread closes the queues, an error from starting a
# replacement worker with them: OSError ("handle is closed"), or ValueError ("bad value(s) in
# fds_to_keep": a queue's descriptor closed between its listing and the fork). Both seen in CI
# on Python 3.11, whose manager thread tears the pool down without the lock submit holds.
_SUBMIT_FAILURES = (concurrent.futures.process.BrokenProcessPool, OSError, ValueError)


class DecoderStartError(RuntimeError):
    """Decoding processes cannot be started; the message names why and what to do."""


def _start_error(error: BaseException) -> DecoderStartError:
    return DecoderStartError(
        "cannot start decoding processes: a new process pool refused work twice "
        f"({type(error).__name__}: {error}), so no video can be decoded. The system is likely "
        "short of processes, memory or open files (see `ulimit -u` and `ulimit -n`): free "
        "some, or use fewer decoding processes (--config.data.workers, or --workers of "
        "stam_jax.data.prepare; 0 decodes in this process)."
    )


class _ParallelDecoder:
    """Ordered decoding over a process pool that survives a worker crashing on a bad file.

    When a worker dies (say, a decoder crash on a corrupt file), the job at the head of the
    queue is retried alone on a fresh pool: if it crashes again it is reported as failed,
    otherwise decoding resumes after it. Either way the run goes on. A pool that refuses a job
    with nothing pending is replaced once; when the new one refuses it too, no process can be
    started and `DecoderStartError` says so (it was retried forever, or, for the job retried
    alone, raised as is).
    """

    def __init__(
        self,
        fn: Callable[..., Decoded],
        jobs: Sequence[tuple],
        workers: int,
        prefetch: int,
        threads: int = 0,
    ) -> None:
        self.fn, self.jobs = fn, jobs  # any sequence: built lazily for long training runs
        self.workers, self.prefetch, self.threads = workers, max(prefetch, 1), threads

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        # 'spawn': forking a process that holds JAX's threads can deadlock.
        context = multiprocessing.get_context("spawn")
        return concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=start_worker,
            initargs=(self.threads,),
        )

    def __iter__(self) -> Iterator[Decoded]:
        pool = self._pool()
        pending: collections.deque = collections.deque()
        next_position, isolating, refused = 0, False, False
        try:
            while pending or next_position < len(self.jobs):
                while next_position < len(self.jobs) and len(pending) < (
                    1 if isolating else self.prefetch
                ):
                    try:
                        future = _submit(pool, self.fn, self.jobs[next_position])
                    except _SUBMIT_FAILURES as e:
                        if isinstance(e, ValueError) and "fds_to_keep" not in str(e):
                            raise  # not the race above
                        # A worker died: the pool refuses work, or (while its manager thread
                        # is tearing it down) fails to start a replacement worker. The head's
                        # result says which job it was; with nothing pending, a fresh pool,
                        # once: a fresh pool refusing too cannot start its processes.
                        if pending:
                            break
                        if refused:
                            raise _start_error(e) from e
                        refused = True
                        _discard(pool)
                        pool = self._pool()
                        continue
                    refused = False
                    pending.append(future)
                    next_position += 1
                head = pending[0]
                position = next_position - len(pending)
                try:
                    result = head.result()
                except concurrent.futures.process.BrokenProcessPool:
                    _discard(pool)
                    pool = self._pool()
                    pending.clear()
                    if not isolating:  # retry the head alone (submitted above) to find the culprit
                        isolating, next_position = True, position
                        continue
                    next_position = position + 1
                    result = Decoded(position, None, "failed", "the decoder process crashed")
                else:
                    pending.popleft()
                isolating = False
                yield result
        finally:
            _discard(pool)


def _submit(
    pool: concurrent.futures.ProcessPoolExecutor, fn: Callable[..., Decoded], job: tuple
) -> concurrent.futures.Future:
    """`pool.submit(fn, *job)` with SIGINT held in this thread: a decoding process it starts
    inherits the held signal, and keeps a Ctrl-C pending until `_leave_interrupts_to_the_parent`
    has set it to be ignored (it would otherwise print a KeyboardInterrupt traceback from
    wherever its start-up was, such as importing numpy). A Ctrl-C meanwhile reaches this
    process once the submit returns."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *job)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_worker(threads: int = 0) -> None:
    """Run in each decoding process as it starts, these and grain's reading processes
    (`stam_jax.data.reading`): see the two functions it calls; video decoders then use
    `threads` threads (`video.set_decoder_threads`)."""
    _leave_interrupts_to_the_parent()
    _end_with_the_parent()
    set_decoder_threads(threads)


def _end_with_the_parent() -> None:
    """Ends this decoding process as soon as its parent has ended, however it ended.

    A parent killed outright (SIGKILL, the out-of-memory killer) cannot shut its pool down: its
    workers waited for work forever, each holding its memory and the parent's stdout and stderr
    (a caller reading them to the end, as `subprocess.run` does, never returned). The pipe
    `multiprocessing` starts a process with stays open in the parent for the worker's life and
    closes when the parent ends; a thread waits for that and exits the process.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=wait, name="stam-parent-watch", daemon=True).start()


def _leave_interrupts_to_the_parent() -> None:
    """Run in each decoding process: Ctrl-C reaches a terminal's whole process group, and the
    parent reacts to it once (it stops and ends the workers), where every worker would also
    print a KeyboardInterrupt traceback. A Ctrl-C held since the start (`_submit`) is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _discard(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Shuts `pool` down: the jobs not started are cancelled, the workers end.

    A worker is not terminated while it may be sending a result: killed part-way through, it
    leaves the executor's manager thread waiting forever for the rest of the message, and the
    process hung at exit (seen on a Ctrl-C with 0.6 MB results). So the workers finish the jobs
    they hold (a video each, at most two) and exit; one still busy after `_GRACE_S` (a decoder
    stuck on a file) is terminated, and killed if it is still there 5 s later (a SIGTERM
    blocked in the signal mask it inherited). A broken pool's surviving workers are idle,
    waiting for work its manager thread will never send (on Python 3.11 its shutdown then
    hangs on them, seen in CI): they are terminated at once.
    """
    workers = list((getattr(pool, "_processes", None) or {}).values())
    if getattr(pool, "_broken", False):
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + _GRACE_S
    try:
        for worker in workers:
            worker.join(timeout=max(deadline - time.monotonic(), 0))
    finally:  # a second Ctrl-C during the wait ends the workers all the same
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=_TERM_S)
            if worker.is_alive():  # SIGTERM not acted on (blocked in the mask it inherited)
                worker.kill()
                worker.join(timeout=_TERM_S)


_GRACE_S = 30.0
_TERM_S = 5.0  # how long a terminated worker is given before it is killed


def decode_train_item(position: int, path: str, spec: ClipSpec, seed: tuple[int, ...]) -> Decoded:
    """One augmented training clip as a `Decoded` (views of shape (1, T, crop, crop, 3))."""
    try:
        return Decoded(position, load_train_clip(path, spec, seed)[None], "ok")
    except VideoError as e:
        return Decoded(position, None, "failed", str(e))
    except Exception as e:  # a bad file must not end the run
        return Decoded(position, None, "failed", f"{type(e).__name__}: {e}".strip())
