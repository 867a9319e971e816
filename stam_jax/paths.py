"""Output paths: why one cannot be written, found before any work is done, and claims on
output folders, so that two runs never write one at once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
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


def within_data(workdir: str | os.PathLike, root: str | os.PathLike, flag: str) -> str | None:
    """Why `workdir` must not hold a run's outputs: it is `root`, data the run reads (named by
    `flag`, e.g. '--config.data.root'), or inside it (None: neither). The next run would list
    its folders as classes of videos, and its files as videos."""
    if not str(root).strip():
        return None
    work, data = Path(os.path.realpath(workdir)), Path(os.path.realpath(root))
    if work != data and data not in work.parents:
        return None
    where = "is" if work == data else "is inside"
    return (
        f"{where} {flag}={root}: the next run would list its outputs as a class of videos; "
        f"write them outside the data, e.g. --workdir={data.parent / (data.name + '_runs')}"
    )


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


def swap_in(new: str | os.PathLike, path: str | os.PathLike, old: str | os.PathLike) -> None:
    """Puts the folder `new` at `path` in place of the folder there, which is moved to `old`
    (for the caller to delete); if `new` cannot be moved, or the move is interrupted, the
    folder is put back at `path` and the error raised."""
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """`folder` and those of its parents that do not exist now, innermost first."""
    folder = Path(folder)
    return [f for f in (folder, *folder.parents) if not f.exists()]


@contextlib.contextmanager
def new_folders_removed_on_failure(
    folder: str | os.PathLike, missing: list[Path] | None = None
) -> Iterator[None]:
    """Removes again, if the block raises (or is interrupted), `folder` and those of its parents
    that did not exist before it, where they are empty: a write that failed leaves no folder
    made for it (one holding a file written since is kept).

    Args:
      folder: the folder the block creates.
      missing: `missing_folders(folder)` as found earlier (default: now). The processes of a
        multi-process run that share `folder` each find them before their first collective,
        so that every one removes the folders the run made, whichever process made them: the
        last to leave then finds them empty.
    """
    made = missing_folders(folder) if missing is None else missing
    try:
        yield
    except BaseException:
        for made_folder in made:
            with contextlib.suppress(OSError):  # not empty: not only what this block made
                made_folder.rmdir()
        raise


class InUseError(RuntimeError):
    """Another run is writing the same output folder; the message names it and what to do."""


LOCK_FILE = ".stam-jax-p{process}.lock"  # in the folder, one per process of a run
_NO_LOCKS_WARNED: set[str | int] = set()  # folders, and file systems (device numbers)


@contextlib.contextmanager
def claimed(folder: str | os.PathLike, process: int, flag: str) -> Iterator[None]:
    """Holds `folder` (which must exist; made again if removed meanwhile) for this process
    until the block ends; another run claiming it with the same process index meanwhile is
    refused.

    Two runs writing one output folder at once (a command started twice, or a job requeued by
    a scheduler while the first still runs) would mix their checkpoints, records and results.
    The claim is an exclusive `flock` on `folder/.stam-jax-pK.lock` (K: the process index, so
    that the processes of one multi-host run share a folder): the system lets it go when the
    process ends in any way, SIGKILL and a lost machine included, so nothing is ever left
    claimed. The file names who holds it (process id, host, start time, command) for the
    message the next claimant gets, and is removed when the block ends. A file system that
    cannot lock files is warned of once, and the folder is used unclaimed.

    Args:
      folder: the output folder.
      process: this process's index in its run (0 for a single process).
      flag: how the folder was given, for messages (e.g. '--workdir=out').

    Raises:
      InUseError: another process holds `folder` for the same index; nothing is changed.
    """
    path = Path(folder) / LOCK_FILE.format(process=process)
    fd = _locked(path, flag)
    try:
        if fd is not None:
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv) or sys.executable,
            }
            with contextlib.suppress(OSError):  # the claim holds whatever this says
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(holder) + "\n").encode())
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # before the lock goes: a waiter then finds the file gone
            os.close(fd)


def made_and_claimed(
    held: contextlib.ExitStack,
    folder: str | os.PathLike,
    process: int,
    flag: str,
    refuse: Callable[[str], Exception],
    missing: list[Path] | None = None,
) -> None:
    """Creates `folder` and claims it (`claimed`) for as long as `held` is open; if the run
    fails before `held` closes, the folders it created are removed again where they are empty
    (`new_folders_removed_on_failure`, with `missing` as found before).

    Raises:
      `refuse(message)`: `folder` cannot be created (the message names why, and says to name
        another folder), or another run holds it (`InUseError`'s message).
    """
    try:
        held.enter_context(new_folders_removed_on_failure(folder, missing))
        Path(folder).mkdir(parents=True, exist_ok=True)
        held.enter_context(claimed(folder, process, flag))
    except OSError as e:
        raise refuse(f"{flag} cannot be created: {e.strerror or e}; name another folder.") from None
    except InUseError as e:
        raise refuse(str(e)) from None


def _locked(path: Path, flag: str) -> int | None:
    """An open descriptor of `path` holding its exclusive lock, or None where the file system
    cannot lock (warned of once per file system).

    The file of another user's run cannot be opened for writing: its lock is taken through a
    read-only descriptor (a flock needs no write access), so that a folder it holds is refused;
    a file it left (killed) is replaced by one naming this run. The file is made readable by
    all whatever the umask, so that other users' runs can do the same.
    """
    replaced, remade = False, 0
    while True:
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # Removed since it was made (by another run refused there): made again, and claimed.
            remade += 1
            if remade > 3:
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except PermissionError as e:
            try:
                fd, writable = os.open(path, os.O_RDONLY), False
            except OSError:
                _warn_unclaimed(path, flag, e)
                return None
        except OSError as e:
            _warn_unclaimed(path, flag, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InUseError(
                f"{flag} is in use by another run ({holder}); wait for it to end or stop it, "
                "or give another folder."
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
            try:  # warned of once for all its folders (each periodic evaluation makes one)
                where: str | int = os.fstat(fd).st_dev
            except OSError:
                where = str(path.parent)
            os.close(fd)
            _warn_unclaimed(path, flag, e, where)
            return None
        # The run that held the file may have removed it just before its lock went: the lock
        # counts only if `path` is still the file locked.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same and not writable and not replaced:
            replaced = True
            with contextlib.suppress(OSError):  # e.g. a sticky folder: kept, and locked as is
                path.unlink()
                os.close(fd)
                continue
        if same:
            if writable:
                with contextlib.suppress(OSError):  # the owner's umask may have hidden it
                    os.fchmod(fd, 0o644)
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock file open as `fd`, in words."""
    try:
        holder = json.loads(os.pread(fd, os.fstat(fd).st_size, 0))  # a long command too
        return (
            f"process {holder['pid']} on {holder['host']} since {holder['since']}: "
            f"{holder['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now
        return "a process that just started"


def _warn_unclaimed(path: Path, flag: str, error: OSError, where: str | int | None = None) -> None:
    """Warns that `path`'s folder is used unclaimed, once per `where` (default: the folder)."""
    where = str(path.parent) if where is None else where
    if where in _NO_LOCKS_WARNED:
        return
    _NO_LOCKS_WARNED.add(where)
    print(
        f"warning: cannot lock {path} ({error.strerror or error}); {flag} is used without "
        "a claim, so a second run started in it at the same time would not be refused.",
        file=sys.stderr,
    )
