"""Reading a prepared dataset with grain: worker processes, fixed order, a checkpointable state.

Needs the `prepared` extra (`tensorflow_datasets`, `grain`); TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from stam_jax.data.loader import Decoded, start_worker
from stam_jax.data.prepared import PreparedDataset, eval_views, train_clip
from stam_jax.data.video import ClipSpec


class _ReadiesWorkers:
    """A transform that readies each grain reading process it is sent to (`start_worker`):
    Ctrl-C is left to the parent, the process ends when the parent ends, even killed, and
    `STOP_STARTING` ends it at once while it has made nothing yet (`_stop_if_starting`).

    grain's `DataLoader` takes no function to run in its processes, but each unpickles the
    transforms before it reads anything: the hook is that unpickling, which happens nowhere
    else (this process only pickles them).
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _worker_ready
        if not _worker_ready and multiprocessing.parent_process() is not None:
            _worker_ready = True
            start_worker()
            if threading.current_thread() is threading.main_thread():
                signal.signal(STOP_STARTING, _stop_if_starting)
        self.__dict__.update(state)


_worker_ready = False

# Sent by `Reading.stop_starting` to its reading processes. Until one has made its first
# element it has nothing to hand over: it ends at once, by the signal's default action (still
# importing grain and JAX, before `_ReadiesWorkers` runs) or by `_stop_if_starting`. Once it
# has, the signal is ignored: it ends when grain tells it to, after the element in hand, as
# one killed while handing an element over (a shared-memory block, a message half written in
# the pipe the parent reads) would leave the parent to leak the block or wait for the message
# forever.
STOP_STARTING = signal.SIGUSR1
_made_one = False  # in a reading process: whether it has made an element (or failed to) yet


def _stop_if_starting(signum: int, frame: Any) -> None:
    """The `STOP_STARTING` handler of a reading process: ends it if it has made nothing yet."""
    if not _made_one:
        os._exit(1)


@contextlib.contextmanager
def _making() -> Iterator[None]:
    """Marks this reading process as having made an element once the block ends, however."""
    global _made_one
    try:
        yield
    finally:
        _made_one = True


class EvalViews(_ReadiesWorkers, grain.transforms.Map):
    """record -> {'views': uint8 (views, T, crop, crop, 3), 'index': listing index}."""

    def __init__(self, encoding: str, prepared: ClipSpec) -> None:
        self.encoding, self.prepared = encoding, prepared

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        """Decodes one record."""
        with _making():
            views = eval_views(element, self.encoding, self.prepared)
            return {"views": views, "index": np.int64(element["index"])}


