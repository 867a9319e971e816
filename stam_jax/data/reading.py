"""Reading a prepared dataset with grain: worker processes, fixed order, a checkpointable state.

Needs the `prepared` extra (`tensorflow_datasets`, `grain`); TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.resource_tracker
import signal
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from stam_jax.data.loader import Decoded, start_worker
from stam_jax.data.prepared import PreparedDataset, eval_views, train_clip
from stam_jax.data.video import ClipSpec


class _ReadiesWorkers:
    """A transform that readies each grain reading process it is sent to (`start_worker`):
    Ctrl-C is left to the parent, and the process ends when the parent ends, even killed.

    grain's `DataLoader` takes no function to run in its processes, but each unpickles the
    transforms before it reads anything: the hook is that unpickling, which happens nowhere
    else (this process only pickles them).
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _worker_ready
        if not _worker_ready and multiprocessing.parent_process() is not None:
            _worker_ready = True
            start_worker()
        self.__dict__.update(state)


_worker_ready = False


class EvalViews(_ReadiesWorkers, grain.transforms.Map):
    """record -> {'views': uint8 (views, T, crop, crop, 3), 'index': listing index}."""

    def __init__(self, encoding: str, prepared: ClipSpec) -> None:
        self.encoding, self.prepared = encoding, prepared

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        """Decodes one record."""
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
        video = train_clip(element, self.encoding, self.spec, rng)
        return {"video": video, "label": np.int32(element["label"])}


def _flags_ready() -> None:
    """grain's worker processes read absl flags: outside an absl `app.run`, use their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(prefetch: int) -> grain.ReadOptions:
    # grain's default (16 threads, 500 records ahead) would hold gigabytes of frames.
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(prefetch, 1))


class _Records:
    """Some records of a data source, in order (this process's share), each checked to be the
    video of the listing expected there (`positions`)."""

    def __init__(self, source: Any, records: np.ndarray, positions: np.ndarray) -> None:
        self.source, self.records, self.positions = source, records, positions

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        record = self.source[int(self.records[i])]
        if int(record["index"]) != int(self.positions[i]):
            raise RuntimeError(
                f"record {self.records[i]} holds video {record['index']} of the listing, not "
                f"{self.positions[i]}: the prepared dataset's records are not in listing order."
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
      prefetch: records read ahead.
      process, processes: this process's index and the process count.
      records: the records to share out (default: all).
    """
    _flags_ready()
    # Shared out here: grain's DataLoader gives each process len // processes records, and
    # would leave out len % processes of them.
    records = np.arange(dataset.num_records) if records is None else np.asarray(records)
    mine = np.array_split(records, processes)[process]
    if not mine.size:  # fewer records than processes (grain refuses an empty sampler)
        return _decoded_items(iter([]))
    source = _Records(dataset.data_source(), mine, dataset.record_positions()[mine])
    sampler = grain.samplers.IndexSampler(
        len(source), grain.sharding.NoSharding(), shuffle=False, num_epochs=1
    )
    loader = _Loader(
        data_source=source,
        sampler=sampler,
        operations=[EvalViews(dataset.encoding, dataset.spec)],
        worker_count=workers,
        worker_buffer_size=max(prefetch // max(workers, 1), 1),
        read_options=_read_options(prefetch),
    )
    return _decoded_items(iter(loader))


def _decoded_items(iterator: Iterator[dict[str, Any]]) -> Iterator[Decoded]:
    try:
        for x in iterator:
            yield Decoded(int(x["index"]), x["views"], "ok")
    finally:
        close(iterator)
        x = iterator = None
        gc.collect()


def close(iterator: Iterator[Any]) -> None:
    """Stops a grain iterator's worker processes now and unlinks the shared memory still queued.

    grain (0.2) hands elements over in shared-memory blocks, and its iterator chain keeps the
    last ones in reference cycles. Freed only as the interpreter exits, they are unlinked too
    late, and Python's resource tracker warns "There appear to be N leaked shared_memory
    objects" (google/grain#1031). So: close the iterator, drop every reference to it, then
    `gc.collect()`, which frees those blocks while the process still runs.
    """
    if isinstance(iterator, Reading):
        iterator = iterator.loader_iterator
    # A DataLoaderIterator has no close() of its own; the dataset iterator it wraps has.
    inner = getattr(iterator, "_iterator", iterator)
    if hasattr(inner, "close"):
        inner.close()


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
        with _ctrl_c_blocked():
            return Reading(super().__iter__())


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

    def __init__(self, loader_iterator: Any) -> None:
        self.loader_iterator = loader_iterator

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
    train checkpoint.
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
        worker_buffer_size=max(prefetch // max(workers, 1), 1),
        read_options=_read_options(prefetch),
    )


def batches(clips: Iterator[dict[str, Any]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups `size` consecutive clips into {'video': (size, T, crop, crop, 3), 'label'}."""
    while True:
        group = [next(clips) for _ in range(size)]
        yield {
            "video": np.stack([c["video"] for c in group]),
            "label": np.stack([c["label"] for c in group]),
        }
