r"""Kinetics as distributed (a flat folder of clips and an annotation CSV), arranged into the
`root/<class>/<video>` folders that evaluation, training and `prepare` read.

    python -m stam_jax.data.arrange --annotations k400/annotations/val.csv \
        --videos k400/val --out k400/val_by_class
    python run_eval.py --config configs/stam_16.py --config.checkpoint=ckpt/stam_16 \
        --config.data.root=k400/val_by_class --workdir out/stam_16

The CSV has a header naming at least `label`, `youtube_id`, `time_start` and `time_end` (other
columns, such as `split` or `is_cc`, are read past). A row's video is the file under
`--videos` (searched recursively; linked sub-folders are not followed) named
`<youtube_id>_<time_start:06d>_<time_end:06d>` with a video extension, or else
`<youtube_id>` with one. It appears as `--out/<label>/<its file name>`: a symbolic link to it
(`--mode symlink`, default), a hard link (`hardlink`) or a copy (`copy`). The videos themselves
are never changed.

Every label of the CSV gets its folder, with or without videos, so that the labels are the
sorted labels of the whole CSV (400 for Kinetics-400) however many videos a copy lacks.
What is left out is counted, printed, and listed in full in `--out/stam_arrange.json` (which
the video listing reads past): rows without a video, rows whose name fits several files (the
same clip as `.mp4` and `.mkv`, say), videos that rows of different labels name, rows naming
a video an earlier row of the same label names, and videos under `--videos` no row names.

The new folder is built beside `--out` and moved into place when complete: an interrupted or
failed run leaves `--out` as it was. An existing `--out` must be empty, or an earlier
arrangement replaced with `--force` (anything else in it is refused, and nothing is deleted).

Exit status: 0 arranged (rows left out or not), 2 refused before anything is written (one
`error:` line: a bad flag, CSV or label, an `--out` that is not empty or lies inside or around
`--videos`), 1 stopped by an error while writing (`error:` line; `--out` unchanged), 130
interrupted (Ctrl-C; `--out` unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from stam_jax.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser
from stam_jax.data.folder import ARRANGE_RECORD, VIDEO_EXTENSIONS, as_text, is_hidden
from stam_jax.interrupts import interrupts_held
from stam_jax.paths import (
    LOCK_FILE,
    InUseError,
    claimed,
    new_folders_removed_on_failure,
    swap_in,
    unwritable,
)
from stam_jax.progress import progress_bar

MODES = ("symlink", "hardlink", "copy")
COLUMNS = ("label", "youtube_id", "time_start", "time_end")
FORMAT = "stam_jax.arrange"
EXIT_FAILED = 1


class ArrangeError(ValueError):
    """An input that cannot be arranged (refused before anything is written); the message
    names it and the fix."""


class ArrangeFailed(RuntimeError):
    """Writing the arrangement failed (a full disk, links not allowed); `--out` is unchanged."""


class ReplacedInterrupted(KeyboardInterrupt):
    """A Ctrl-C once the new arrangement was in place, while the one it replaced was being
    deleted; the message says where `--out` stands."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One annotation: its line in the CSV (the header is line 1), label and clip."""

    line: int
    label: str
    youtube_id: str
    time_start: int
    time_end: int

    @property
    def names(self) -> tuple[str, str]:
        """The file names (without extension) its video may have, the first preferred."""
        clip = f"{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}"
        return clip, self.youtube_id

    def as_dict(self) -> dict:
        """For the record."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What an arrangement holds, worked out before anything is written.

    Attributes:
      classes: the CSV's labels, sorted (label order).
      links: (label, video path relative to `--videos`) of every video arranged, in CSV order.
      missing: rows without a video.
      ambiguous: (row, the files its name fits) for rows whose name fits several files.
      conflicting: (video, the rows naming it) for videos that rows of different labels name.
      repeated: (row, the line of the earlier row of the same label naming its video).
      unlisted: videos under `--videos` that no row names.
    """

    classes: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    missing: tuple[Row, ...]
    ambiguous: tuple[tuple[Row, tuple[str, ...]], ...]
    conflicting: tuple[tuple[str, tuple[Row, ...]], ...]
    repeated: tuple[tuple[Row, int], ...]
    unlisted: tuple[str, ...]


