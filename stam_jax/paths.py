"""Output paths: why one cannot be written, found before any work is done."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def unwritable(path: str | os.PathLike, *, into: bool = False) -> str | None:
    """Why `path` cannot be created or written, or None when nothing visible stands in the way.

    The nearest existing entry at or above the folder that will be written to must be a
    directory this process may write to: `path`'s parent for a file or folder created or
    replaced there, `path` itself with `into=True` (a folder that is written into). Nothing is
    created.

    Args:
      path: the output file or folder.
      into: `path` is a folder whose contents are written.

    Returns:
      e.g. "/data is a file, not a folder", or None.
    """
    start = Path(os.path.abspath(path))
    start = start if into else start.parent
    existing = next((p for p in (start, *start.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:  # cannot happen: '/' exists
        return None
    if not existing.is_dir():
        kind = "a broken link" if not existing.exists() else "a file"
        return f"{existing} is {kind}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permission denied or a read-only file system)"
    return None


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden sibling of `path` (same suffix) to write instead; moved over `path` once the block
    ends without error, deleted if it raises (or is interrupted): a failed write leaves no
    half-written file, and an existing `path` unchanged.

    Yields:
      The temporary path to write.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_folders_removed_on_failure(folder: str | os.PathLike) -> Iterator[None]:
    """Removes again, if the block raises (or is interrupted), `folder` and those of its parents
    that did not exist before it, where they are empty: a write that failed leaves no folder
    made for it (one holding a file written since is kept)."""
    folder = Path(folder)
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for made_folder in made:
            with contextlib.suppress(OSError):  # not empty: not only what this block made
                made_folder.rmdir()
        raise
