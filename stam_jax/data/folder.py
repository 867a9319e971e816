"""Kinetics-style video folders `root/<class>/.../<video>`, listed as the official loader does.

Classes are the sub-folder names of `root`, sorted in Python string order (or read from a
class-list file, one name per line); a video's label is its class's index. Inside a class folder,
files are found recursively (following links), walking folders in sorted path order and files in
sorted name order, keeping the video extensions.

What is not a class or a video is left out and recorded in `VideoFolder.ignored`, never silently:

- hidden and system entries (names starting with '.', `__MACOSX`, `lost+found`, ...): never a
  class, a sub-folder to walk or a video (e.g. `.ipynb_checkpoints/`, `.git/`, macOS `._x.mp4`
  resource forks, which are not videos);
- files directly in the root (outside any class folder), and files in class folders without a
  video extension;
- a linked folder that leads back to a folder the walk is inside (a loop: `ln -s .. up`);
- a file reached a second time in the same class through a link (listed once, where it comes
  first). The same file reached from two classes is refused: its label would be ambiguous;
- folders that cannot be read;
- video files inside a hidden folder of a class folder (not walked for the listing, but looked
  into for them alone, since the official loader walks such folders and lists them).

One file in the root is part of the layout, neither ignored nor a video: `stam_arrange.json`,
the record that `stam_jax.data.arrange` writes beside the class folders it makes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
# What the official loader lists (case-insensitive); it skips no name starting with '.'.
OFFICIAL_EXTENSIONS = (".mp4", ".avi")
# System folders that are never classes (besides every name starting with '.').
JUNK_NAMES = frozenset(
    {"__MACOSX", "lost+found", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
)

# The record of `stam_jax.data.arrange` in the root of a folder it arranged.
ARRANGE_RECORD = "stam_arrange.json"

# Why an entry was ignored (`Ignored.reason`).
HIDDEN = "hidden"  # a hidden or system file or folder
NOT_VIDEO = "not_video"  # a file in a class folder without a video extension
ROOT_FILE = "root_file"  # a file directly in the root, outside any class folder
LINK_LOOP = "link_loop"  # a linked folder leading back to a folder the walk is inside
DUPLICATE = "duplicate"  # a file already listed in the same class, reached through a link
UNREADABLE = "unreadable"  # a folder that could not be read
IN_HIDDEN = "in_hidden"  # a video file inside a hidden folder of a class folder
REASONS = {
    HIDDEN: "hidden or system entries",
    NOT_VIDEO: "files without a video extension",
    ROOT_FILE: "files in the root outside any class folder",
    LINK_LOOP: "linked folders leading back to a folder they are in",
    DUPLICATE: "videos listed twice through a link",
    UNREADABLE: "unreadable folders",
    IN_HIDDEN: "video files inside hidden folders",
}


class DatasetError(ValueError):
    """A video folder that cannot be evaluated; the message says what to fix."""


class ClassListError(DatasetError):
    """A class-list file (--config.data.class_list) that cannot be read; the message names it."""


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One video: its path relative to the root, and its label."""

    path: str
    label: int