def _label_problem(label: str) -> str | None:
    """Why `label` cannot be a class folder's name, or None."""
    if not label:
        return "is empty (a CSV without labels, such as a test split, cannot be arranged by class)"
    if "/" in label or "\0" in label:
        return "holds '/' or a NUL, which a folder name cannot"
    if is_hidden(label):
        kind = "starts with '.'" if label.startswith(".") else "is a system folder's name"
        return f"{kind}: the video listing skips such folders as hidden or system entries"
    if len(label.encode("utf-8", "surrogateescape")) > 255:
        return "is longer than a folder name may be (255 bytes)"
    return None


def _time(value: str, column: str, line: int, flag: str) -> int:
    """A `time_start` / `time_end` value: whole seconds, written `10` or `10.0`."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < 0:
        raise ArrangeError(
            f"{flag} line {line}: {column} is {value!r}; it must be a whole number of seconds "
            "(the clip's start or end in its YouTube video)."
        )
    return int(number)


def read_annotations(path: str | os.PathLike) -> tuple[list[Row], str]:
    """The rows of a Kinetics annotation CSV, and the SHA-256 (hex) of the bytes they were read
    from.

    Args:
      path: the CSV: a header naming at least `COLUMNS` (in any order, with any others), then
        one row per clip; blank lines are skipped, a BOM is read past.

    Raises:
      ArrangeError: a missing, unreadable, non-UTF-8 or empty file, a header without the
        columns, a row with another number of fields than the header, an empty id, a time that
        is not whole seconds, or a label that cannot be a folder name (the line is named).
    """
    path = Path(path)
    flag = f"--annotations {path}"
    if path.is_dir():
        raise ArrangeError(f"{flag} is a folder; give the annotation CSV file (e.g. val.csv).")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArrangeError(f"{flag}: no such file; give the annotation CSV file.") from None
    except OSError as e:
        raise ArrangeError(f"{flag} cannot be read ({e.strerror or e}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ArrangeError(
            f"{flag} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "give the CSV as distributed, or save it as UTF-8."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    lines = []  # (line number, fields) of the lines that are not blank
    try:
        for fields in reader:
            if any(field.strip() for field in fields):
                lines.append((reader.line_num, fields))
    except csv.Error as e:
        raise ArrangeError(f"{flag} line {reader.line_num} is not CSV ({e}).") from None
    if not lines:
        raise ArrangeError(f"{flag} is empty; give the annotation CSV file.")
    header = [name.strip() for name in lines[0][1]]
    absent = [c for c in COLUMNS if c not in header]
    if absent:
        unlabelled = (
            " A split without labels (a test split) has no classes to arrange: put its videos in "
            "one sub-folder and evaluate them with --config.eval.accuracy=False."
            if absent == ["label"]
            else ""
        )
        raise ArrangeError(
            f"{flag} has no column {', '.join(absent)}: its first line is {lines[0][1]!r}, and "
            f"a Kinetics annotation CSV begins with a header naming {', '.join(COLUMNS)}."
            + unlabelled
        )
    at = {c: header.index(c) for c in COLUMNS}
    rows = []
    for line, fields in lines[1:]:
        if len(fields) != len(header):
            raise ArrangeError(
                f"{flag} line {line} has {len(fields)} fields, the header {len(header)}: "
                f"{fields!r}; mend or delete that line."
            )
        label = fields[at["label"]].strip()
        problem = _label_problem(label)
        if problem:
            raise ArrangeError(f"{flag} line {line}: the label {label!r} {problem}.")
        youtube_id = fields[at["youtube_id"]].strip()
        if not youtube_id or "/" in youtube_id:
            raise ArrangeError(
                f"{flag} line {line}: youtube_id is {youtube_id!r}; a video's id is a non-empty "
                "name without '/'."
            )
        start = _time(fields[at["time_start"]], "time_start", line, flag)
        end = _time(fields[at["time_end"]], "time_end", line, flag)
        rows.append(Row(line, label, youtube_id, start, end))
    if not rows:
        raise ArrangeError(f"{flag} has a header but no rows.")
    return rows, hashlib.sha256(data).hexdigest()


def index_videos(videos: Path) -> dict[str, list[str]]:
    """Video files under `videos` by name without extension: {stem: [paths relative to
    `videos`, sorted]}. Hidden and system entries are skipped; linked folders not followed."""
    index: dict[str, list[str]] = {}
    wanted = tuple(e.lower() for e in VIDEO_EXTENSIONS)
    for folder, subfolders, files in os.walk(videos):
        subfolders[:] = [d for d in subfolders if not is_hidden(d)]
        for name in files:
            if is_hidden(name) or not name.lower().endswith(wanted):
                continue
            rel = os.path.relpath(os.path.join(folder, name), videos)
            index.setdefault(os.path.splitext(name)[0], []).append(rel)
    for paths in index.values():
        paths.sort()
    return index


def match_rows(rows: list[Row], index: dict[str, list[str]]) -> Plan:
    """Matches each row to its video (see the module docstring) and sorts out what is left out."""
    missing, ambiguous = [], []
    named: dict[str, list[Row]] = {}  # video -> rows naming it, in CSV order
    for row in rows:
        found = next((index[name] for name in row.names if name in index), None)
        if found is None:
            missing.append(row)
        elif len(found) > 1:
            ambiguous.append((row, tuple(found)))
        else:
            named.setdefault(found[0], []).append(row)
    links, conflicting, repeated = [], [], []
    for video, its_rows in named.items():
        if len({row.label for row in its_rows}) > 1:
            conflicting.append((video, tuple(its_rows)))
            continue
        links.append((its_rows[0].line, its_rows[0].label, video))
        repeated += [(row, its_rows[0].line) for row in its_rows[1:]]
    used = set(named) | {path for _, files in ambiguous for path in files}
    unlisted = sorted(path for paths in index.values() for path in paths if path not in used)
    return Plan(
        classes=tuple(sorted({row.label for row in rows})),
        links=tuple((label, video) for _, label, video in sorted(links)),
        missing=tuple(missing),
        ambiguous=tuple(ambiguous),
        conflicting=tuple(conflicting),
        repeated=tuple(sorted(repeated, key=lambda r: r[0].line)),
        unlisted=tuple(unlisted),
    )


def _check_places(videos: Path, out: Path, force: bool) -> bool:
    """Refuses a `videos` that is not a folder, an `out` inside, around or equal to it, one
    that cannot be written, and an existing `out` that is neither empty nor (with `force`) an
    earlier arrangement. Returns whether `out` exists (and is to be replaced)."""
    if not videos.is_dir():
        raise ArrangeError(f"--videos {videos} is not a folder; give the folder of video files.")
    source, target = videos.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        where = "is" if target == source else "is inside" if source in target.parents else "holds"
        raise ArrangeError(
            f"--out {out} {where} --videos {videos} (resolved: {target} and {source}); give an "
            "--out outside the video folder (its links would be found as videos)."
        )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ArrangeError(f"--out {out} is a file or a link; give a folder to create.")
    problem = unwritable(out)  # the folder is built beside it, and renamed into place
    if problem:
        raise ArrangeError(f"cannot write --out {out}: {problem}; give another folder.")
    if not out.exists():
        return False
    if os.path.ismount(out):  # built beside it and renamed into place: not a mount point
        raise ArrangeError(
            f"--out {out} is a mount point, which the arrangement cannot be renamed onto; give a "
            f"folder inside it, e.g. --out {out / 'by_class'}."
        )
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return True
    record = _earlier_record(out)
    if record is None:
        raise ArrangeError(
            f"--out {out} is not empty and is not an arrangement (no {ARRANGE_RECORD}; it holds "
            f"{entries[:5]}{' ...' if len(entries) > 5 else ''}); give a new or empty folder."
        )
    foreign = _foreign_entries(out, record)
    if foreign:
        raise ArrangeError(
            f"--out {out} is an earlier arrangement, but holds what arranging did not make, or "
            f"the only copy of a video: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}; move "
            "those elsewhere, or give another --out. Nothing was deleted."
        )
    if not force:
        raise ArrangeError(
            f"--out {out} holds an earlier arrangement (of {record.get('annotations')}); add "
            "--force to replace it, or give another --out."
        )
    return True


def _earlier_record(out: Path) -> dict | None:
    """The record of an arrangement in `out`, or None if it holds none."""
    try:
        record = json.loads((out / ARRANGE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _foreign_entries(out: Path, record: dict) -> list[str]:
    """What in an earlier arrangement `out` a replacement would delete and lose: entries other
    than the record and the class folders, anything in those but the videos its record lists,
    and those videos whose data would go with them (`_would_lose`)."""
    classes = set(record.get("classes", []))
    made = dict(record.get("linked", []))
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == ARRANGE_RECORD:
            continue
        if entry.name not in classes or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry.name)
            continue
        for inner in sorted(entry.iterdir()):
            path = f"{entry.name}/{inner.name}"
            if path not in made or (inner.is_dir() and not inner.is_symlink()):
                foreign.append(path)
            elif _would_lose(inner, Path(record.get("videos", "")) / made[path], record):
                foreign.append(f"{path} (its source is gone or is another file)")
    return foreign


def _would_lose(entry: Path, source: Path, record: dict) -> bool:
    """Whether deleting `entry`, a video of an earlier arrangement, would lose data: a link
    never does; a hard link does when no other name holds its data (its source deleted since,
    or the entry replaced by a file of one's own); a copy does unless its source is still
    there as it was copied (size and modification time, which copying keeps)."""
    if entry.is_symlink():
        return False
    try:
        stat = entry.stat()
    except OSError:
        return False  # gone meanwhile: nothing to lose
    if record.get("mode") == "hardlink":
        return stat.st_nlink < 2
    try:
        original = source.stat()
    except OSError:
        return True
    if record.get("mode") == "copy":
        same = (original.st_size, int(original.st_mtime)) == (stat.st_size, int(stat.st_mtime))
        return not same
    return True  # a file where a link was made: one's own


def _sibling(out: Path, what: str) -> Path:
    """Where the new arrangement is built ('new'), and where the one it replaces waits while
    they are swapped ('old')."""
    return out.with_name(f".{out.name}.stam-jax-{what}")


def _delete_arrangement(folder: Path) -> None:
    """Deletes an arrangement, its record last: stopped part-way, what is left is still known
    for one (`_earlier_record`), and the next run deletes it (`_finish_killed_swap`)."""
    for entry in folder.iterdir():
        if entry.name == ARRANGE_RECORD:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / ARRANGE_RECORD).unlink(missing_ok=True)
    folder.rmdir()


def _finish_killed_swap(out: Path) -> None:
    """Ends what a run killed while swapping an arrangement in left: the arrangement it was
    replacing is put back at `out` if `out` is missing, and deleted if `out` holds the new."""
    old = _sibling(out, "old")
    if not old.is_dir() or old.is_symlink() or _earlier_record(old) is None:
        return
    if out.exists() or out.is_symlink():
        _delete_arrangement(old)
    else:
        os.rename(old, out)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A claimed, empty hidden sibling of `out` to build in; removed when the block ends,
    whatever happens (once moved to `out`, there is nothing left to remove)."""
    stage = _sibling(out, "new")
    stage.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir(exist_ok=True)
    try:
        with claimed(stage, 0, f"--out {out}"):
            _empty(stage)  # of what a run killed before it left
            try:
                yield stage
            finally:
                if stage.exists():
                    _empty(stage)
    finally:
        with contextlib.suppress(OSError):
            stage.rmdir()


def _empty(stage: Path) -> None:
    """Removes everything in `stage` but the file of this run's claim on it."""
    for entry in stage.iterdir():
        if entry.name == LOCK_FILE.format(process=0):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _record(
    plan_: Plan, annotations: Path, digest: str, videos: Path, mode: str, rows: int
) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "annotations": str(annotations.resolve()),
        "annotations_sha256": digest,
        "videos": str(videos.resolve()),
        "mode": mode,
        "rows": rows,
        "arranged": len(plan_.links),
        # [path in --out, path in --videos] of every video arranged
        "linked": [[_linked(label, video), video] for label, video in plan_.links],
        "classes": list(plan_.classes),
        "missing": [row.as_dict() for row in plan_.missing],
        "ambiguous": [{**row.as_dict(), "files": list(files)} for row, files in plan_.ambiguous],
        "conflicting": [
            {"video": video, "rows": [row.as_dict() for row in its_rows]}
            for video, its_rows in plan_.conflicting
        ],
        "repeated": [{**row.as_dict(), "same_as_line": line} for row, line in plan_.repeated],
        "unlisted": list(plan_.unlisted),
    }


