"""The results of an evaluation kept as it runs, so that an interrupted one resumes.

`evaluate` appends each finished batch to `WORKDIR/partial/` (each process to its own files)
and removes the folder once `results.json` is written. A run stopped before that (Ctrl-C, a
crash, a killed process, a preempted machine) leaves there the videos it finished, and the same
command evaluates only the others. Process K's files:

- `pK.json`: what the results are of (the settings that decide a video's logits), written first;
- `pK.bin`: fixed-size records (the video's listing position, its logits, its ranking scores,
  its features when the run exports them, and a CRC-32 of them), appended a batch at a time;
- `pK.skipped.jsonl`: the videos that could not be evaluated (too short, failed), one a line
  (with a CRC-32 of its position, status and reason).

A record or line cut short by a kill is left out when read, and cut off before appending. So is
a record or line whose CRC does not match (the zero-filled blocks a power loss can leave where
data was not yet on the disk, a flipped bit): a damaged record or line is never read as a
video's results, it is evaluated again, and a warning says how many were left out. Files of
format 1 (no CRC at all: only a record cut short, or a line that cannot be read, is left out)
are read and appended to in that format.

A resumed run with P processes reads the files of every K with K % P equal to its process
index, so a shared folder is read once whatever the process count, and a folder of one's own
(a host's local disk) is read by the process that wrote it when the count is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax import sharding

PARTIAL = "partial"  # the folder under the workdir
FORMAT = 2  # 2: each record, and each skipped line, holds a CRC-32 of itself
READS = (1, 2)  # formats read (a run interrupted before an upgrade goes on in its own)


class PartialError(ValueError):
    """Kept results that this run cannot continue; the message says what to do."""


def record_dtype(num_classes: int, version: int = FORMAT, features: int = 0) -> np.dtype:
    """One video's record in `pK.bin` (format 2: with the CRC-32 of the fields before it),
    with its `features` float32 values when there are any (`eval.features`)."""
    fields: list[tuple[Any, ...]] = [
        ("position", "<i8"),
        ("logits", "<f4", (num_classes,)),
        ("scores", "<f4", (num_classes,)),
    ]
    if features:
        fields.append(("features", "<f4", (features,)))
    return np.dtype([*fields, ("crc", "<u4")] if version >= 2 else fields)


def _checksums(records: np.ndarray) -> np.ndarray:
    """The CRC-32 of each record's bytes before its `crc` field."""
    size = records.dtype.itemsize
    data = records.tobytes()
    return np.fromiter(
        (zlib.crc32(data[i : i + size - 4]) for i in range(0, len(data), size)),
        np.uint32,
        len(records),
    )


def _intact(records: np.ndarray) -> np.ndarray:
    """Which records are whole (all of them in format 1, which has no CRC)."""
    if "crc" not in records.dtype.names:
        return np.ones(len(records), bool)
    return _checksums(records) == records["crc"]


@dataclass
class Kept:
    """Results kept by earlier runs: positions (listing indices), their logits, scores and
    features (float32, one row each; the features have no columns when the run exports none),
    and the videos that could not be evaluated (position -> {'status', 'reason'})."""

    positions: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    skipped: dict[int, dict[str, str]] = field(default_factory=dict)

    def without(self, positions: set[int]) -> Kept:
        """These results but those of `positions` (kept by another process as well)."""
        mine = ~np.isin(self.positions, list(positions))
        return Kept(
            self.positions[mine],
            self.logits[mine],
            self.scores[mine],
            self.features[mine],
            {p: s for p, s in self.skipped.items() if p not in positions},
        )


def _whole(path: Path, unit: int | None) -> int:
    """The length of `path` without a record (`unit` bytes) or a line (`unit` None) cut short."""
    size = path.stat().st_size
    if unit is not None:
        return size - size % unit
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


# Settings recorded since results were first kept: compared only where the kept results hold
# them, so that an evaluation an earlier stam-jax kept results of goes on as it would have.
ADDED_SINCE = frozenset({"--config.checkpoint's architecture"})