@dataclasses.dataclass(frozen=True)
class Ignored:
    """An entry under the root that is neither a class nor a video.

    Attributes:
      path: relative to the root (a folder or a file).
      reason: one of `REASONS`.
      note: details (the file it duplicates, the read error), or ''.
    """

    path: str
    reason: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class VideoFolder:
    """The listing of a video folder.

    Attributes:
      root: the folder.
      classes: class names; index = label.
      items: videos in the official order (by class, then sorted path).
      empty_classes: classes with no video file.
      ignored: entries that are neither classes nor videos, sorted by path (see the module
        docstring); a prepared dataset stores its source's (none for one prepared before
        stam-jax recorded them).
    """

    root: Path
    classes: tuple[str, ...]
    items: tuple[VideoItem, ...]
    empty_classes: tuple[str, ...]
    ignored: tuple[Ignored, ...] = ()

    def listing_digest(self) -> str:
        """The SHA-256 (hex) of what the data is: the classes, and each video's path and label
        (not where the root is: the same files elsewhere give the same digest)."""
        listing = [list(self.classes), [[item.path, item.label] for item in self.items]]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is a hidden or system entry (never a class or a video)."""
    return name.startswith(".") or name in JUNK_NAMES


def as_text(name: str) -> str:
    """A file or folder name as valid UTF-8 text, for places that must store or print one.

    A name whose bytes are not UTF-8 (e.g. Latin-1 names from an old zip archive) comes from
    the file system with those bytes as surrogate escapes, which UTF-8 cannot encode; they are
    written `\\xNN` here. Other names are returned unchanged.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_class_list(path: str | os.PathLike, flag: str | None = None) -> list[str]:
    """Class names from a UTF-8 text file, one per line (blank lines and a BOM ignored).

    Args:
      path: the file.
      flag: how the errors name the file, e.g. `--classes PATH` (default:
        `--config.data.class_list=PATH`, the run config's field).

    Raises:
      ClassListError: a missing file, a folder, unreadable, not UTF-8, empty, or a name
        repeated.
    """
    path = Path(path)
    flag = flag or f"--config.data.class_list={path}"
    if path.is_dir():
        raise ClassListError(
            f"{flag} is a folder; give a text file with one class name per line, in label order."
        )
    if not path.exists():
        raise ClassListError(
            f"{flag}: no such file; give a text file with one class name per line."
        )
    try:  # a regular file, or a pipe such as bash's <(cut -f1 labels.tsv)
        data = path.read_bytes()
    except OSError as e:
        raise ClassListError(f"{flag} cannot be read ({e.strerror or e}).") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM is not part of a name
    except UnicodeDecodeError as e:
        raise ClassListError(
            f"{flag} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save "
            "it as UTF-8."
        ) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ClassListError(f"{flag} repeats {duplicates}.")
    if not names:
        if not path.is_file():
            raise ClassListError(
                f"{flag} gave no class names; it is not a file but a pipe or device, which can "
                "be read only once: save the list to a file and give that."
            )
        raise ClassListError(f"{flag} is empty.")
    return names


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _class_files(
    root: str, name: str, wanted: tuple[str, ...], ignored: list[Ignored]
) -> list[tuple[str, str]]:
    """(path relative to the root, real path) of the videos of one class, in the official order.

    The order is `sorted(os.walk(root/name, followlinks=True))`'s: folders by path string,
    files by name. A linked folder is walked unless it leads to a folder the walk is inside.
    """
    top = os.path.join(root, name)
    inside = frozenset({os.path.realpath(root), os.path.realpath(top)})
    folders: list[tuple[str, str, list[os.DirEntry]]] = []
    stack = [(top, os.path.realpath(top), inside)]
    while stack:
        folder, real, chain = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            ignored.append(Ignored(os.path.relpath(folder, root), UNREADABLE, e.strerror or ""))
            continue
        files = []
        for entry in entries:
            rel = os.path.relpath(entry.path, root)
            if is_hidden(entry.name):
                ignored.append(Ignored(rel, HIDDEN))
                if not entry.is_symlink() and _is_dir(entry):
                    ignored.extend(_hidden_videos(root, entry.path, wanted))
            elif _is_dir(entry):
                target = os.path.realpath(entry.path)
                if target in chain:
                    note = f"-> {os.path.relpath(target, os.path.realpath(root))}"
                    ignored.append(Ignored(rel, LINK_LOOP, note))
                else:
                    stack.append((entry.path, target, chain | {target}))
            elif entry.name.lower().endswith(wanted):
                files.append(entry)
            else:
                ignored.append(Ignored(rel, NOT_VIDEO))
        folders.append((folder, real, files))
    found = []
    for _, real, files in sorted(folders, key=lambda f: f[0]):
        for entry in sorted(files, key=lambda e: e.name):
            # A file that is not itself a link is where its folder really is.
            link = entry.is_symlink()
            target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            found.append((os.path.relpath(entry.path, root), target))
    return found


def _hidden_videos(root: str, folder: str, wanted: tuple[str, ...]) -> list[Ignored]:
    """The video files (`wanted` or the official loader's extensions) anywhere inside a hidden
    folder of a class folder, as `IN_HIDDEN` entries. Links are not followed in there: the
    official loader would follow them, so its count can only be higher."""
    extensions = tuple({*wanted, *OFFICIAL_EXTENSIONS})
    found = []
    for path, _, files in os.walk(folder):  # an unreadable folder inside is passed over
        for name in files:
            if name.lower().endswith(extensions):
                found.append(Ignored(os.path.relpath(os.path.join(path, name), root), IN_HIDDEN))
    return found