def _linked(label: str, video: str) -> str:
    """Where `video` (relative to `--videos`) is arranged, relative to `--out`."""
    return f"{label}/{os.path.basename(video)}"


def _write(stage: Path, plan_: Plan, videos: Path, mode: str, progress: bool) -> None:
    """The class folders and the links (or copies) in `stage`."""
    for label in plan_.classes:
        (stage / label).mkdir()
    bar = progress_bar(len(plan_.links), "arranging", "videos", progress)
    try:
        for label, video in plan_.links:
            source = os.path.abspath(videos / video)
            target = stage / _linked(label, video)
            try:
                if mode == "symlink":
                    os.symlink(source, target)
                elif mode == "hardlink":
                    # link() does not follow a link: a video that is a (relative) symbolic
                    # link was linked itself, broken once in the class folder.
                    os.link(os.path.realpath(source), target)
                else:
                    shutil.copy2(source, target)
            except OSError as e:
                fix = {
                    "symlink": "--mode hardlink or copy",
                    "hardlink": "--mode symlink or copy (hard links stay on one file system)",
                    "copy": "free some space, or --mode symlink",
                }[mode]
                raise ArrangeFailed(
                    f"cannot {mode} {source} to {target.relative_to(stage)}: {e.strerror or e}; "
                    f"try {fix}."
                ) from None
            bar.update(1)
    finally:
        bar.close()