class TrainClip(_ReadiesWorkers, grain.transforms.RandomMap):
    """record -> {'video': uint8 (T, crop, crop, 3), 'label'}: a random clip, crop and flip.

    grain derives `rng` from the sampler's seed and the record's place in the sampled stream,
    so the clips are the same whatever the number of workers, and after a resume.
    """

    def __init__(self, encoding: str, spec: ClipSpec) -> None:
        self.encoding, self.spec = encoding, spec

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Draws one augmented clip."""
        with _making():
            video = train_clip(element, self.encoding, self.spec, rng)
            return {"video": video, "label": np.int32(element["label"])}


def _flags_ready() -> None:
    """grain's worker processes read absl flags: outside an absl `app.run`, use their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _buffers(prefetch: int, workers: int) -> dict[str, Any]:
    """grain.DataLoader's buffer settings for `prefetch` records ahead (as `eval_items` says)."""
    # grain's default read buffer (16 threads, 500 records ahead) would hold gigabytes of frames.
    # Each reading process keeps a read buffer of its own: they share `prefetch` among them.
    share = -(-prefetch // max(workers, 1))  # rounded up
    return {
        "worker_buffer_size": max(prefetch // max(workers, 1), 1),
        "read_options": grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(share, 1)),
    }


class _Records:
    """Some records of a data source, in order (this process's share), each checked to be the
    video of the listing expected there (`positions`)."""

    def __init__(self, source: Any, records: np.ndarray, positions: np.ndarray) -> None:
        self.source, self.records, self.positions = source, records, positions

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        with _making():  # an error here is what this process hands over instead
            record = self.source[int(self.records[i])]
            if int(record["index"]) != int(self.positions[i]):
                raise RuntimeError(
                    f"record {self.records[i]} holds video {record['index']} of the listing, "
                    f"not {self.positions[i]}: the prepared dataset's records are not in "
                    "listing order."
                )
            return record


def eval_items(
    dataset: PreparedDataset,
    workers: int,
    prefetch: int,
    process: int,
    processes: int,
    records: np.ndarray | None = None,
) -> Iterator[Decoded]:
    """This process's share of an `eval` dataset's videos (consecutive records, as many as the
    other processes' or one more), in record order, as `Decoded` items whose `position` is the
    video's index in the source listing.

    Args:
      dataset: an opened `eval` dataset.
      workers: reading processes (0: in this process).
      prefetch: records read ahead: that many in this process; reading processes share it as
        their read buffers and each also holds twice its output buffer (prefetch // workers)
        and about 2 more, so about 3 x prefetch + 2 x workers in all.
      process, processes: this process's index and the process count.
      records: the records to share out (default: all).
    """
    _flags_ready()
    # Shared out here: grain's DataLoader gives each process len // processes records, and
    # would leave out len % processes of them.
    records = np.arange(dataset.num_records) if records is None else np.asarray(records)
    mine = np.array_split(records, processes)[process]
    if not mine.size:  # fewer records than processes (grain refuses an empty sampler)
        return _DecodedItems(iter([]))
    source = _Records(dataset.data_source(), mine, dataset.record_positions()[mine])
    sampler = grain.samplers.IndexSampler(
        len(source), grain.sharding.NoSharding(), shuffle=False, num_epochs=1
    )
    loader = _Loader(
        data_source=source,
        sampler=sampler,
        operations=[EvalViews(dataset.encoding, dataset.spec)],
        worker_count=workers,
        **_buffers(prefetch, workers),
    )
    return _DecodedItems(iter(loader))


class _DecodedItems(Iterator[Decoded]):
    """A `Reading`'s elements as `Decoded` items. It is closed (`close`) at its end, at an
    error, or when `close()` is called; `stop_starting()` may be called from any thread."""

    def __init__(self, iterator: Iterator[dict[str, Any]]) -> None:
        self._iterator: Iterator[dict[str, Any]] | None = iterator

    def __next__(self) -> Decoded:
        if self._iterator is None:
            raise StopIteration
        try:
            x = next(self._iterator)
        except BaseException:
            self.close()
            raise
        # Taken out of grain's element: a thread of grain's may keep the element itself after
        # an interrupt, and with it the video's shared-memory block, never unlinked.
        return Decoded(int(x["index"]), x.pop("views"), "ok")

    def stop_starting(self) -> None:
        """Ends the reading processes that have not made an element yet (`Reading`)."""
        if isinstance(iterator := self._iterator, Reading):
            iterator.stop_starting()

    def close(self) -> None:
        """Stops the reading processes and frees grain's shared memory now (see `close`)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            close(iterator)
            iterator = None
            gc.collect()


def close(iterator: Iterator[Any]) -> None:
    """Stops a grain iterator's worker processes now and unlinks the shared memory still queued.

    grain (0.2) hands elements over in shared-memory blocks, and its iterator chain keeps the
    last ones in reference cycles. Freed only as the interpreter exits, they are unlinked too
    late, and Python's resource tracker warns "There appear to be N leaked shared_memory
    objects" (google/grain#1031). So: close the iterator, drop every reference to it, then
    `gc.collect()`, which frees those blocks while the process still runs.

    Reading processes that have not made an element yet are ended first
    (`Reading.stop_starting`): grain would wait for each to finish starting (importing grain,
    JAX and TFDS, seconds each on a busy machine) and make an element before it stops.
    """
    reading = iterator if isinstance(iterator, Reading) else None
    if reading is not None:
        reading.stop_starting()
        iterator = reading.loader_iterator
    try:
        # A DataLoaderIterator has no close() of its own; the dataset iterator it wraps has.
        inner = getattr(iterator, "_iterator", iterator)
        if hasattr(inner, "close"):
            inner.close()
    finally:
        if reading is not None:
            reading.closed()


@contextlib.contextmanager
def _ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block (a Ctrl-C meanwhile is taken by another
    thread of this process, or waits until the block ends)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _Loader(grain.DataLoader):
    """A grain `DataLoader` whose iterators are `Reading`s (what `train_loader` returns)."""

    def __iter__(self) -> Reading:  # type: ignore[override]
        # Started here, not by the queues grain makes in its threads: starting it unblocks
        # SIGINT in the thread that does (multiprocessing.resource_tracker.ensure_running).
        multiprocessing.resource_tracker.ensure_running()
        others = _reading_processes()
        with _ctrl_c_blocked():
            return Reading(super().__iter__(), others)


_STOP_POLL_S = 0.05  # how often `Reading.stop_starting` looks for new reading processes


def _reading_processes() -> set[int]:
    """The process ids of grain's reading processes of this process that are running."""
    return {
        child.pid
        for child in multiprocessing.active_children()
        if child.name.startswith("grain-process-prefetch") and child.pid is not None
    }


class Reading(Iterator[Any]):
    """A grain `DataLoaderIterator` read with SIGINT blocked in the reading thread.

    grain starts its reading processes from threads of its own, made as the iterator is read.
    A terminal's Ctrl-C reaches every process of its group, and each of those processes
    printed a KeyboardInterrupt traceback (at start-up, from wherever its imports were; later,
    "Exception ignored" from a garbage-collection callback) while this one stopped. A thread
    inherits the signal mask of the thread that makes it, and a process that of the thread
    that starts it: so each call into grain runs with SIGINT blocked, and its processes start
    with it blocked, until the transforms they unpickle set it to be ignored
    (`_ReadiesWorkers`). A Ctrl-C during such a call reaches this process all the same.
    """

    def __init__(self, loader_iterator: Any, others: set[int]) -> None:
        self.loader_iterator = loader_iterator
        self._others = others  # reading processes of other loaders, there before this one
        self._stopping: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def stop_starting(self) -> None:
        """From now until `closed()`, ends each of this iterator's reading processes that has
        not made an element yet, as soon as it is there (it has nothing to hand over:
        `STOP_STARTING`); the others go on. Any thread may call it.

        grain starts the processes one by one from a thread of its own, so one may start after
        this call: a thread watches for them every `_STOP_POLL_S`. grain names no process of an
        iterator: this iterator's are those started since it was made (a loader made later and
        still open would have its own taken for them: the loaders here are closed in the
        reverse order they were made).
        """
        with self._lock:
            if self._stopping is None and not self._closed.is_set():
                self._stopping = threading.Thread(
                    target=self._stop_starting, name="stam-stop-starting", daemon=True
                )
                self._stopping.start()

    def closed(self) -> None:
        """Says that the iterator is closed: `stop_starting`'s watch ends."""
        with self._lock:
            self._closed.set()
            stopping = self._stopping
        if stopping is not None:
            stopping.join()

    def _stop_starting(self) -> None:
        signalled: set[int] = set()
        while True:
            for pid in _reading_processes() - self._others - signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, STOP_STARTING)
            if self._closed.wait(_STOP_POLL_S):
                return

    def __next__(self) -> Any:
        with _ctrl_c_blocked():
            return next(self.loader_iterator)

    def get_state(self) -> bytes:
        """The position in the stream, for a checkpoint."""
        return self.loader_iterator.get_state()

    def set_state(self, state: bytes) -> None:
        """Goes back to a position that `get_state` gave."""
        with _ctrl_c_blocked():
            self.loader_iterator.set_state(state)