def _class_folders(named: list[str], folders: list[str]) -> dict[str, str]:
    """The folder of each class-list name that has one: the folder of that name, else one whose
    name is the same text in another Unicode form (a name with accents typed in the list is
    composed, NFC; macOS writes folder names decomposed, NFD, and copies keep them). A second
    folder of the same text is left over, and refused as a folder not in the list.
    """
    exact = set(folders)
    by_text: dict[str, str] = {}
    for folder in folders:
        if folder not in named:
            by_text.setdefault(unicodedata.normalize("NFC", folder), folder)
    out = {}
    for name in named:
        if name in exact:
            out[name] = name
        elif unicodedata.normalize("NFC", name) in by_text:
            out[name] = by_text[unicodedata.normalize("NFC", name)]
    return out


def list_videos(
    root: str | os.PathLike,
    class_list: str | os.PathLike | None = None,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
) -> VideoFolder:
    """Lists a video folder in the official order.

    Args:
      root: `root/<class>/<video>`.
      class_list: optional file naming the classes in label order; sub-folders not in it are an
        error (their videos would otherwise vanish silently). A folder may spell a name in
        another Unicode form (NFD, as macOS writes names, for the list's NFC).
      extensions: video file extensions (case-insensitive).

    Returns:
      The `VideoFolder`; what is neither a class nor a video is in its `ignored`.

    Raises:
      DatasetError: a missing root, no class folders, no video at all, a file that two
        classes reach through links, class folders that `class_list` does not name, or
        `extensions` given as one string. `ClassListError` (a `DatasetError`): a
        `class_list` file that `read_class_list` refuses.
    """
    if isinstance(extensions, str):  # iterated, '.mp4' was the extensions '.', 'm', 'p', '4'
        raise DatasetError(
            f"extensions={extensions!r} is one string; pass a tuple of them, e.g. "
            f"({extensions!r},)."
        )
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a directory.")
    named = read_class_list(class_list) if class_list else []
    ignored: list[Ignored] = []
    folders = []
    for entry in os.scandir(root):
        if entry.name == ARRANGE_RECORD and not _is_dir(entry):
            continue  # the layout's own record (stam_jax.data.arrange)
        if entry.name not in named and is_hidden(entry.name):
            ignored.append(Ignored(entry.name, HIDDEN))
        elif _is_dir(entry):
            folders.append(entry.name)
        else:
            ignored.append(Ignored(entry.name, ROOT_FILE))
    folders.sort()
    if class_list:
        classes = named
        on_disk = _class_folders(named, folders)
        unknown = sorted(set(folders) - set(on_disk.values()))
        if unknown:
            raise DatasetError(
                f"{root} has class folders that are not in {class_list}: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}; fix the class list or the folder."
            )
    else:
        classes = folders
        on_disk = {name: name for name in folders}
    wanted = tuple(e.lower() for e in extensions)
    if not classes:
        message = f"{root} has no class sub-folders; expected root/<class>/<video>."
        flat = [
            i.path for i in ignored if i.reason == ROOT_FILE and i.path.lower().endswith(wanted)
        ]
        if flat:
            shown = ", ".join(map(as_text, sorted(flat)[:3])) + (" ..." if len(flat) > 3 else "")
            message += (
                f" It holds {len(flat)} video files itself ({shown}): a Kinetics copy with its "
                "annotation CSV is made into class folders by python -m stam_jax.data.arrange; "
                "videos without classes go in one sub-folder (evaluated with "
                "--config.eval.accuracy=False)."
            )
        raise DatasetError(message)
    items, empty = [], []
    first: dict[str, tuple[str, int]] = {}  # real path -> (listed path, label)
    for label, name in enumerate(classes):
        found = []
        if name in on_disk:
            for path, real in _class_files(str(root), on_disk[name], wanted, ignored):
                if real not in first:
                    first[real] = (path, label)
                    found.append(path)
                elif first[real][1] == label:
                    ignored.append(Ignored(path, DUPLICATE, f"= {first[real][0]}"))
                else:
                    raise DatasetError(
                        f"{root / path} and {root / first[real][0]} are the same file (through "
                        f"a link) in two classes, {name!r} and {classes[first[real][1]]!r}: its "
                        "label is ambiguous. Remove the link or one of the two."
                    )
        if not found:
            empty.append(name)
        items += [VideoItem(path, label) for path in found]
    if not items:
        raise DatasetError(
            f"{root} holds no video files with extensions {', '.join(extensions)} in its "
            f"{len(classes)} class folders."
        )
    ignored.sort(key=lambda i: i.path)
    return VideoFolder(root, tuple(classes), tuple(items), tuple(empty), tuple(ignored))


