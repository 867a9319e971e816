"""The kept results of an interrupted evaluation (`stam_jax.partial`) on their own: what is
read back, refused, cut off before appending and removed (`test_eval` has the evaluations that
write and resume them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stam_jax.partial import (
    PARTIAL,
    Journal,
    Kept,
    PartialError,
    kept_count,
    read_kept,
    record_dtype,
    remove,
)

CLASSES = 3
SETTINGS = {"--config.dtype": "float32"}


def logits_of(positions: list[int]) -> np.ndarray:
    """Logits that tell the videos apart: video p's are p, p + 0.5, p + 0.25."""
    return np.array([[p, p + 0.5, p + 0.25] for p in positions], np.float32)


def add(journal: Journal, positions: list[int], skipped: dict | None = None) -> None:
    rows = np.array(positions, np.int64)
    journal.add(rows, logits_of(positions), -logits_of(positions), skipped or {})


def read(folder: Path, processes: int = 1, videos: int | None = None, settings=None) -> Kept:
    return read_kept(
        folder, 0, processes, CLASSES, settings or (lambda: SETTINGS), "--workdir=w", videos
    )


def test_without_leaves_out_the_results_and_skipped_videos_of_the_positions_given():
    kept = Kept(
        np.array([4, 1, 7]),
        logits_of([4, 1, 7]),
        -logits_of([4, 1, 7]),
        2 * logits_of([4, 1, 7]),  # the features
        {2: {"status": "failed", "reason": "r"}, 9: {"status": "too_short", "reason": "s"}},
    )
    rest = kept.without({1, 9})
    assert rest.positions.tolist() == [4, 7] and list(rest.skipped) == [2]
    np.testing.assert_array_equal(rest.logits, logits_of([4, 7]))
    np.testing.assert_array_equal(rest.scores, -logits_of([4, 7]))
    np.testing.assert_array_equal(rest.features, 2 * logits_of([4, 7]))
    assert kept.positions.tolist() == [4, 1, 7] and len(kept.skipped) == 2  # left as it was


def test_a_description_of_a_format_this_version_does_not_read_is_refused(tmp_path):
    # A later version's files, whole and well formed: never read as if of a known format.
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [0, 1])
    meta = json.loads((folder / "p0.json").read_text())
    (folder / "p0.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(PartialError) as refused:
        read(folder)
    assert str(refused.value) == (
        f"--workdir=w holds the results of an interrupted evaluation, but {folder}/p0.* cannot "
        f"be read (format 3, this version reads 1, 2); delete {folder} to evaluate from the "
        "start."
    )


def test_results_of_a_model_with_other_classes_are_refused(tmp_path):
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [0])
    with pytest.raises(PartialError, match=r"settings \(the model's classes: 3 then, 4 now\); "):
        read_kept(folder, 0, 1, CLASSES + 1, lambda: SETTINGS, "--workdir=w")


def test_a_negative_position_is_refused_as_damaged_files(tmp_path):
    folder = tmp_path / PARTIAL
    journal = Journal(folder, 0, CLASSES, lambda: SETTINGS)
    add(journal, [-1, 2])  # a record whose CRC matches, but of no listed video
    with pytest.raises(PartialError, match=r"they name video -1, not one of the 5 listed"):
        read(folder, videos=5)
    remove(folder, 0, 1)
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [0], {-2: {"status": "x", "reason": "y"}})
    with pytest.raises(PartialError, match=r"they name video -2, not one of the 5 listed"):
        read(folder, videos=5)


def test_a_video_kept_twice_is_read_from_the_first_files(tmp_path):
    # Per-host folders resumed with another process count: p0 and p1 both hold video 5 (of
    # other evaluations of it); p0's is carried, and a video evaluated in one is not skipped.
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [5, 6])
    p1 = Journal(folder, 1, CLASSES, lambda: SETTINGS)
    rows = np.array([7, 5])
    p1.add(rows, logits_of([7, 5]) + 100, -logits_of([7, 5]), {6: {"status": "x", "reason": "y"}})
    kept = read(folder)
    assert kept.positions.tolist() == [5, 6, 7] and kept.skipped == {}
    want = logits_of([5, 6, 7])
    want[2] += 100  # video 7, of p1 only
    np.testing.assert_array_equal(kept.logits, want)
    assert kept_count(folder) == 3