def arrange(
    annotations: str | os.PathLike,
    videos: str | os.PathLike,
    out: str | os.PathLike,
    mode: str = "symlink",
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Arranges the videos a Kinetics annotation CSV names into `out/<label>/<video>`.

    Args:
      annotations: the CSV (see `read_annotations`).
      videos: the folder of video files (searched recursively).
      out: the folder to make; it must not exist, be empty, or (with `force`) hold an earlier
        arrangement, which is replaced.
      mode: 'symlink', 'hardlink' or 'copy'.
      force: replace an earlier arrangement in `out`.
      progress: show a progress bar on stderr.

    Returns:
      The record written to `out/stam_arrange.json`: the classes, counts, each video arranged
      (`linked`: its path in `out` and in `videos`), and every row or video left out, with
      why.

    Raises:
      ArrangeError: a bad argument (nothing is written; the message names it and the fix).
      ArrangeFailed: the writing failed; `out` is as it was.
      ReplacedInterrupted: a Ctrl-C while the arrangement replaced was deleted (the new one is
        in place).
    """
    if mode not in MODES:
        raise ArrangeError(f"--mode {mode!r} is not one of {', '.join(MODES)}.")
    if not str(out).strip():
        raise ArrangeError("--out is empty; name the folder of class folders to make.")
    # '.' and 'x/..' have no name to build a sibling by: the folder they are, by its own name.
    annotations, videos, out = Path(annotations), Path(videos), Path(os.path.abspath(out))
    _finish_killed_swap(out)
    replace = _check_places(videos, out, force)
    rows, digest = read_annotations(annotations)
    plan_ = match_rows(rows, index_videos(videos))
    record = _record(plan_, annotations, digest, videos, mode, len(rows))
    old = _sibling(out, "old")
    try:
        with new_folders_removed_on_failure(out.parent), _staging(out) as stage:
            _write(stage, plan_, videos, mode, progress)
            (stage / ARRANGE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
            with interrupts_held():  # the swap is not cut in two by a Ctrl-C
                if replace:
                    swap_in(stage, out, old)
                else:
                    os.rename(stage, out)
                with contextlib.suppress(FileNotFoundError):  # moved along with the folder
                    (out / LOCK_FILE.format(process=0)).unlink()
    except InUseError as e:
        raise ArrangeError(str(e)) from None
    except OSError as e:
        raise ArrangeFailed(f"cannot write --out {out}: {e.strerror or e}.") from None
    if replace:  # `out` holds the new arrangement now, whatever happens to the old one
        try:
            _delete_arrangement(old)
        except KeyboardInterrupt:
            raise ReplacedInterrupted(
                f"--out {out} holds the new arrangement; the one it replaced is partly deleted, "
                f"in {old} (the next run of arrange deletes the rest)."
            ) from None
        except OSError as e:
            print(
                f"warning: the arrangement replaced could not all be deleted ({e.strerror or e});"
                f" delete {old} (the next run of arrange does).",
                file=sys.stderr,
            )
    return record


def summary(record: dict, out: Path) -> list[str]:
    """The lines printed at the end: what was arranged, and what was left out and why."""
    lines = [
        f"arranged {record['arranged']:,} of {record['rows']:,} rows into "
        f"{len(record['classes'])} class folders in {out} ({record['mode']})"
    ]

    def shown(items: list[str]) -> str:
        return ", ".join(map(as_text, items[:3])) + (" ..." if len(items) > 3 else "")

    groups = [
        ("missing", "rows without a video under --videos", lambda r: r["youtube_id"]),
        ("ambiguous", "rows whose name fits several files", lambda r: " = ".join(r["files"])),
        ("conflicting", "videos that rows of different labels name", lambda r: r["video"]),
        (
            "repeated",
            "rows repeating an earlier row's video and label",
            lambda r: f"line {r['line']}",
        ),
        ("unlisted", "videos under --videos that no row names", str),
    ]
    for key, what, name in groups:
        if record[key]:
            left_out = ", left out" if key in ("ambiguous", "conflicting") else ""
            examples = shown([name(r) for r in record[key]])
            lines.append(f"{what}{left_out}: {len(record[key]):,} ({examples})")
    if len(lines) > 1:
        lines.append(f"all listed in {out / ARRANGE_RECORD}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = ArgumentParser(
        prog="python -m stam_jax.data.arrange",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--annotations", required=True, help="the annotation CSV (e.g. val.csv)")
    parser.add_argument("--videos", required=True, help="the folder of the video files")
    parser.add_argument("--out", required=True, help="the folder of class folders to make")
    parser.add_argument("--mode", default="symlink", choices=MODES, help="default: symlink")
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier arrangement in --out"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        record = arrange(
            args.annotations, args.videos, out, args.mode, args.force, sys.stderr.isatty()
        )
    except ArrangeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ArrangeFailed as e:
        print(f"error: {e} --out is as it was.", file=sys.stderr)
        return EXIT_FAILED
    except ReplacedInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"interrupted: --out {out} is as it was.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\n".join(summary(record, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
