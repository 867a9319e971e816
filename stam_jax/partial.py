"""The results of an evaluation kept as it runs, so that an interrupted one resumes.

`evaluate` appends each finished batch to `WORKDIR/partial/` (each process to its own files)
and removes the folder once `results.json` is written. A run stopped before that (Ctrl-C, a
crash, a killed process, a preempted machine) leaves there the videos it finished, and the same
command evaluates only the others. Process K's files:

- `pK.json`: what the results are of (the settings that decide a video's logits), written first;
- `pK.bin`: fixed-size records (the video's listing position, its logits, its ranking scores),
  appended a batch at a time;
- `pK.skipped.jsonl`: the videos that could not be evaluated (too short, failed), one a line.

A record or line cut short by a kill is left out when read, and cut off before appending. A
resumed run with P processes reads the files of every K with K % P equal to its process index,
so a shared folder is read once whatever the process count, and a folder of one's own (a host's
local disk) is read by the process that wrote it when the count is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax import sharding

PARTIAL = "partial"  # the folder under the workdir
FORMAT = 1


class PartialError(ValueError):
    """Kept results that this run cannot continue; the message says what to do."""


def record_dtype(num_classes: int) -> np.dtype:
    """One video's record in `pK.bin`."""
    return np.dtype(
        [("position", "<i8"), ("logits", "<f4", (num_classes,)), ("scores", "<f4", (num_classes,))]
    )


@dataclass
class Kept:
    """Results kept by earlier runs: positions (listing indices), their logits and scores
    (float32, one row each), and the videos that could not be evaluated (position ->
    {'status', 'reason'})."""

    positions: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    skipped: dict[int, dict[str, str]] = field(default_factory=dict)

    def without(self, positions: set[int]) -> Kept:
        """These results but those of `positions` (kept by another process as well)."""
        mine = ~np.isin(self.positions, list(positions))
        return Kept(
            self.positions[mine],
            self.logits[mine],
            self.scores[mine],
            {p: s for p, s in self.skipped.items() if p not in positions},
        )


def _whole(path: Path, unit: int | None) -> int:
    """The length of `path` without a record (`unit` bytes) or a line (`unit` None) cut short."""
    size = path.stat().st_size
    if unit is not None:
        return size - size % unit
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def _differences(kept: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'NAME: A then, B now' for each setting that differs (by content, `sharding.by_content`)."""
    out = []
    for name in sorted(set(kept) | set(now)):
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


def _read_part(
    folder: Path, name: str
) -> tuple[dict[str, Any], np.ndarray, dict[int, dict[str, str]]]:
    """One process's files `name.*`: their settings, whole records and skipped videos."""
    meta = json.loads((folder / f"{name}.json").read_text())
    if meta["format"] != FORMAT:
        raise ValueError(f"format {meta['format']}, this version reads {FORMAT}")
    if not isinstance(meta["settings"], dict):
        raise ValueError(f"settings {meta['settings']!r}")
    dtype = record_dtype(int(meta["num_classes"]))
    data, lines = folder / f"{name}.bin", folder / f"{name}.skipped.jsonl"
    records = np.zeros(0, dtype)
    if data.exists():
        records = np.fromfile(
            data, dtype=dtype, count=_whole(data, dtype.itemsize) // dtype.itemsize
        )
    skipped = {}
    if lines.exists():
        for line in lines.read_bytes()[: _whole(lines, None)].splitlines():
            entry = json.loads(line)
            skipped[int(entry["position"])] = {
                "status": str(entry["status"]),
                "reason": str(entry["reason"]),
            }
    return meta["settings"], records, skipped


def read_kept(
    folder: Path | None,
    process: int,
    processes: int,
    num_classes: int,
    settings: Callable[[], dict[str, Any]],
    workdir_flag: str,
    videos: int | None = None,
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

    Raises:
      PartialError: the kept results are of other settings, or their description cannot be
        read; nothing is changed.
    """
    empty = Kept(
        np.zeros(0, np.int64),
        np.zeros((0, num_classes), np.float32),
        np.zeros((0, num_classes), np.float32),
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
    for k in ks:
        try:
            kept_settings, records, part_skipped = _read_part(folder, f"p{k}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartialError(
                f"{workdir_flag} holds the results of an interrupted evaluation, but "
                f"{folder / f'p{k}.*'} cannot be read ({e}); delete {folder} to evaluate from "
                "the start."
            ) from None
        differ = _differences(kept_settings, now)
        classes = records.dtype["logits"].shape[0]
        if not differ and classes != num_classes:  # the settings say so first
            differ = [f"the model's classes: {classes} then, {num_classes} now"]
        if differ:
            raise PartialError(
                f"{workdir_flag} holds the results of an interrupted evaluation with other "
                f"settings ({'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}); "
                f"{start_over}."
            )
        positions.append(records["position"])
        logits.append(records["logits"])
        scores.append(records["scores"])
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
    ) -> None:
        self.folder, self.name = folder, f"p{process}"
        self.dtype = record_dtype(num_classes)
        self._settings = settings
        self._ready = False
        self.failed = ""  # why results could not be kept (then none are kept any more)

    def _start(self) -> None:
        """Writes the description (if there is none), and cuts off what a kill left half
        written: appending after it would shift every later record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        header = self.folder / f"{self.name}.json"
        if not header.exists():
            meta = {
                "format": FORMAT,
                "num_classes": self.dtype["logits"].shape[0],
                "settings": self._settings(),
            }
            tmp = header.with_name(header.name + ".tmp")
            tmp.write_text(json.dumps(meta) + "\n")
            os.replace(tmp, header)  # a half-written description is never read
        for path, unit in (
            (self._path(".bin"), self.dtype.itemsize),
            (self._path(".skipped.jsonl"), None),
        ):
            if path.exists():
                os.truncate(path, _whole(path, unit))
        self._ready = True

    def _path(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"

    def add(
        self,
        positions: np.ndarray,
        logits: np.ndarray,
        scores: np.ndarray,
        skipped: Mapping[int, Mapping[str, str]],
    ) -> None:
        """Appends finished videos and skipped ones, each file in one write.

        Results that cannot be kept (a full disk, a folder that went away) do not stop the
        run: a warning says so once, and nothing more is kept.
        """
        if (not len(positions) and not skipped) or self.failed:
            return
        try:
            if not self._ready:
                self._start()
            if len(positions):
                rows = np.empty(len(positions), self.dtype)
                rows["position"], rows["logits"], rows["scores"] = positions, logits, scores
                with open(self._path(".bin"), "ab") as f:
                    f.write(rows.tobytes())
            if skipped:
                lines = "".join(
                    json.dumps({"position": int(p), "status": e["status"], "reason": e["reason"]})
                    + "\n"
                    for p, e in sorted(skipped.items())
                )
                with open(self._path(".skipped.jsonl"), "a") as f:
                    f.write(lines)
        except OSError as e:
            self.failed = f"{e.strerror or e}"
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
    """How many videos' results `folder` keeps (for the line an interrupted run prints)."""
    if not folder.is_dir():
        return 0
    count = 0
    for header in folder.glob("p*.json"):
        data = header.with_name(header.stem + ".bin")
        lines = header.with_name(header.stem + ".skipped.jsonl")
        try:
            if data.exists():
                size = record_dtype(int(json.loads(header.read_text())["num_classes"])).itemsize
                count += _whole(data, size) // size
            if lines.exists():
                count += lines.read_bytes()[: _whole(lines, None)].count(b"\n")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return count