def ignored_summary(ignored: tuple[Ignored, ...] | list[Ignored], examples: int = 10) -> dict:
    """`ignored` as {reason: {'count': n, 'paths': the first `examples` paths}} (for reports)."""
    out: dict[str, dict] = {}
    for entry in ignored:
        group = out.setdefault(entry.reason, {"count": 0, "paths": []})
        group["count"] += 1
        if len(group["paths"]) < examples:
            group["paths"].append(f"{entry.path} {entry.note}".strip())
    return out


def official_differences(
    items: Sequence[VideoItem], ignored: Sequence[Ignored], examples: int = 10
) -> dict[str, dict]:
    """How the official loader's listing of the same root differs from this one's, with a
    few paths each: `not_listed`, the videos listed here that it does not list (extensions
    other than .mp4/.avi); `also_listed`, the .mp4/.avi files in class folders skipped here as
    hidden that it lists: hidden names (such as macOS `._x.mp4` forks, which are not videos)
    and files inside hidden folders (`.cache/x.mp4`; not through links). Both empty: it lists
    the same videos."""

    def group(paths: list[str]) -> dict:
        return {"count": len(paths), "paths": paths[:examples]}

    ours = [item.path for item in items if not item.path.lower().endswith(OFFICIAL_EXTENSIONS)]
    theirs = [
        entry.path
        for entry in ignored
        if entry.reason in (HIDDEN, IN_HIDDEN)
        and "/" in entry.path  # in a class folder (a hidden entry in the root is no video)
        and entry.path.lower().endswith(OFFICIAL_EXTENSIONS)
    ]
    return {"not_listed": group(ours), "also_listed": group(theirs)}


def official_report(differences: dict[str, dict]) -> list[str]:
    """The line that says how the official loader's listing would differ
    (`official_differences`), or none when it lists the same videos."""
    parts = []
    for key, says in [
        ("not_listed", "does not list {n} of the videos listed here (not .mp4/.avi: {shown})"),
        ("also_listed", "lists {n} .mp4/.avi files skipped here as hidden ({shown})"),
    ]:
        group = differences.get(key) or {"count": 0}
        if group["count"]:
            shown = ", ".join(map(as_text, group["paths"][:3])) + (
                " ..." if group["count"] > 3 else ""
            )
            parts.append(says.format(n=group["count"], shown=shown))
    if not parts:
        return []
    return [
        f"note: the official loader {' and '.join(parts)}: its counts and top-1 are over "
        "another set of videos."
    ]


def listing_report(classes: Sequence[str], empty: Sequence[str], ignored: dict) -> list[str]:
    """The lines that tell a user which classes have no video and what the listing left out.

    Names are given as text (`as_text`): a name that is not UTF-8 would stop a print to a
    strict UTF-8 stdout.

    Args:
      classes: every class name.
      empty: the classes without a video.
      ignored: `ignored_summary(...)` of the listing.
    """
    lines = []
    if empty:
        lines.append(
            f"{len(empty)} of {len(classes)} classes have no video (their labels are kept): "
            f"{', '.join(map(as_text, empty[:10]))}{' ...' if len(empty) > 10 else ''}"
        )
    for reason, group in ignored.items():
        shown = ", ".join(map(as_text, group["paths"][:3])) + (" ..." if group["count"] > 3 else "")
        lines.append(f"ignored {group['count']} {REASONS[reason]}: {shown}")
    return lines