class _ProcessRows:
    """A sampler: this process's rows of each global batch of one global shuffled stream.

    Row r of the k-th global batch (B = processes x local rows) is element k * B + r of the
    stream, and process p holds rows [p * local, (p + 1) * local): so the global batches, their
    order and each clip's augmentation (the element's rng) are the same for any number of
    processes, as for the raw-video path.
    """

    def __init__(self, stream: Any, local: int, process: int, processes: int) -> None:
        self.stream, self.local = stream, local
        self.process, self.processes = process, processes

    def __len__(self) -> int:
        return sys.maxsize  # endless, like the stream

    def __repr__(self) -> str:
        return (
            f"ProcessRows({self.stream!r}, local={self.local}, process={self.process}, "
            f"processes={self.processes})"
        )

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        step, row = divmod(index, self.local)
        element = self.stream[(step * self.processes + self.process) * self.local + row]
        return grain.RecordMetadata(index=index, record_key=element.record_key, rng=element.rng)


def train_loader(
    dataset: PreparedDataset,
    spec: ClipSpec,
    seed: int,
    local_batch: int,
    workers: int,
    prefetch: int,
) -> grain.DataLoader:
    """Endless augmented clips for this process, shuffled (each epoch anew) from `seed`.

    Clips come one at a time, in the sampler's order whatever the number of workers (batching
    in the workers would make the order depend on it); `batches` groups them `local_batch` at a
    time into this process's rows of each global batch. The iterator's state goes into the
    train checkpoint. Clips read ahead: as `eval_items` says of its `prefetch`.
    """
    import jax

    _flags_ready()
    source = dataset.data_source()
    stream = grain.samplers.IndexSampler(
        len(source), grain.sharding.NoSharding(), shuffle=True, num_epochs=None, seed=seed
    )
    sampler = _ProcessRows(stream, local_batch, jax.process_index(), jax.process_count())
    return _Loader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.sharding.NoSharding(),  # the sampler already picks this process's rows
        operations=[TrainClip(dataset.encoding, spec)],
        worker_count=workers,
        **_buffers(prefetch, workers),
    )


def batches(clips: Iterator[dict[str, Any]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups `size` consecutive clips into {'video': (size, T, crop, crop, 3), 'label'}."""
    while True:
        group = [next(clips) for _ in range(size)]
        yield {
            "video": np.stack([c["video"] for c in group]),
            "label": np.stack([c["label"] for c in group]),
        }
