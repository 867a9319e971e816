"""Listing video folders: what is a class, what is a video, and what is reported as ignored."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from stam_jax.data.folder import (
    ClassListError,
    DatasetError,
    Ignored,
    VideoFolder,
    VideoItem,
    ignored_summary,
    list_videos,
    listing_report,
    official_differences,
    official_report,
    read_class_list,
)


def touch(root: Path, *paths: str) -> None:
    """Empty files (listing never opens them)."""
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")


def ignored(folder) -> dict[str, str]:
    return {i.path: i.reason for i in folder.ignored}


def test_hidden_junk_and_non_video_entries_are_not_classes_or_videos(tmp_path):
    touch(
        tmp_path,
        "b/v.mp4",
        "b/w.MOV",  # common containers PyAV reads
        "b/x.m4v",
        "b/notes.txt",
        "b/._v.mp4",  # a macOS resource fork: not a video
        "b/.cache/y.mp4",
        "a/v.avi",
        ".ipynb_checkpoints/v-checkpoint.mp4",
        ".git/HEAD",
        "__MACOSX/a/._v.avi",
        "loose.mp4",
    )
    (tmp_path / "c").mkdir()  # an empty class keeps its label
    folder = list_videos(tmp_path)
    assert folder.classes == ("a", "b", "c") and folder.empty_classes == ("c",)
    assert [(i.path, i.label) for i in folder.items] == [
        ("a/v.avi", 0),
        ("b/v.mp4", 1),
        ("b/w.MOV", 1),
        ("b/x.m4v", 1),
    ]
    assert ignored(folder) == {
        ".git": "hidden",
        ".ipynb_checkpoints": "hidden",
        "__MACOSX": "hidden",
        "b/.cache": "hidden",
        "b/.cache/y.mp4": "in_hidden",  # looked into for the official loader's listing
        "b/._v.mp4": "hidden",
        "b/notes.txt": "not_video",
        "loose.mp4": "root_file",
    }


def test_how_the_official_loader_would_list_the_same_root_is_reported(tmp_path):
    # The official loader lists .mp4/.avi only and skips no hidden name: on a copy with other
    # containers (yt-dlp's .mkv, .webm) or such names it evaluates another set. Which videos
    # differ is counted (results.json `official_listing`) and printed as one note.
    touch(tmp_path, "a/v.avi", "b/v.mp4", "b/w.MOV", "b/x.webm", "b/._v.mp4", "b/notes.txt")
    touch(tmp_path, "a/.backup/old/v.AVI", "a/.backup/v.mkv", "a/.backup/n.txt")
    touch(tmp_path, ".git/HEAD", "._root.mp4")
    folder = list_videos(tmp_path)
    differences = official_differences(folder.items, folder.ignored)
    assert differences == {
        "not_listed": {"count": 2, "paths": ["b/w.MOV", "b/x.webm"]},
        "also_listed": {"count": 2, "paths": ["a/.backup/old/v.AVI", "b/._v.mp4"]},
    }
    # What the official listing (restated below) holds that this one does not, and the reverse.
    _, theirs = official_listing(tmp_path)
    theirs = {path for path, _ in theirs if not path.startswith(".")}  # a hidden class folder
    ours = {item.path for item in folder.items}
    assert sorted(ours - theirs) == differences["not_listed"]["paths"]
    assert sorted(theirs - ours) == differences["also_listed"]["paths"]
    assert official_report(differences) == [
        "note: the official loader does not list 2 of the videos listed here (not .mp4/.avi: "
        "b/w.MOV, b/x.webm) and lists 2 .mp4/.avi files skipped here as hidden "
        "(a/.backup/old/v.AVI, b/._v.mp4): its "
        "counts and top-1 are over another set of videos."
    ]
    # The same videos: no note.
    folder = list_videos(tmp_path, extensions=(".mp4", ".avi"))
    differences = official_differences(folder.items, ())
    assert differences["not_listed"]["count"] == differences["also_listed"]["count"] == 0
    assert official_report(differences) == []


def test_video_files_in_hidden_folders_are_reported_and_links_there_not_followed(tmp_path):
    touch(tmp_path, "a/v.mp4", "a/.trash/x.mp4", "a/.trash/deep/y.MKV", "a/.trash/z.txt")
    touch(tmp_path, "elsewhere/w.mp4")
    os.symlink(tmp_path / "elsewhere", tmp_path / "a" / ".linked")
    folder = list_videos(tmp_path, class_list=None)
    assert [i.path for i in folder.items] == ["a/v.mp4", "elsewhere/w.mp4"]
    assert {p: r for p, r in ignored(folder).items() if p.startswith("a/")} == {
        "a/.linked": "hidden",  # a link: not looked into
        "a/.trash": "hidden",
        "a/.trash/deep/y.MKV": "in_hidden",
        "a/.trash/x.mp4": "in_hidden",
    }
    lines = listing_report(folder.classes, folder.empty_classes, ignored_summary(folder.ignored))
    assert "ignored 2 video files inside hidden folders: a/.trash/deep/y.MKV, a/.trash/x.mp4" in (
        lines
    )


def official_listing(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's find_classes and make_dataset (Kinetics400: .mp4 and .avi), restated."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    items = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith((".mp4", ".avi")):
                    items.append((os.path.relpath(os.path.join(folder, file), root), label))
    return classes, items


def test_classes_and_videos_are_in_the_official_order(tmp_path):
    # Python string order: capitals before small letters, ' ' before '(' before '-' before '/'
    # (a folder 'sub-1' comes before 'sub/deeper'), digits by character ('a10' before 'a2').
    touch(
        tmp_path,
        *[
            f"{c}/{v}"
            for c in ("abseiling", "Zumba", "passing American football (in game)", "a b", "a-b")
            for v in ("z.mp4", "B.avi", "a10.mp4", "a2.MP4", "sub/y.mp4", "Sub/x.mp4")
        ],
        "abseiling/sub-1/w.mp4",
        "abseiling/sub/deeper/v.mp4",
    )
    folder = list_videos(tmp_path)
    classes, items = official_listing(tmp_path)
    assert list(folder.classes) == classes
    assert [(i.path, i.label) for i in folder.items] == items
    assert classes[:3] == ["Zumba", "a b", "a-b"]
    assert [path for path, label in items if label == 3] == [
        "abseiling/B.avi",
        "abseiling/a10.mp4",
        "abseiling/a2.MP4",
        "abseiling/z.mp4",
        "abseiling/Sub/x.mp4",
        "abseiling/sub/y.mp4",
        "abseiling/sub-1/w.mp4",
        "abseiling/sub/deeper/v.mp4",
    ]


def test_extensions_given_as_one_string_are_refused(tmp_path):
    touch(tmp_path, "a/v.mp4", "a/w.webm", "a/notes.tmp")
    # Iterated, '.mp4' was the extensions '.', 'm', 'p' and '4': the .webm and .tmp files were
    # listed as videos.
    with pytest.raises(DatasetError, match=r"extensions='\.mp4' is one string; .* \('\.mp4',\)"):
        list_videos(tmp_path, extensions=".mp4")
    assert [i.path for i in list_videos(tmp_path, extensions=(".mp4",)).items] == ["a/v.mp4"]


def test_link_loops_are_not_walked_and_linked_duplicates_count_once(tmp_path):
    root = tmp_path / "root"
    touch(root, "a/v.mp4", "a/sub/w.mp4", "b/v.mp4")
    touch(tmp_path, "store/x.mp4")
    os.symlink("..", root / "a" / "up")  # back to the root: every class again
    os.symlink(".", root / "a" / "sub" / "self")
    os.symlink("sub", root / "a" / "again")  # the same videos, same class
    os.symlink("v.mp4", root / "b" / "twice.mp4")  # the first of the two by name
    os.symlink(tmp_path / "store" / "x.mp4", root / "b" / "x.mp4")  # a video stored elsewhere
    folder = list_videos(root)
    assert [(i.path, i.label) for i in folder.items] == [
        ("a/v.mp4", 0),
        ("a/again/w.mp4", 0),  # the first of the two in the official order
        ("b/twice.mp4", 1),
        ("b/x.mp4", 1),
    ]
    assert ignored(folder) == {
        "a/again/self": "link_loop",
        "a/sub/self": "link_loop",
        "a/sub/w.mp4": "duplicate",
        "a/up": "link_loop",
        "b/v.mp4": "duplicate",
    }
    os.symlink("../a/v.mp4", root / "b" / "other.mp4")  # one file, two labels
    with pytest.raises(DatasetError, match=r"same file .* in two classes, 'b' and 'a'"):
        list_videos(root)


def test_class_list_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffabseiling\r\nair drumming\r\n\r\n".encode())
    assert read_class_list(path) == ["abseiling", "air drumming"]  # BOM and CRLF stripped
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_class_list(path)
    with pytest.raises(DatasetError, match=r"class_list=.* is a folder; give a text file"):
        read_class_list(tmp_path)
    with pytest.raises(ClassListError, match=r"^--config\.data\.class_list=.*missing: no such"):
        read_class_list(tmp_path / "missing")
    # A pipe, as bash's <(cut -f1 labels.tsv) gives: read once; a second read says why it fails.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(b"abseiling\nair drumming\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert read_class_list(fifo, "--classes X") == ["abseiling", "air drumming"]
    writer.join()
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    with pytest.raises(ClassListError, match=r"^--classes X gave no class names; it is not a "):
        read_class_list(fifo, "--classes X")
    writer.join()


def test_names_that_are_not_utf8_are_listed_and_reported_as_text(tmp_path):
    # Latin-1 names (an old zip archive) come as surrogate escapes, which a UTF-8 stdout in
    # strict mode (the usual locale) cannot print: run_eval.py and prepare ended with a
    # traceback, after the results were written, when the summary named one.
    try:
        for name in (b"caf\xe9", b"ok"):
            os.mkdir(os.fsencode(tmp_path) + b"/" + name)
    except OSError:  # a file system that only takes UTF-8 names (macOS)
        pytest.skip("this file system refuses names that are not UTF-8")
    for name in (b"ok/v\xe9.mp4", b"ok/notes\xe9.txt"):
        (Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + name))).write_bytes(b"")
    folder = list_videos(tmp_path)
    assert folder.classes == ("caf\udce9", "ok") and folder.empty_classes == ("caf\udce9",)
    assert [i.path for i in folder.items] == ["ok/v\udce9.mp4"]  # the name itself, to open
    lines = listing_report(folder.classes, folder.empty_classes, ignored_summary(folder.ignored))
    assert lines == [
        "1 of 2 classes have no video (their labels are kept): caf\\xe9",
        "ignored 1 files without a video extension: ok/notes\\xe9.txt",
    ]
    for line in lines:
        line.encode("utf-8")  # printable on a strict UTF-8 stdout


def test_a_class_list_matches_folders_spelled_in_another_unicode_form(tmp_path):
    # macOS writes 'café' decomposed (e + combining accent) and copies keep it; the class list
    # typed elsewhere has it composed. The run was refused, naming folders "not in the class
    # list" that looked exactly like its lines.
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    touch(tmp_path, f"{nfd}/v.mp4", "zumba/w.mp4")
    path = tmp_path.parent / "classes.txt"
    path.write_text(f"zumba\n{nfc}\n", encoding="utf-8")  # not in sorted order
    folder = list_videos(tmp_path, path)
    assert folder.classes == ("zumba", nfc)  # the list's names, in its order
    assert [(i.path, i.label) for i in folder.items] == [("zumba/w.mp4", 0), (f"{nfd}/v.mp4", 1)]
    assert folder.empty_classes == ()


def test_a_class_list_names_classes_hidden_or_without_a_folder_and_refuses_the_rest(tmp_path):
    root = tmp_path / "root"
    touch(root, "a/v.mp4", ".b/v.mp4", ".cache/x.mp4")
    path = tmp_path / "classes.txt"
    path.write_text("a\n.b\nmissing\n")
    folder = list_videos(root, path)
    # A class the list names is one even with a hidden name; a name without a folder keeps its
    # label (no video); a hidden folder the list does not name stays ignored.
    assert folder.classes == ("a", ".b", "missing")
    assert [(i.path, i.label) for i in folder.items] == [("a/v.mp4", 0), (".b/v.mp4", 1)]
    assert folder.empty_classes == ("missing",)
    assert ignored(folder) == {".cache": "hidden"}
    touch(root, "c/w.mp4", "d/w.mp4")
    with pytest.raises(
        DatasetError,
        match=r"root has class folders that are not in .*classes\.txt: \['c', 'd'\]; fix the "
        r"class list or the folder\.$",
    ):
        list_videos(root, path)
    path.write_text("a\nc\nd\nc\na\n")
    with pytest.raises(
        ClassListError, match=r"^--config\.data\.class_list=.* repeats \['a', 'c'\]\.$"
    ):
        list_videos(root, path)


def test_extensions_are_matched_whatever_their_case_and_ignored_entries_sorted(tmp_path):
    touch(tmp_path, "a/v.mp4", "a/w.MKV", "a/notes.txt", "z.txt", ".git/HEAD")
    folder = list_videos(tmp_path, extensions=(".MP4", ".mkv"))
    assert [i.path for i in folder.items] == ["a/v.mp4", "a/w.MKV"]
    # Sorted by path, wherever the listing met them (the root's entries come first).
    assert [i.path for i in folder.ignored] == [".git", "a/notes.txt", "z.txt"]


def test_a_root_that_is_a_file_is_refused(tmp_path):
    touch(tmp_path, "videos.mp4")
    with pytest.raises(DatasetError, match=r"videos\.mp4 does not exist or is not a directory\."):
        list_videos(tmp_path / "videos.mp4")


def test_a_flat_folder_of_videos_is_refused_saying_how_to_arrange_it(tmp_path):
    touch(tmp_path, "a_000001_000011.mp4", "b_000002_000012.mp4", "c.MKV", "d.mp4", "notes.txt")
    with pytest.raises(DatasetError) as refused:
        list_videos(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} has no class sub-folders; expected root/<class>/<video>. It holds 4 video "
        "files itself (a_000001_000011.mp4, b_000002_000012.mp4, c.MKV ...): a Kinetics copy "
        "with its annotation CSV is made into class folders by python -m "
        "stam_jax.data.arrange; videos without classes go in one sub-folder (evaluated with "
        "--config.eval.accuracy=False)."
    )
    for name in ("a_000001_000011.mp4", "b_000002_000012.mp4", "c.MKV", "d.mp4"):
        (tmp_path / name).unlink()
    with pytest.raises(DatasetError) as refused:  # no video files in it: no such advice
        list_videos(tmp_path)
    assert str(refused.value).endswith("has no class sub-folders; expected root/<class>/<video>.")


def test_the_listing_digest_is_of_the_classes_paths_and_labels_not_the_root():
    def folder(root: str, label: int, classes=("a", "b")) -> VideoFolder:
        return VideoFolder(Path(root), classes, (VideoItem("a/v.mp4", label),), ())

    digest = folder("/data/k400", 0).listing_digest()
    assert len(digest) == 64 and folder("/mnt/copy", 0).listing_digest() == digest
    assert folder("/data/k400", 1).listing_digest() != digest  # another label
    assert folder("/data/k400", 0, ("a", "c")).listing_digest() != digest  # another class


def test_a_folder_that_cannot_be_read_is_recorded(tmp_path, monkeypatch):
    # Root reads any folder whatever its mode, so the refusal is made here: scanning 'a/locked'
    # fails as a folder without read permission does.
    from stam_jax.data import folder as folder_module

    touch(tmp_path, "a/v.mp4", "a/locked/w.mp4")
    scandir = os.scandir

    def refusing(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(folder_module.os, "scandir", refusing)
    listing = list_videos(tmp_path)
    assert [i.path for i in listing.items] == ["a/v.mp4"]
    assert [(i.path, i.reason, i.note) for i in listing.ignored] == [
        ("a/locked", "unreadable", "Permission denied")
    ]


def test_links_to_themselves_are_not_folders_and_do_not_stop_the_listing(tmp_path):
    # `ln -s loop loop`: asking whether it is a folder raises "Too many levels of symbolic
    # links" (ELOOP), not FileNotFoundError.
    touch(tmp_path, "a/v.mp4")
    os.symlink("loop", tmp_path / "loop")
    os.symlink("self", tmp_path / "a" / "self")
    listing = list_videos(tmp_path)
    assert listing.classes == ("a",) and [i.path for i in listing.items] == ["a/v.mp4"]
    assert ignored(listing) == {"a/self": "not_video", "loop": "root_file"}


def test_class_list_names_are_taken_without_surrounding_spaces(tmp_path):
    touch(tmp_path, "root/air drumming/v.mp4", "root/zumba/w.mp4")
    path = tmp_path / "classes.txt"
    path.write_text("zumba \n\tair drumming\n")
    assert read_class_list(path) == ["zumba", "air drumming"]
    listing = list_videos(tmp_path / "root", path)
    assert [(i.path, i.label) for i in listing.items] == [
        ("zumba/w.mp4", 0),
        ("air drumming/v.mp4", 1),
    ]


def test_reports_give_as_many_examples_as_asked_and_say_when_there_are_more(tmp_path):
    entries = tuple(Ignored(f"a/{k}.txt", "not_video") for k in range(5))
    summary = ignored_summary(entries, examples=2)
    assert summary == {"not_video": {"count": 5, "paths": ["a/0.txt", "a/1.txt"]}}
    three = ignored_summary(entries[:3])
    assert listing_report(["a"], [], three) == [
        "ignored 3 files without a video extension: a/0.txt, a/1.txt, a/2.txt"
    ]
    # Ten unknown class folders are all named; an eleventh is left to the '...'.
    touch(tmp_path, *(f"root/c{k:02}/v.mp4" for k in range(10)))
    path = tmp_path / "classes.txt"
    path.write_text("other\n")
    named = ", ".join(f"'c{k:02}'" for k in range(10))
    with pytest.raises(DatasetError, match=rf"\[{named}\]; fix the class list"):
        list_videos(tmp_path / "root", path)
    touch(tmp_path, "root/c10/v.mp4")
    with pytest.raises(DatasetError, match=rf"\[{named}\] \.\.\.; fix the class list"):
        list_videos(tmp_path / "root", path)


def test_an_empty_class_list_path_is_no_class_list(tmp_path):
    # The run config's default (--config.data.class_list=''): the folders are the classes.
    touch(tmp_path, "b/v.mp4", "a/w.mp4")
    assert list_videos(tmp_path, "").classes == list_videos(tmp_path).classes == ("a", "b")