def _differences(kept: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'NAME: A then, B now' for each setting that differs (by content, `sharding.by_content`)."""
    out = []
    for name in sorted(set(kept) | set(now)):
        if name in ADDED_SINCE and name not in kept:
            continue
        a, b = kept.get(name, _NOT_SET), now.get(name, _NOT_SET)
        if sharding.compared(a) != sharding.compared(b):
            out.append(f"{name}: {_shown(a)} then, {_shown(b)} now")
    return out


_NOT_SET = {"shown": "(not set)", "content": None}  # a setting a version did not record


def _shown(value: Any) -> str:
    return str(sharding.shown(value)) if sharding.is_by_content(value) else repr(value)


def _files(folder: Path, process: int, processes: int) -> list[int]:
    """The K of every `pK.json` in `folder` that this process reads."""
    found = []
    for path in folder.glob("p*.json"):
        k = path.stem[1:]
        if k.isdigit() and int(k) % processes == process:
            found.append(int(k))
    return sorted(found)


def _header(path: Path) -> dict[str, Any]:
    """A `pK.json`, checked: its format is one this version reads."""
    meta = json.loads(path.read_text())
    if meta["format"] not in READS:
        raise ValueError(
            f"format {meta['format']}, this version reads {', '.join(map(str, READS))}"
        )
    if not isinstance(meta["settings"], dict):
        raise ValueError(f"settings {meta['settings']!r}")
    int(meta["num_classes"])
    return meta


def _records(path: Path, dtype: np.dtype) -> np.ndarray:
    """The whole records of `path` (none if it does not exist), damaged ones included."""
    if not path.exists():
        return np.zeros(0, dtype)
    return np.fromfile(path, dtype=dtype, count=_whole(path, dtype.itemsize) // dtype.itemsize)


def _line_crc(position: Any, status: Any, reason: Any) -> int:
    """The CRC-32 a line of `pK.skipped.jsonl` (format 2) holds of its values."""
    return zlib.crc32(json.dumps([position, status, reason]).encode())


def _skipped_line(position: int, status: str, reason: str, version: int) -> str:
    """A line of `pK.skipped.jsonl` in format `version` (2: with its CRC)."""
    entry: dict[str, Any] = {"position": position, "status": status, "reason": reason}
    if version >= 2:
        entry["crc"] = _line_crc(position, status, reason)
    return json.dumps(entry) + "\n"


def _skipped_entry(line: bytes, version: int) -> tuple[int, dict[str, str]] | None:
    """A line of `pK.skipped.jsonl` of format `version` as (position, {'status', 'reason'}),
    None if damaged (or, in format 2, its CRC does not match)."""
    try:
        entry = json.loads(line)
        values = entry["position"], entry["status"], entry["reason"]
        if version >= 2 and entry["crc"] != _line_crc(*values):
            return None
        return int(values[0]), {"status": str(values[1]), "reason": str(values[2])}
    except (ValueError, KeyError, TypeError):
        return None


def _read_part(
    folder: Path, name: str
) -> tuple[dict[str, Any], np.ndarray, dict[int, dict[str, str]], tuple[int, int]]:
    """One process's files `name.*`: their settings, intact records, skipped videos, and how
    many records and how many lines were damaged (left out)."""
    meta = _header(folder / f"{name}.json")
    dtype = record_dtype(int(meta["num_classes"]), meta["format"], int(meta.get("features", 0)))
    records = _records(folder / f"{name}.bin", dtype)
    intact = _intact(records)
    damaged_lines = 0
    lines = folder / f"{name}.skipped.jsonl"
    skipped = {}
    if lines.exists():
        for line in lines.read_bytes()[: _whole(lines, None)].splitlines():
            entry = _skipped_entry(line, meta["format"])
            if entry is None:
                damaged_lines += 1
            else:
                skipped[entry[0]] = entry[1]
    return meta["settings"], records[intact], skipped, (int((~intact).sum()), damaged_lines)


def _damaged(records: int, lines: int) -> str:
    """'N damaged records and M damaged lines of skipped videos' (the parts that are not 0)."""
    parts = []
    if records:
        parts.append(f"{records} damaged record{'s' if records > 1 else ''}")
    if lines:
        parts.append(f"{lines} damaged line{'s' if lines > 1 else ''} of skipped videos")
    return " and ".join(parts)


def read_kept(
    folder: Path | None,
    process: int,
    processes: int,
    num_classes: int,
    settings: Callable[[], dict[str, Any]],
    workdir_flag: str,
    videos: int | None = None,
    features: int = 0,
) -> Kept:
    """The results kept in `folder` for this process to carry (see the module docstring).

    Args:
      folder: `WORKDIR/partial` (it need not exist; None: nothing is read).
      process, processes: this process's index and the run's process count.
      num_classes: the model's class count (the records' size).
      settings: the settings of this run (called only when some results are kept); the kept
        ones must be the same, compared by content where a setting is a {'shown', 'content'}
        pair.
      workdir_flag: how the workdir was given, for messages (e.g. '--workdir=out').
      videos: the videos listed; a kept one outside them means damaged files.
      features: the float32 values each video's record holds besides its logits (0: none).

    Raises:
      PartialError: the kept results are of other settings, or their description cannot be
        read; nothing is changed.
    """
    empty = Kept(
        np.zeros(0, np.int64),
        np.zeros((0, num_classes), np.float32),
        np.zeros((0, num_classes), np.float32),
        np.zeros((0, features), np.float32),
    )
    if folder is None or not folder.is_dir():
        return empty
    ks = _files(folder, process, processes)
    if not ks:
        return empty
    now = settings()
    start_over = (
        f"run the command that was interrupted to finish it, or delete {folder} to evaluate "
        f"from the start (or give another --workdir)"
    )
    positions, logits, scores, skipped = [empty.positions], [empty.logits], [empty.scores], {}
    values = [empty.features]
    for k in ks:
        try:
            kept_settings, records, part_skipped, damaged = _read_part(folder, f"p{k}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartialError(
                f"{workdir_flag} holds the results of an interrupted evaluation, but "
                f"{folder / f'p{k}.*'} cannot be read ({e}); delete {folder} to evaluate from "
                "the start."
            ) from None
        differ = _differences(kept_settings, now)
        classes = records.dtype["logits"].shape[0]
        width = records.dtype["features"].shape[0] if "features" in records.dtype.names else 0
        if not differ and classes != num_classes:  # the settings say so first
            differ = [f"the model's classes: {classes} then, {num_classes} now"]
        if not differ and width != features:
            differ = [f"the features per video: {width} values then, {features} now"]
        if differ:
            raise PartialError(
                f"{workdir_flag} holds the results of an interrupted evaluation with other "
                f"settings ({'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}); "
                f"{start_over}."
            )
        if any(damaged):
            print(
                f"warning: {_damaged(*damaged)} in {folder / f'p{k}.*'} (cut short, or not "
                "written whole before a power loss) left out; their videos are evaluated again.",
                file=sys.stderr,
            )
        positions.append(records["position"])
        logits.append(records["logits"])
        scores.append(records["scores"])
        values.append(records["features"] if width else np.zeros((len(records), 0), np.float32))
        skipped.update(part_skipped)
    all_positions = np.concatenate(positions)
    named = np.concatenate([all_positions, np.fromiter(skipped, np.int64, len(skipped))])
    outside = named[(named < 0) | (named >= (videos if videos is not None else np.inf))]
    if outside.size:
        raise PartialError(
            f"{workdir_flag} holds the results of an interrupted evaluation, but they name "
            f"video {outside[0]}, not one of the {videos} listed (damaged files); delete "
            f"{folder} to evaluate from the start."
        )
    # Read twice (never written twice): the first is kept.
    _, first = np.unique(all_positions, return_index=True)
    first.sort()
    evaluated = set(all_positions.tolist())
    return Kept(
        all_positions[first],
        np.concatenate(logits)[first],
        np.concatenate(scores)[first],
        np.concatenate(values)[first],
        {p: s for p, s in skipped.items() if p not in evaluated},
    )


class Journal:
    """This process's file of finished videos (`pK.*` in `WORKDIR/partial`), appended per batch.

    Nothing is created before the first `add`; `settings` is called then (only if this process
    has no description file yet).
    """

    def __init__(
        self,
        folder: Path,
        process: int,
        num_classes: int,
        settings: Callable[[], dict[str, Any]],
        features: int = 0,
    ) -> None:
        self.folder, self.name = folder, f"p{process}"
        self.num_classes, self.features = num_classes, features
        self.format = FORMAT  # or the format already there
        self.dtype = record_dtype(num_classes, features=features)
        self._settings = settings
        self._ready = False
        self.failed = ""  # why results could not be kept (then none are kept any more)

    def _start(self) -> None:
        """Writes the description (if there is none; else appends in its format), and cuts off
        what a kill or a power loss left half written at the end: appending after a part of a
        record would shift every later one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        header = self.folder / f"{self.name}.json"
        if header.exists():  # read by this run already (`read_kept`): same settings
            self.format = _header(header)["format"]
            self.dtype = record_dtype(self.num_classes, self.format, self.features)
        else:
            meta = {"format": FORMAT, "num_classes": self.num_classes, "settings": self._settings()}
            if self.features:
                meta["features"] = self.features
            tmp = header.with_name(header.name + ".tmp")
            tmp.write_text(json.dumps(meta) + "\n")
            os.replace(tmp, header)  # a half-written description is never read
        data, lines = self._path(".bin"), self._path(".skipped.jsonl")
        if data.exists():
            intact = np.flatnonzero(_intact(_records(data, self.dtype)))
            os.truncate(data, (intact[-1] + 1 if intact.size else 0) * self.dtype.itemsize)
        if lines.exists():
            os.truncate(lines, _whole(lines, None))
        self._ready = True

    def _path(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"

    def add(
        self,
        positions: np.ndarray,
        logits: np.ndarray,
        scores: np.ndarray,
        skipped: Mapping[int, Mapping[str, str]],
        features: np.ndarray | None = None,
    ) -> None:
        """Appends finished videos (with their `features` rows when the journal keeps
        features) and skipped ones, each file in one write.

        Results that cannot be kept (a full disk, a folder that went away) do not stop the
        run: a warning says so once, and nothing more is kept.
        """
        if (not len(positions) and not skipped) or self.failed:
            return
        try:
            if not self._ready:
                self._start()
            if len(positions):
                rows = np.zeros(len(positions), self.dtype)
                rows["position"], rows["logits"], rows["scores"] = positions, logits, scores
                if self.features:
                    rows["features"] = features
                if "crc" in self.dtype.names:
                    rows["crc"] = _checksums(rows)
                with open(self._path(".bin"), "ab") as f:
                    f.write(rows.tobytes())
            if skipped:
                lines = "".join(
                    _skipped_line(int(p), e["status"], e["reason"], self.format)
                    for p, e in sorted(skipped.items())
                )
                with open(self._path(".skipped.jsonl"), "a") as f:
                    f.write(lines)
        except (OSError, ValueError, KeyError, TypeError) as e:  # the description damaged too
            self.failed = f"{getattr(e, 'strerror', None) or e}"
            print(
                f"warning: cannot keep results in {self.folder} ({self.failed}); the run goes "
                "on, but if it is interrupted, the videos from here on are evaluated again.",
                file=sys.stderr,
            )


def remove(folder: Path, process: int, processes: int) -> None:
    """Removes the files this process read or wrote (`pK.*` for K % processes == process, its
    own among them), then the folder if it is left empty."""
    if not folder.is_dir():
        return
    for path in list(folder.iterdir()):
        k, _, suffix = path.name.partition(".")
        ours = suffix in ("json", "json.tmp", "bin", "skipped.jsonl")  # not a copy kept aside
        if ours and k[:1] == "p" and k[1:].isdigit() and int(k[1:]) % processes == process:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another process's files, or something else, are there
        folder.rmdir()


def kept_count(folder: Path) -> int:
    """How many videos' results `folder` keeps (for the line an interrupted run prints): the
    videos of intact records and lines, each once, of the files that can be read."""
    if not folder.is_dir():
        return 0
    videos: set[int] = set()
    for header in folder.glob("p*.json"):
        try:
            _, records, skipped, _ = _read_part(folder, header.stem)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        videos.update(records["position"].tolist(), skipped)
    return len(videos)
