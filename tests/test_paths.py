"""Claims on output folders: one run at a time writes a folder, and a dead one holds nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stam_jax import paths
from stam_jax.paths import LOCK_FILE, InUseError, claimed

ROOT = Path(__file__).resolve().parent.parent

# A process of its own that claims FOLDER as process K, says so, and waits to be killed.
HOLDER = """
import sys, time
from stam_jax.paths import claimed
with claimed(sys.argv[1], int(sys.argv[2]), "--workdir=" + sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(folder: Path, process: int = 0) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(process)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "held\n"
    return child


def test_a_folder_held_by_a_live_process_is_refused_naming_it_and_freed_when_it_dies(tmp_path):
    child = hold(tmp_path)
    try:
        lock = tmp_path / LOCK_FILE.format(process=0)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == child.pid and holder["command"].endswith(f"{tmp_path} 0")
        with pytest.raises(InUseError) as refused, claimed(tmp_path, 0, f"--workdir={tmp_path}"):
            pytest.fail("claimed a folder another process holds")
        assert str(refused.value) == (
            f"--workdir={tmp_path} is in use by another run (process {child.pid} on "
            f"{holder['host']} since {holder['since']}: {holder['command']}); wait for it to "
            "end or stop it, or give another folder."
        )
        assert json.loads(lock.read_text()) == holder  # the refused claim changed nothing
        # Another process index of the same folder (a process of the same multi-host run).
        with claimed(tmp_path, 1, "--workdir"):
            assert (tmp_path / LOCK_FILE.format(process=1)).exists()
        assert not (tmp_path / LOCK_FILE.format(process=1)).exists()
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup runs: its file stays behind
        child.wait()
    assert lock.exists()
    with claimed(tmp_path, 0, "--workdir"):  # ... but its lock went with the process
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and list(tmp_path.iterdir()) == []


def test_a_second_claim_in_the_same_process_is_refused_and_the_first_still_holds(tmp_path):
    with claimed(tmp_path, 0, "--out x"):
        with (
            pytest.raises(InUseError, match=r"^--out x is in use by another run \(process "),
            claimed(tmp_path, 0, "--out x"),
        ):
            pass
        assert json.loads((tmp_path / LOCK_FILE.format(process=0)).read_text())["pid"] == (
            os.getpid()
        )
    with claimed(tmp_path, 0, "--out x"):  # released when the block ended
        pass


def test_a_claim_ends_with_its_block_when_it_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt), claimed(tmp_path, 0, "--workdir"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with claimed(tmp_path, 0, "--workdir"):
        pass


def test_a_file_removed_by_the_run_that_held_it_is_not_a_claim(tmp_path, monkeypatch):
    """A claimant that opened the file just before the holder removed it and let go must not
    count the lock it then gets on the removed file: a third run would lock a new file."""
    lock = tmp_path / LOCK_FILE.format(process=0)
    flock, calls = paths.fcntl.flock, []

    def holder_leaves_after_our_open(fd: int, how: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the holder removes the file between our open and our lock
            os.unlink(lock)
        flock(fd, how)

    monkeypatch.setattr(paths.fcntl, "flock", holder_leaves_after_our_open)
    with claimed(tmp_path, 0, "--workdir"):
        assert len(calls) == 2  # locked the file at the path on the second try
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        monkeypatch.setattr(paths.fcntl, "flock", flock)
        with pytest.raises(InUseError), claimed(tmp_path, 0, "--workdir"):
            pass  # (refused: that file is the one held)


def test_a_file_system_without_locks_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd: int, how: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(paths.fcntl, "flock", no_locks)
    monkeypatch.setattr(paths, "_NO_LOCKS_WARNED", set())
    for _ in range(2):
        with claimed(tmp_path, 0, "--workdir=w"):
            pass
    lock = tmp_path / LOCK_FILE.format(process=0)
    assert capsys.readouterr().err == (
        f"warning: cannot lock {lock} (No locks available); --workdir=w is used without a "
        "claim, so a second run started in it at the same time would not be refused.\n"
    )


def test_only_one_of_many_simultaneous_claims_holds(tmp_path):
    held, refused, start = [], [], threading.Barrier(8)

    def claim() -> None:
        start.wait()
        try:
            with claimed(tmp_path, 0, "--workdir"):
                held.append(1)
                start_done.wait()
        except InUseError:
            refused.append(1)
            start_done.wait()

    start_done = threading.Barrier(8)
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(held), len(refused)) == (1, 7)


def test_the_claim_file_of_another_users_run_is_locked_read_only(tmp_path, monkeypatch, capsys):
    """Another user's claim file (mode 0644) cannot be opened for writing: its lock is taken
    through a read-only descriptor, so a held folder is refused and a stale file replaced
    (the run went on unclaimed, with a warning about a file system without locks)."""
    lock = tmp_path / LOCK_FILE.format(process=0)
    child = hold(tmp_path)
    os_open = os.open

    def of_another_user(path: str, flags: int, mode: int = 0o777) -> int:
        if Path(path) == lock and flags & os.O_RDWR and lock.exists():
            raise PermissionError(13, "Permission denied", str(path))
        return os_open(path, flags, mode)

    try:
        holder = json.loads(lock.read_text())
        monkeypatch.setattr(os, "open", of_another_user)
        with pytest.raises(InUseError) as refused, claimed(tmp_path, 0, "--workdir=w"):
            pytest.fail("claimed a folder another user's process holds")
        monkeypatch.undo()
        assert str(refused.value).startswith(
            f"--workdir=w is in use by another run (process {child.pid} on {holder['host']}"
        )
    finally:
        monkeypatch.undo()
        child.send_signal(signal.SIGKILL)  # its file stays behind, not writable by this user
        child.wait()
    monkeypatch.setattr(os, "open", of_another_user)
    with claimed(tmp_path, 0, "--workdir=w"):  # replaced by one naming this run
        monkeypatch.undo()
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""
    # Created readable by all whatever the umask, so that other users' runs can lock it.
    old = os.umask(0o077)
    try:
        with claimed(tmp_path, 0, "--workdir=w"):
            assert lock.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_the_holder_of_a_long_command_is_named(tmp_path, monkeypatch):
    # A command of many flags: its holder file is longer than one read of 4096 bytes, which
    # named it "a process that just started".
    argv = ["run_train.py", *(f"--config.flag_{i}={'x' * 40}" for i in range(120))]
    monkeypatch.setattr(sys, "argv", argv)
    with claimed(tmp_path, 0, "--workdir=w"):
        assert (tmp_path / LOCK_FILE.format(process=0)).stat().st_size > 5000
        with pytest.raises(InUseError) as refused, claimed(tmp_path, 0, "--workdir=w"):
            pass
    assert f"(process {os.getpid()} on " in str(refused.value)
    assert str(refused.value).endswith(
        f": {' '.join(argv)}); wait for it to end or stop it, or give another folder."
    )


def test_a_folder_removed_just_before_the_claim_is_made_again_and_claimed(
    tmp_path, monkeypatch, capsys
):
    # Another run refused in the same new folder removes it between this run's mkdir and its
    # claim: the run went on unclaimed, warned of a file system without locks.
    folder, os_open, opened = tmp_path / "out", os.open, []

    def removed_first(path: str, flags: int, mode: int = 0o777) -> int:
        if Path(path).parent == folder and not opened:
            opened.append(path)
            folder.rmdir()
        return os_open(path, flags, mode)

    folder.mkdir()
    monkeypatch.setattr(os, "open", removed_first)
    with claimed(folder, 0, "--workdir=out"):
        monkeypatch.undo()
        assert json.loads((folder / LOCK_FILE.format(process=0)).read_text())["pid"] == os.getpid()
        with pytest.raises(InUseError), claimed(folder, 0, "--workdir=out"):
            pass
    assert opened and list(folder.iterdir()) == [] and capsys.readouterr().err == ""


def test_a_file_system_without_locks_is_warned_of_once_for_all_its_folders(
    tmp_path, monkeypatch, capsys
):
    # Training claims its workdir, then each periodic evaluation a new folder in it: on a file
    # system without locks, each printed the same warning again.
    def no_locks(fd: int, how: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(paths.fcntl, "flock", no_locks)
    monkeypatch.setattr(paths, "_NO_LOCKS_WARNED", set())
    with claimed(tmp_path, 0, "--workdir=run"):
        for step in (4, 8):
            for name in ("params", "ema"):
                folder = tmp_path / f"eval/step_{step}/{name}_results"
                folder.mkdir(parents=True)
                with claimed(folder, 0, f"--workdir={folder}"):
                    pass
    lock = tmp_path / LOCK_FILE.format(process=0)
    assert capsys.readouterr().err == (
        f"warning: cannot lock {lock} (No locks available); --workdir=run is used without a "
        "claim, so a second run started in it at the same time would not be refused.\n"
    )


def test_unwritable_names_what_stands_in_the_way_of_a_file_or_a_folder_written_into(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    # A file (or folder) made in its parent: the nearest existing folder above it counts.
    assert paths.unwritable(tmp_path / "new" / "deeper" / "out.json") is None
    assert paths.unwritable(tmp_path / "file") is None  # replaced there: its folder is writable
    assert paths.unwritable(tmp_path / "file" / "out.json") == (
        f"{tmp_path / 'file'} is a file, not a folder"
    )
    assert paths.unwritable(tmp_path / "dangling" / "out.json") == (
        f"{tmp_path / 'dangling'} is a broken link, not a folder"
    )
    # A folder written into: the folder itself counts.
    assert paths.unwritable(tmp_path / "file", into=True) == (
        f"{tmp_path / 'file'} is a file, not a folder"
    )
    assert paths.unwritable(tmp_path / "new", into=True) is None
    assert not (tmp_path / "new").exists()  # nothing is created


def test_unwritable_needs_write_and_search_access(tmp_path, monkeypatch):
    asked = []

    def access(path, mode):
        asked.append((Path(path), mode))
        return Path(path) != tmp_path / "locked"

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", access)
    assert paths.unwritable(tmp_path / "locked" / "run", into=True) == (
        f"{tmp_path / 'locked'} is not writable (permission denied or a read-only file system)"
    )
    assert asked == [(tmp_path / "locked", os.W_OK | os.X_OK)]


def test_staged_replaces_the_file_only_when_the_block_ends_without_error(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), paths.staged(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".") and temp.suffix == ".json"
        temp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with paths.staged(target) as temp:
        temp.write_text("new")
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]


def test_new_folders_are_removed_again_when_the_block_fails_and_kept_when_they_hold_a_file(
    tmp_path,
):
    folder = tmp_path / "a" / "b" / "c"
    assert paths.missing_folders(folder) == [folder, folder.parent, folder.parent.parent]
    # Interrupted: every folder the block made goes, innermost first.
    with pytest.raises(KeyboardInterrupt), paths.new_folders_removed_on_failure(folder):
        folder.mkdir(parents=True)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # One holding a file written since is kept, with the folders above it.
    with pytest.raises(ValueError), paths.new_folders_removed_on_failure(folder):
        folder.mkdir(parents=True)
        (folder.parent / "kept.txt").write_text("")
        raise ValueError
    assert not folder.exists() and (folder.parent / "kept.txt").exists()
    # Ended without error: all kept.
    with paths.new_folders_removed_on_failure(folder):
        folder.mkdir()
    assert folder.is_dir()


def test_folders_found_missing_earlier_are_removed_though_made_since_by_another(tmp_path):
    # Another process of the run made the folder before this one came to claim it.
    folder = tmp_path / "new" / "run"
    missing = paths.missing_folders(folder)
    folder.mkdir(parents=True)
    with pytest.raises(ValueError), paths.new_folders_removed_on_failure(folder, missing):
        raise ValueError
    assert list(tmp_path.iterdir()) == []


class _Refused(Exception):
    pass


def test_made_and_claimed_removes_what_it_made_when_the_run_fails_later(tmp_path):
    folder = tmp_path / "new" / "run"
    with pytest.raises(ValueError), contextlib.ExitStack() as held:
        paths.made_and_claimed(held, folder, 0, "--workdir=run", _Refused)
        assert (folder / LOCK_FILE.format(process=0)).exists()
        raise ValueError  # the run fails after the claim
    assert list(tmp_path.iterdir()) == []


def test_made_and_claimed_refuses_a_folder_it_cannot_make_or_another_run_holds(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(_Refused) as refused, contextlib.ExitStack() as held:
        paths.made_and_claimed(held, tmp_path / "file" / "run", 0, "--workdir=x/run", _Refused)
    assert str(refused.value) == (
        "--workdir=x/run cannot be created: Not a directory; name another folder."
    )
    in_use = r"^--out=y is in use by another run \(process "
    with (
        claimed(tmp_path, 0, "--out=y"),
        contextlib.ExitStack() as held,
        pytest.raises(_Refused, match=in_use),
    ):
        paths.made_and_claimed(held, tmp_path, 0, "--out=y", _Refused)


def test_a_claim_over_a_longer_file_a_killed_run_left_names_only_this_run(tmp_path):
    # The file a killed run left is rewritten whole: a longer leftover would make it unreadable.
    lock = tmp_path / LOCK_FILE.format(process=0)
    lock.write_text(json.dumps({"command": "x" * 10_000}) + "\n")
    with claimed(tmp_path, 0, "--workdir=w"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