def test_an_append_after_a_damaged_record_keeps_the_intact_ones_after_it(tmp_path):
    # A damaged record between intact ones: the next run cuts off only what follows the last
    # intact record (cutting at the count of intact records lost video 6, or cut into it).
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [4, 5, 6])
    data = folder / "p0.bin"
    damaged = bytearray(data.read_bytes())
    damaged[record_dtype(CLASSES).itemsize + 9] ^= 1  # video 5's
    data.write_bytes(bytes(damaged) + b"\0" * 5)  # and a record cut short
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [7])
    kept = read(folder)
    assert kept.positions.tolist() == [4, 6, 7]
    np.testing.assert_array_equal(kept.logits, logits_of([4, 6, 7]))
    assert data.stat().st_size == 4 * record_dtype(CLASSES).itemsize


def test_an_append_after_a_line_cut_short_starts_a_line_of_its_own(tmp_path, capsys):
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [], {3: {"status": "x", "reason": "y"}})
    with open(folder / "p0.skipped.jsonl", "a") as f:
        f.write('{"position": 8, "sta')  # a kill while writing
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [], {9: {"status": "x", "reason": "z"}})
    assert sorted(read(folder).skipped) == [3, 9]
    assert capsys.readouterr().err == ""  # nothing damaged is left behind


def test_settings_are_asked_for_only_when_some_results_are_kept(tmp_path):
    # They hold a digest of the params, which a run with nothing kept need not wait for.
    def never() -> dict:
        raise AssertionError("settings asked for")

    folder = tmp_path / PARTIAL
    assert read(folder, settings=never).positions.size == 0  # no folder
    folder.mkdir()
    (folder / "p1.json").write_text("{}")  # another process's
    assert read(folder, processes=2, settings=never).positions.size == 0
    assert read_kept(None, 0, 1, CLASSES, never, "--workdir=w").skipped == {}


def test_many_differing_settings_are_named_five_at_most(tmp_path):
    folder = tmp_path / PARTIAL
    then = {f"--config.s{i}": i for i in range(7)}
    add(Journal(folder, 0, CLASSES, lambda: then), [0])
    now = {name: value + 1 for name, value in then.items()}
    with pytest.raises(PartialError) as refused:
        read(folder, settings=lambda: now)
    named = "; ".join(f"--config.s{i}: {i} then, {i + 1} now" for i in range(5))
    assert f"other settings ({named}; ...); run the command" in str(refused.value)
    with pytest.raises(PartialError) as refused:
        read(folder, settings=lambda: {**then, "--config.s6": 0})
    assert "other settings (--config.s6: 6 then, 0 now); run the command" in str(refused.value)


def test_remove_takes_a_description_left_half_written(tmp_path):
    # A kill between writing pK.json.tmp and renaming it: the folder was never removed.
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [0])
    (folder / "p0.json.tmp").write_text('{"format"')
    (folder / "p2.json.tmp").write_text('{"format"')
    remove(folder, 0, 2)
    assert not folder.exists()


def test_a_setting_kept_then_but_not_set_now_differs(tmp_path):
    # A version that no longer records a setting does not carry results made with it set.
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: {**SETTINGS, "--config.seed": 3}), [0])
    with pytest.raises(PartialError, match=r"settings \(--config.seed: 3 then, \(not set\) now\)"):
        read(folder)


def test_kept_count_counts_the_files_that_can_be_read(tmp_path):
    # What an interrupted run prints: a description that cannot be read counts none (that run
    # then says so when resumed), and is no traceback at the end of the interrupted one.
    folder = tmp_path / PARTIAL
    add(Journal(folder, 0, CLASSES, lambda: SETTINGS), [0, 1], {2: {"status": "x", "reason": "y"}})
    add(Journal(folder, 1, CLASSES, lambda: SETTINGS), [3])
    (folder / "p1.json").write_text("{")
    assert kept_count(folder) == 3
    assert kept_count(tmp_path / "nothing") == 0
