r"""Decode a video folder once into a prepared dataset (TFDS format, ArrayRecord files).

    python -m stam_jax.data.prepare --src VAL_DIR --out VAL_PREPARED --config configs/stam_16.py
    python -m stam_jax.data.prepare --src TRAIN_DIR --out TRAIN_PREPARED \
        --config configs/stam_16.py --kind train --encoding jpeg

`--kind eval` (default) stores each video's model inputs with the config's sampling, views and
crop; `run_eval.py --config.data.root=VAL_PREPARED` then evaluates them (with `--encoding raw`,
bit-identical to evaluating the videos). `--kind train` stores every sampled frame resized but
not cropped; `run_train.py --config.train.root=TRAIN_PREPARED` draws clips, crops and flips from
them. Videos are decoded in parallel (`--workers`, default one per core) with a progress bar.

Interrupted (Ctrl-C, a kill, a full disk)? Run the same command again: finished shards are kept
and the rest is done. Videos that are too short or cannot be decoded are recorded in the dataset
(`stam_prepare.json`, `metadata.json`) with the same reasons `run_eval.py` gives, and listed at
the end; so are the entries the folder listing leaves out (hidden/system entries, non-video
files, link loops, duplicates) and the classes without videos, which `run_eval.py` then reports
from the prepared dataset as it would from the videos.

Exit status: 0 every video prepared, 2 refused before anything is written (one `error:` line
saying why: a bad flag or config value, an --out inside or around --src, an --out that cannot
be written, ...), 3 finished with some videos skipped, 1 stopped by an error while writing (a full
disk: one `error:` line; rerun to resume), 130 interrupted (Ctrl-C; rerun to resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from absl import flags

from stam_jax.cli import EXIT_INTERRUPTED, parse_flags, refuse, stopped
from stam_jax.data.folder import (
    DatasetError,
    Ignored,
    VideoFolder,
    as_text,
    ignored_summary,
    list_videos,
    listing_report,
)
from stam_jax.data.loader import (
    WORKERS_RULE,
    Decoded,
    DecoderStartError,
    decode_with,
    ordered_map,
    with_listed_path,
    worker_count,
)
from stam_jax.data.prepared import (
    DATASET_NAME,
    ENCODINGS,
    FORMAT_VERSION,
    KINDS,
    META_FILE,
    PARTS,
    SPLITS,
    PreparedError,
    encode_jpeg,
    features,
    is_prepared,
    spec_flag,
)
from stam_jax.data.video import ClipSpec, load_sampled_frames, load_views
from stam_jax.interrupts import keep_interrupts
from stam_jax.paths import (
    LOCK_FILE,
    made_and_claimed,
    unwritable,
)

TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
EXIT_FAILED = 1
EXIT_SKIPPED = 3
# One record per group (random access to any video); no compression: JPEG is compressed
# already, and raw frames are kept for read speed (ArrayRecord's default brotli cost 5x).
WRITER_OPTIONS = "group_size:1,uncompressed"
# The command-line flag behind each setting a re-run into the same --out must repeat.
SETTING_FLAGS = {
    "kind": "--kind",
    "encoding": "--encoding",
    "jpeg_quality": "--jpeg_quality",
    "shard_size": "--shard_size",
    "source": "--src",
}
JPEG_QUALITY = 95  # --jpeg_quality's default
STOP_HOOK = "STAM_TEST_PREPARE_KILL_AFTER_SHARDS"  # tests: SIGKILL after writing this many


@dataclasses.dataclass
class Job:
    """What a worker needs to turn one video into a record."""

    kind: str
    encoding: str
    quality: int
    spec: ClipSpec
    classes: tuple[str, ...]


def _record(position: int, path: str, relpath: str, label: int, job: Job) -> Decoded:
    """One video's serialized record in `views` (bytes), or why there is none; never raises."""
    # The evaluation's own decoding and outcomes (too short, failed, with the same reasons).
    load = load_views if job.kind == "eval" else load_sampled_frames
    decoded = decode_with(load, position, path, job.spec)
    if decoded.status != "ok":
        return with_listed_path(decoded, path, relpath)
    pixels = decoded.views
    if job.encoding == "jpeg":
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        pixels = [encode_jpeg(frame, job.quality) for frame in flat]
    # TFDS stores the path as UTF-8; the listing (stam_prepare.json) keeps the name itself.
    example = {"frames": pixels, "label": label, "path": as_text(relpath), "index": position}
    serialized = features(job.kind, job.encoding, job.spec, job.classes).serialize_example(example)
    return Decoded(position, serialized, "ok")


