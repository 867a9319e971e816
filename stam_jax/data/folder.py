"""Kinetics-style video folders `root/<class>/.../<video>`, listed as the official loader does.

Classes are the sub-folder names of `root`, sorted in Python string order (or read from a
class-list file, one name per line); a video's label is its class's index. Inside a class folder,
files are found recursively (following links), walking folders in sorted order and files in
sorted name order, keeping the video extensions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm")


class DatasetError(ValueError):
    """A video folder that cannot be evaluated; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One video: its path relative to the root, and its label."""

    path: str
    label: int


@dataclasses.dataclass(frozen=True)
class VideoFolder:
    """The listing of a video folder.

    Attributes:
      root: the folder.
      classes: class names; index = label.
      items: videos in the official order (by class, then sorted path).
      empty_classes: classes with no video file.
    """

    root: Path
    classes: tuple[str, ...]
    items: tuple[VideoItem, ...]
    empty_classes: tuple[str, ...]


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class-list file {path} does not exist.")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"class-list file {path} repeats {duplicates}.")
    if not names:
        raise DatasetError(f"class-list file {path} is empty.")
    return names


def list_videos(
    root: str | os.PathLike,
    class_list: str | os.PathLike | None = None,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
) -> VideoFolder:
    """Lists a video folder in the official order.

    Args:
      root: `root/<class>/<video>`.
      class_list: optional file naming the classes in label order; sub-folders not in it are an
        error (their videos would otherwise vanish silently).
      extensions: video file extensions (case-insensitive).

    Returns:
      The `VideoFolder`.

    Raises:
      DatasetError: a missing root, no class folders, or no video at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a directory.")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if class_list:
        classes = read_class_list(class_list)
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DatasetError(
                f"{root} has class folders that are not in {class_list}: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}; fix the class list or the folder."
            )
    else:
        classes = folders
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders; expected root/<class>/<video>.")
    items, empty = [], []
    wanted = tuple(e.lower() for e in extensions)
    for label, name in enumerate(classes):
        found = []
        class_dir = root / name
        if class_dir.is_dir():
            for folder, _, files in sorted(os.walk(class_dir, followlinks=True)):
                found += [
                    os.path.relpath(os.path.join(folder, f), root)
                    for f in sorted(files)
                    if f.lower().endswith(wanted)
                ]
        if not found:
            empty.append(name)
        items += [VideoItem(path, label) for path in found]
    if not items:
        raise DatasetError(
            f"{root} holds no video files with extensions {', '.join(extensions)} in its "
            f"{len(classes)} class folders."
        )
    return VideoFolder(root, tuple(classes), tuple(items), tuple(empty))