def _settings(
    folder: VideoFolder, spec: ClipSpec, kind: str, encoding: str, quality: int, shard_size: int
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "encoding": encoding,
        "jpeg_quality": quality if encoding == "jpeg" else None,
        "spec": dataclasses.asdict(spec),
        "shard_size": shard_size,
        "source": str(folder.root.resolve()),
    }


def _listing(folder: VideoFolder) -> dict[str, Any]:
    return {
        "classes": list(folder.classes),
        "items": [[item.path, item.label] for item in folder.items],
        "empty_classes": list(folder.empty_classes),
    }


def _check_class_names(classes: tuple[str, ...]) -> None:
    """Refuses class names TFDS cannot keep: its label feature stores them one per line,
    stripped, so a line break or a space at either end would rename or shift the labels."""
    bad = [n for n in classes if not n.strip() or n != n.strip() or "\n" in n or "\r" in n]
    if bad:
        raise PreparedError(
            f"class name(s) {', '.join(map(repr, bad[:5]))} cannot be stored in a TFDS dataset "
            "(its label names are kept one per line, without spaces at either end); rename "
            "those class folders (or their lines in --config.data.class_list). Nothing was written."
        )


def _stamps(folder: VideoFolder) -> list[list[int]]:
    """[size, modification time (ns)] of every listed video: a re-run into the same `--out`
    must find the files its records were made from ([-1, -1]: a file gone since the listing)."""
    stamps = []
    for item in folder.items:
        try:
            stat = os.stat(folder.root / item.path)
            stamps.append([stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append([-1, -1])
    return stamps


def _ignored(folder: VideoFolder) -> list[list[str]]:
    """What the listing left out, as [path, reason, note] rows (`stam_prepare.json` 'ignored')."""
    return [[entry.path, entry.reason, entry.note] for entry in folder.ignored]


def _check_paths(src: Path, out: Path) -> None:
    """Refuses a `src` that is a prepared dataset and an `out` equal to, in or around `src`."""
    if is_prepared(src):
        try:
            made_from = f", made from {json.loads((src / META_FILE).read_text())['source']}"
        except (OSError, ValueError, KeyError, TypeError):
            made_from = ""
        raise PreparedError(
            f"--src {src} is already a prepared dataset (it holds {META_FILE}{made_from}); "
            "evaluate or train from it directly (--config.data.root / --config.train.root), or "
            "give the video folder as --src."
        )
    source, target = src.resolve(), out.resolve()
    if target == source:
        where, why = "is the same folder as", "the dataset's files would be mixed with the videos"
    elif source in target.parents:
        where, why = "is inside", "the dataset would be listed as a class or a video"
    elif target in source.parents:
        where, why = "contains", "the dataset's files would be mixed with the videos"
    else:
        return
    raise PreparedError(
        f"--out {out} {where} --src {src} (resolved: {target} and {source}); give an --out "
        f"outside the video folder ({why})."
    )


def _check_writable(out: Path) -> None:
    """Refuses an `out` that cannot be created or written (nothing is created)."""
    problem = unwritable(out, into=True)
    if problem:
        raise PreparedError(f"cannot write --out {out}: {problem}; give another folder.")


def _write_json(path: Path, data: Any) -> None:
    """Atomically (a half-written file is never read back)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _claim_file(entry: Path) -> bool:
    """Whether `entry` is the file of a claim on the folder (`stam_jax.paths.claimed`), which
    a job killed before writing anything else leaves behind."""
    return entry.name == LOCK_FILE.format(process=0)


def _check_out(
    out: Path, settings: dict[str, Any], listing: dict[str, Any], stamps: list[list[int]]
) -> dict | None:
    """The existing metadata of `out` when it continues this same job; refuses anything else,
    such as videos replaced or edited since (their size or modification time differ). `out` is
    a folder: a complete dataset, or one `_prepare` has made (or found) and claimed."""
    meta_path = out / META_FILE
    if not meta_path.is_file():
        if any(not _claim_file(entry) for entry in out.iterdir()):
            raise PreparedError(
                f"--out {out} is a non-empty folder that is not a prepared dataset; give a new "
                "or empty folder (nothing there was touched)."
            )
        return None
    meta = json.loads(meta_path.read_text())
    differ = []
    for key, now in settings.items():
        there = meta.get(key)
        if there == now:
            continue
        if key == "spec" and isinstance(there, dict):  # each field, with the flag that sets it
            differ += [
                f"{spec_flag(name)}: there {there.get(name)!r}, now {value!r}"
                for name, value in now.items()
                if there.get(name) != value
            ]
        else:
            differ.append(f"{SETTING_FLAGS.get(key, key)}: there {there!r}, now {now!r}")
    if differ:
        raise PreparedError(
            f"--out {out} was prepared with other settings ({'; '.join(differ)}); use another "
            "--out, or delete it to start over."
        )
    state = "prepared" if meta.get("complete") else "started"
    if {k: meta.get(k) for k in listing} != listing:
        then = [tuple(item) for item in meta.get("items") or ()]
        now = [tuple(item) for item in listing["items"]]
        then_set, now_set = set(then), set(now)
        gone = [path for path, label in then if (path, label) not in now_set]
        added = [path for path, label in now if (path, label) not in then_set]
        classes_then, classes_now = list(meta.get("classes") or ()), listing["classes"]
        empty_then, empty_now = set(meta.get("empty_classes") or ()), set(listing["empty_classes"])
        what = "; ".join(
            f"{head} {', '.join(map(as_text, names[:3]))}"
            + (f" and {len(names) - 3} more" if names[3:] else "")
            for head, names in (
                ("gone or relabelled:", gone),
                ("new or relabelled:", added),
                ("classes gone:", [c for c in classes_then if c not in classes_now]),
                ("classes new:", [c for c in classes_now if c not in classes_then]),
                ("empty class folders gone:", sorted(empty_then - empty_now)),
                ("empty class folders new:", sorted(empty_now - empty_then)),
            )
            if names
        )
        class_change = classes_then != classes_now
        if not what and class_change:  # the same names, in another order
            what = "the classes are in another order, so their labels differ"
        counts = (
            f"{len(then)} videos and {len(classes_then)} classes listed then, {len(now)} and "
            f"{len(classes_now)} now"
            if class_change
            else f"{len(then)} listed then, {len(now)} now"
        )
        # The classes come from --config.data.class_list or the class folders: put back as
        # they were, the same command goes on.
        fix = (
            "restore them (--config.data.class_list, or the class folders) to go on, or use "
            "another --out"
            if class_change
            else "use another --out, or delete it to start over"
        )
        raise PreparedError(
            f"the {'videos or classes' if class_change else 'videos'} under "
            f"{settings['source']} changed since {out} was {state} ({counts}"
            + (f"; {what}" if what else "")
            + f"); {fix}."
        )
    before = meta.get("stamps")  # absent from datasets prepared before they were recorded
    if before is not None and before != stamps:
        pairs = zip(before, stamps, strict=True) if len(before) == len(stamps) else ()
        differ = [a != b for a, b in pairs] or [True] * len(stamps)
        changed = [item[0] for item, d in zip(listing["items"], differ, strict=True) if d]
        raise PreparedError(
            f"{len(changed)} of the videos under {settings['source']} changed since {out} was "
            f"{state} (their size or modification time differ): {', '.join(changed[:5])}"
            + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            + "; its records were made from the files as they were: use another --out, or "
            "delete it to start over."
        )
    return meta


def prepare(
    src: str | Path,
    out: str | Path,
    spec: ClipSpec,
    kind: str = "eval",
    encoding: str = "raw",
    jpeg_quality: int | None = None,
    class_list: str | None = None,
    workers: int = -1,
    shard_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares (or finishes preparing) the dataset of video folder `src` in `out`.

    Args:
      src: `src/<class>/<video>`, listed as the evaluation lists it.
      out: the dataset folder (created; an unfinished one with the same settings is finished).
      spec: sampling, resize and (for `eval`) views and crop.
      kind: 'eval' (model inputs) or 'train' (sampled frames, resized, not cropped).
      encoding: 'raw' (uint8 pixels) or 'jpeg'.
      jpeg_quality: JPEG quality (1-100) for `encoding='jpeg'` (None: 95, which keeps top-1);
        refused with 'raw', which stores the frames as they are.
      class_list: optional class-list file (label order), as for evaluation.
      workers: decoding processes; -1: one per core; 0: this process.
      shard_size: videos per shard (a resumed run redoes at most one shard per worker pool).
      progress: a progress bar on stderr.

    Returns:
      The finished dataset's `stam_prepare.json` contents.

    Raises:
      PreparedError: a bad argument, an `out` that holds something else, or one that another
        job is preparing now (each job claims its `out`: `stam_jax.paths.claimed`); nothing is
        written.
    """
    with contextlib.ExitStack() as held:
        return _prepare(
            src,
            out,
            spec,
            kind,
            encoding,
            jpeg_quality,
            class_list,
            workers,
            shard_size,
            progress,
            held,
        )


def _prepare(
    src: str | Path,
    out: str | Path,
    spec: ClipSpec,
    kind: str,
    encoding: str,
    jpeg_quality: int | None,
    class_list: str | None,
    workers: int,
    shard_size: int,
    progress: bool,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    """`prepare`; the claim on `out`, once made, is held by `held`."""
    if kind not in KINDS:
        raise PreparedError(f"--kind {kind!r}; use one of {', '.join(KINDS)}.")
    if encoding not in ENCODINGS:
        raise PreparedError(f"--encoding {encoding!r}; use one of {', '.join(ENCODINGS)}.")
    if jpeg_quality is not None and encoding != "jpeg":
        raise PreparedError(
            f"--jpeg_quality {jpeg_quality} with --encoding {encoding}, which stores the frames "
            "as they are; add --encoding jpeg, or leave --jpeg_quality out."
        )
    if jpeg_quality is None:
        jpeg_quality = JPEG_QUALITY
    if not 1 <= jpeg_quality <= 100:
        raise PreparedError(f"--jpeg_quality {jpeg_quality}; use 1-100 (95 keeps top-1).")
    if shard_size < 1:
        raise PreparedError(f"--shard_size {shard_size}; use >= 1.")
    if workers < -1:
        raise PreparedError(f"--workers {workers}; {WORKERS_RULE}")
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    complete = _is_complete(out)
    if not complete:
        _check_writable(out)
    try:
        folder = list_videos(src, class_list or None)
    except DatasetError as e:
        raise PreparedError(str(e)) from None
    _check_class_names(folder.classes)
    settings = _settings(folder, spec, kind, encoding, jpeg_quality, shard_size)
    listing, stamps = _listing(folder), _stamps(folder)
    if complete:  # read only: it is not written (nor claimed)
        meta = _check_out(out, settings, listing, stamps)
    else:  # claimed first, so that what is read there is not being written by another job
        made_and_claimed(held, out, 0, f"--out {out}", PreparedError)
        meta = _check_out(out, settings, listing, stamps)
    if meta and meta.get("complete"):
        print(f"{out} is already prepared ({meta['num_records']} records); nothing to do.")
        return meta
    parts = out / PARTS
    try:
        parts.mkdir(parents=True, exist_ok=True)
        _write_json(
            out / META_FILE,
            {
                **settings,
                **listing,
                "stamps": stamps,
                "ignored": _ignored(folder),
                "complete": False,
            },
        )
    except OSError as e:
        raise PreparedError(
            f"--out {out} cannot be written: {e}; give a folder you can write to."
        ) from None

    n = len(folder.items)
    num_shards = -(-n // shard_size)
    done = {s for s in range(num_shards) if (parts / f"part-{s:05d}.json").is_file()}
    todo = [s for s in range(num_shards) if s not in done]
    job = Job(kind, encoding, jpeg_quality, spec, tuple(folder.classes))
    jobs = [
        (
            p,
            str(folder.root / folder.items[p].path),
            folder.items[p].path,
            folder.items[p].label,
            job,
        )
        for s in todo
        for p in range(s * shard_size, min((s + 1) * shard_size, n))
    ]
    already = n - len(jobs)
    if done:
        print(f"resuming {out}: {len(done)} of {num_shards} shards already prepared")
    from stam_jax.progress import progress_bar

    bar = progress_bar(n, "prepare", "video", progress, initial=already)
    processes = worker_count(workers)
    results = ordered_map(_record, jobs, processes, prefetch=4 * max(processes, 1))
    kill_after = int(os.environ.get(STOP_HOOK, "-1"))
    try:
        for written, s in enumerate(todo, start=1):
            count = min((s + 1) * shard_size, n) - s * shard_size
            _write_part(parts, s, (next(results) for _ in range(count)), bar)
            if written == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die between shards
    finally:
        results.close()  # the decoding processes end now, however the writing ended
        bar.close()  # (an interruption's message then starts on a line of its own)
    return _finish(out, parts, num_shards, settings, {**listing, "stamps": stamps}, folder)


def _is_complete(out: Path) -> bool:
    """Whether `out` holds a finished prepared dataset (whose settings are checked later)."""
    try:
        return bool(json.loads((out / META_FILE).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _write_part(parts: Path, shard: int, results: Iterable[Decoded], bar: Any) -> None:
    """Writes one shard's records and, last, its sidecar (which marks the shard done)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = f"part-{shard:05d}"
    tmp = parts / f"{name}.array_record.tmp"
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    records, outcomes = 0, {}
    for result in results:
        if result.status == "ok":
            writer.write(result.views)
            records += 1
        else:
            outcomes[str(result.position)] = {"status": result.status, "reason": result.reason}
        bar.update(1)
    writer.close()
    os.replace(tmp, parts / f"{name}.array_record")
    _write_json(parts / f"{name}.json", {"records": records, "outcomes": outcomes})


def _finish(
    out: Path,
    parts: Path,
    num_shards: int,
    settings: dict[str, Any],
    listing: dict[str, Any],
    folder: VideoFolder,
) -> dict[str, Any]:
    """Names the non-empty shards as TFDS expects and writes the metadata."""
    import tensorflow_datasets as tfds

    split = SPLITS[settings["kind"]]
    sidecars = [json.loads((parts / f"part-{s:05d}.json").read_text()) for s in range(num_shards)]
    kept = [s for s in range(num_shards) if sidecars[s]["records"] > 0]
    for k, s in enumerate(kept):
        final = out / f"{DATASET_NAME}-{split}.array_record-{k:05d}-of-{len(kept):05d}"
        part = parts / f"part-{s:05d}.array_record"
        if part.exists():  # else renamed by an interrupted earlier finish
            os.replace(part, final)
    outcomes = {k: v for sidecar in sidecars for k, v in sidecar["outcomes"].items()}
    lengths = [sidecars[s]["records"] for s in kept]
    if not lengths:  # a dataset of nothing: what this job wrote goes
        shutil.rmtree(parts, ignore_errors=True)
        (out / META_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out.rmdir()  # if nothing else is there
        raise PreparedError(
            f"none of the {len(folder.items)} videos under {folder.root} could be prepared "
            f"(first reason: {next(iter(outcomes.values()))['reason']}); nothing was kept in "
            f"{out}."
        )

    skipped = [
        {"path": folder.items[int(p)].path, "label": folder.items[int(p)].label, **o}
        for p, o in sorted(outcomes.items(), key=lambda kv: int(kv[0]))
    ]
    dropped = [entry for entry in skipped if entry["status"] == "too_short"]
    failed = [entry for entry in skipped if entry["status"] == "failed"]
    counts = {
        "listed": len(folder.items),
        "records": sum(lengths),
        "dropped_too_short": len(dropped),
        "failed": len(failed),
    }
    ignored = _ignored(folder)
    spec = ClipSpec(**settings["spec"])
    feature_dict = features(settings["kind"], settings["encoding"], spec, tuple(folder.classes))
    template = tfds.core.ShardedFileTemplate(
        data_dir=out,
        template=TEMPLATE,
        dataset_name=DATASET_NAME,
        split=split,
        filetype_suffix="array_record",
    )
    split_info = tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=0, filename_template=template
    )
    tfds.folder_dataset.write_metadata(
        data_dir=out,
        features=feature_dict,
        split_infos=[split_info],
        filename_template=TEMPLATE,
        description=(
            f"STAM {settings['kind']} data ({settings['encoding']}) prepared by stam-jax from "
            f"{settings['source']}"
        ),
        metadata=tfds.core.MetadataDict(
            counts=counts,
            dropped=dropped,
            failed=failed,
            empty_classes=listing["empty_classes"],
            ignored=[{"path": p, "reason": r, "note": n} for p, r, n in ignored],
        ),
        check_data=False,
    )
    meta = {
        **settings,
        **listing,
        "ignored": ignored,
        "outcomes": outcomes,
        "num_records": sum(lengths),
        "counts": counts,
        "complete": True,
    }
    _write_json(out / META_FILE, meta)
    for path in parts.iterdir():
        path.unlink()
    parts.rmdir()
    return meta


def _summary(meta: dict[str, Any], out: Path) -> None:
    """Prints what was prepared, and what was skipped, empty or left out of the listing."""
    c = meta["counts"]
    print(
        f"prepared {c['records']} of {c['listed']} videos into {out} ({meta['kind']}, "
        f"{meta['encoding']}; {c['dropped_too_short']} dropped as too short, {c['failed']} "
        "failed to decode)"
    )
    ignored = [Ignored(*row) for row in meta.get("ignored", [])]  # absent: prepared before
    for line in listing_report(meta["classes"], meta["empty_classes"], ignored_summary(ignored)):
        print(line)
    for p, o in list(meta["outcomes"].items())[:10]:
        print(f"  skipped {meta['items'][int(p)][0]}: {o['reason']}", file=sys.stderr)


def _interrupted(out: Path, how: str = "interrupted") -> str:
    """What a run stopped part-way (`how`: 'interrupted', or the error) leaves in `out`, and
    how to go on."""
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or "items" not in meta:
        return f"{how} before anything was prepared in {out}."
    if meta.get("complete"):
        return f"{how}, but {out} was already finished ({meta['num_records']} records)."
    total = -(-len(meta["items"]) // meta["shard_size"])
    done = len(list((out / PARTS).glob("part-*.json")))
    return (
        f"{how}: {done} of {total} shards of {out} are prepared and kept; run the same "
        "command again to resume."
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command line's flags (see the module docstring) in `flag_values`."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "run config (sampling, views)", flag_values=flag_values
    )
    define = {"flag_values": flag_values}
    flags.DEFINE_string("src", None, "video folder: SRC/<class>/<video>", **define)
    flags.DEFINE_string("out", None, "dataset folder to write (or finish)", **define)
    flags.DEFINE_enum(
        "kind", "eval", list(KINDS), "eval: model inputs; train: resized frames", **define
    )
    flags.DEFINE_enum("encoding", "raw", list(ENCODINGS), "raw uint8 pixels or JPEG", **define)
    flags.DEFINE_integer("jpeg_quality", JPEG_QUALITY, "JPEG quality for --encoding jpeg", **define)
    flags.DEFINE_integer(
        "workers",
        None,
        "decoding processes: -1 one per core, 0 in this process (default config.data.workers)",
        **define,
    )
    flags.DEFINE_integer("shard_size", 256, "videos per shard", **define)
    flags.mark_flags_as_required(["config", "src", "out"], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Command-line entry point: `app.run(main, flags_parser=parse_flags)` (absl flags).

    Args:
      argv: what is left of the command line after the flags (the program name).
      flag_values: the parsed flags (see `define_flags`).

    Exits with 0 (all prepared), 2 (refused: one `error:` line), 3 (some videos skipped), 1
    (a write failed, such as on a full disk, or no decoding process could be started: one
    `error:` line; the same command resumes) or 130 (interrupted; the same command resumes).
    """
    del argv
    keep_interrupts()
    try:
        code = _run(flag_values)
    except KeyboardInterrupt:
        print(_interrupted(Path(flag_values.out)), file=sys.stderr)
        code = EXIT_INTERRUPTED
    except OSError as e:  # writing failed part-way: a full disk, a quota, a lost mount
        print(f"error: {_interrupted(Path(flag_values.out), f'stopped by {e}')}", file=sys.stderr)
        code = EXIT_FAILED
    except DecoderStartError as e:  # the system cannot start processes: its message says why
        print(stopped(e, _interrupted(Path(flag_values.out), "stopped")), file=sys.stderr)
        code = EXIT_FAILED
    sys.exit(code)


def _run(f: flags.FlagValues) -> int:
    """`main` without the Ctrl-C handling; the exit status (a refusal exits here)."""
    from stam_jax.configs import model_from_run_config, name_data_flags

    config = f.config
    try:
        model = model_from_run_config(config)
        spec = ClipSpec(
            num_frames=model.num_frames,
            frame_rate=config.data.frame_rate,
            resize=config.data.resize,
            crop=config.data.crop,
            num_clips=config.data.num_clips if f.kind == "eval" else 1,
            num_crops=config.data.num_crops if f.kind == "eval" else 1,
            short_videos=config.data.short_videos if f.kind == "eval" else "pad",
        )
    except ValueError as e:
        refuse(name_data_flags(e))
    workers = config.data.workers if f.workers is None else f.workers
    if workers < -1:
        name = "--config.data.workers" if f.workers is None else "--workers"
        refuse(f"{name}={workers}; {WORKERS_RULE}")
    try:
        meta = prepare(
            f.src,
            f.out,
            spec,
            kind=f.kind,
            encoding=f.encoding,
            # Only when given: with --encoding raw it is refused, not ignored.
            jpeg_quality=f.jpeg_quality if f["jpeg_quality"].present else None,
            class_list=config.data.class_list or None,
            workers=workers,
            shard_size=f.shard_size,
            progress=config.progress,
        )
    except PreparedError as e:
        refuse(e)
    _summary(meta, Path(f.out))
    return EXIT_SKIPPED if meta["outcomes"] else 0


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)
