"""Arranging a flat Kinetics copy (annotation CSV + video files) into class folders."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from stam_jax.data import arrange as arrange_module
from stam_jax.data.arrange import ArrangeError, ArrangeFailed, arrange, main
from stam_jax.data.folder import ARRANGE_RECORD, VideoItem, list_videos
from stam_jax.paths import claimed

HEADER = "label,youtube_id,time_start,time_end,split\n"
ROWS = [
    "air drumming,-abc,10,20,val",  # an id starting with '-'
    '"passing American football (in game)",xyz,0,10,val',
    "air drumming,gone,3,13,val",  # no video
    "zumba,dup,1,11,val",  # two files fit: .mp4 and .mkv
    "abseiling,idonly,0,10,val",  # the file is named by the id alone
    "zumba,q,5,15,val",
    "zumba,q,5,15,val",  # repeats the row above
    "yoga,absent,0,10,val",  # a class without any video
    "zumba,two,0,10,val",
    "yoga,two,0,10,val",  # the same video as the row above, another label
]
FILES = [
    "-abc_000010_000020.mp4",
    "part2/xyz_000000_000010.mp4",  # in a sub-folder
    "dup_000001_000011.mp4",
    "dup_000001_000011.mkv",
    "idonly.MP4",
    "q_000005_000015.mp4",
    "two_000000_000010.avi",
    "extra_000000_000010.mp4",  # named by no row
    ".hidden_000000_000010.mp4",  # hidden: not a video
    "notes.txt",  # not a video
]


def kinetics_copy(tmp_path: Path, rows: list[str] = ROWS) -> tuple[Path, Path]:
    """(annotation CSV, video folder): small distinct files, named as Kinetics copies name them."""
    videos = tmp_path / "k400" / "val"
    for i, name in enumerate(FILES):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        (videos / name).write_bytes(f"video {i}".encode())
    csv = tmp_path / "k400" / "val.csv"
    csv.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return csv, videos


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: a link's target, a file's bytes, or 'dir'."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = path.read_bytes().decode()
    return out


def test_a_flat_copy_becomes_class_folders_in_label_order(tmp_path):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    record = arrange(csv, videos, out)

    folder = list_videos(out)  # what run_eval, run_train and prepare read
    classes = ("abseiling", "air drumming", "passing American football (in game)", "yoga", "zumba")
    assert folder.classes == classes
    assert folder.items == (
        VideoItem("abseiling/idonly.MP4", 0),
        VideoItem("air drumming/-abc_000010_000020.mp4", 1),
        VideoItem("passing American football (in game)/xyz_000000_000010.mp4", 2),
        VideoItem("zumba/q_000005_000015.mp4", 4),
    )
    assert folder.empty_classes == ("yoga",)
    assert folder.ignored == ()  # the record is part of the layout
    for item in folder.items:  # each a link to its video, which is unchanged
        link = out / item.path
        assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
        source = next(videos.rglob(link.name))
        assert link.resolve() == source.resolve()
        assert source.read_bytes().decode().startswith("video ")

    assert json.loads((out / ARRANGE_RECORD).read_text()) == record
    assert record["rows"] == 10 and record["arranged"] == 4 and record["mode"] == "symlink"
    assert record["classes"] == list(classes)
    assert [r["youtube_id"] for r in record["missing"]] == ["gone", "absent"]
    assert [(r["line"], r["files"]) for r in record["ambiguous"]] == [
        (5, ["dup_000001_000011.mkv", "dup_000001_000011.mp4"])
    ]
    assert [(r["line"], r["same_as_line"]) for r in record["repeated"]] == [(8, 7)]
    [conflict] = record["conflicting"]
    assert conflict["video"] == "two_000000_000010.avi"
    assert [(r["line"], r["label"]) for r in conflict["rows"]] == [(10, "zumba"), (11, "yoga")]
    assert record["unlisted"] == ["extra_000000_000010.mp4"]
    assert record["linked"] == [
        ["air drumming/-abc_000010_000020.mp4", "-abc_000010_000020.mp4"],
        [
            "passing American football (in game)/xyz_000000_000010.mp4",
            "part2/xyz_000000_000010.mp4",
        ],
        ["abseiling/idonly.MP4", "idonly.MP4"],
        ["zumba/q_000005_000015.mp4", "q_000005_000015.mp4"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_class", "k400"]  # no leftovers


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_hard_links_and_copies(tmp_path, mode):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    before = tree(videos)
    arrange(csv, videos, out, mode=mode)
    video = out / "air drumming" / "-abc_000010_000020.mp4"
    source = videos / "-abc_000010_000020.mp4"
    assert not video.is_symlink() and video.read_bytes() == source.read_bytes()
    assert os.path.samefile(video, source) == (mode == "hardlink")
    assert [i.path for i in list_videos(out).items][1] == "air drumming/-abc_000010_000020.mp4"
    assert tree(videos) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("label,youtube_id,time_start\nyoga,a,0\n", "has no column time_end: its first line"),
        ("yoga,a,0,10,val\n", "has no column label, youtube_id, time_start, time_end: its"),
        (
            "youtube_id,time_start,time_end,split\na,0,10,test\n",
            "has no column label: its first line is ['youtube_id', 'time_start', 'time_end', "
            "'split'], and a Kinetics annotation CSV begins with a header naming label, "
            "youtube_id, time_start, time_end. A split without labels (a test split) has no "
            "classes to arrange: put its videos in one sub-folder and evaluate them with "
            "--config.eval.accuracy=False.",
        ),
        (HEADER, "has a header but no rows"),
        (HEADER + "yoga,a,0,10\n", "line 2 has 4 fields, the header 5"),
        (HEADER + "yoga,a,0,10,val\nyoga,b,x,10,val\n", "line 3: time_start is 'x'"),
        (HEADER + "yoga,a,0,10.5,val\n", "line 2: time_end is '10.5'; it must be a whole"),
        (HEADER + ",a,0,10,test\n", "the label '' is empty (a CSV without labels"),
        (HEADER + "a/b,a,0,10,val\n", "the label 'a/b' holds '/'"),
        (HEADER + ".yoga,a,0,10,val\n", "the label '.yoga' starts with '.'"),
        (HEADER + "__MACOSX,a,0,10,val\n", "the label '__MACOSX' is a system folder's name"),
        (HEADER + "yoga,,0,10,val\n", "line 2: youtube_id is ''"),
        (HEADER + "yoga,\xe9,0,10,val\n", None),  # accepted: a UTF-8 id
    ],
)
def test_bad_annotations_are_refused_naming_the_line(tmp_path, text, message):
    _, videos = kinetics_copy(tmp_path)
    csv = tmp_path / "bad.csv"
    csv.write_text(text, encoding="utf-8")
    out = tmp_path / "nested" / "by_class"
    if message is None:
        assert arrange(csv, videos, out)["missing"][0]["youtube_id"] == "\xe9"
        return
    with pytest.raises(ArrangeError, match=re.escape(message)):
        arrange(csv, videos, out)
    assert not (tmp_path / "nested").exists()


def test_files_that_are_not_an_annotation_csv_are_refused(tmp_path):
    _, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(HEADER.encode() + "caf\xe9,a,0,10,val\n".encode("latin-1"))
    cases = [
        (tmp_path / "none.csv", "no such file"),
        (videos, "is a folder; give the annotation CSV file"),
        (latin1, r"is not UTF-8 text \(byte 0xe9 at offset 46\)"),
    ]
    for csv, message in cases:
        with pytest.raises(ArrangeError, match=message):
            arrange(csv, videos, out)
    with pytest.raises(ArrangeError, match="--mode 'move' is not one of symlink, hardlink, copy"):
        arrange(tmp_path / "k400" / "val.csv", videos, out, mode="move")
    assert not out.exists()


def test_out_must_be_new_empty_or_an_earlier_arrangement_replaced_with_force(tmp_path):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    for where in (videos / "by_class", videos, tmp_path):  # inside, equal to, around --videos
        with pytest.raises(ArrangeError, match="give an --out outside the video folder"):
            arrange(csv, videos, where)
    assert tree(videos).keys() == {f for f in FILES} | {"part2"}

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ArrangeError, match=r"cannot write --out .*a_file is a file, not a folder"):
        arrange(csv, videos, tmp_path / "a_file" / "by_class")
    (tmp_path / "a_file").unlink()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArrangeError, match=r"is not empty and is not an arrangement .*notes.txt"):
        arrange(csv, videos, out)
    (out / "notes.txt").unlink()
    arrange(csv, videos, out)  # an empty folder is fine
    first = tree(out)
    with pytest.raises(ArrangeError, match=r"holds an earlier arrangement .* add --force"):
        arrange(csv, videos, out)
    assert tree(out) == first

    # Rows removed from the CSV: --force replaces the arrangement with the new one.
    csv.write_text(HEADER + "\n".join(ROWS[:2]) + "\n", encoding="utf-8")
    record = arrange(csv, videos, out, force=True)
    assert record["arranged"] == 2 and record["classes"] == [
        "air drumming",
        "passing American football (in game)",
    ]
    assert [i.path for i in list_videos(out).items] == [
        "air drumming/-abc_000010_000020.mp4",
        "passing American football (in game)/xyz_000000_000010.mp4",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_class", "k400"]

    # What arranging did not make is never deleted.
    second = tree(out)
    for foreign in ("air drumming/.notes", "air drumming/results", "other", "yoga"):
        (out / foreign).mkdir()
        with pytest.raises(ArrangeError, match=f"the only copy of a video: .*{foreign}"):
            arrange(csv, videos, out, force=True)
        (out / foreign).rmdir()
        assert tree(out) == second
    mine = out / "air drumming" / "mine.mp4"  # a video of your own, in a class folder
    mine.write_bytes(b"mine")
    with pytest.raises(ArrangeError, match=r"the only copy of a video: .*air drumming/mine\.mp4"):
        arrange(csv, videos, out, force=True)
    assert mine.read_bytes() == b"mine"


def test_a_killed_swap_is_finished_by_the_next_run(tmp_path):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    arrange(csv, videos, out)
    arranged = tree(out)
    old = tmp_path / ".by_class.stam-jax-old"
    # Killed between its two renames: the arrangement being replaced is put back.
    out.rename(old)
    with pytest.raises(ArrangeError, match="holds an earlier arrangement"):
        arrange(csv, videos, out)
    assert tree(out) == arranged and not old.exists()
    # Killed after them: the replaced arrangement is deleted.
    arrange(csv, videos, tmp_path / "copy")
    (tmp_path / "copy").rename(old)
    arrange(csv, videos, out, force=True)
    assert tree(out) == arranged and not old.exists()


def test_a_second_run_while_one_builds_is_refused(tmp_path):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    stage = tmp_path / ".by_class.stam-jax-new"
    stage.mkdir()
    with claimed(stage, 0, f"--out {out}"):
        with pytest.raises(ArrangeError, match=f"--out {out} is in use by another run"):
            arrange(csv, videos, out)
        assert stage.is_dir()  # the other run's folder is left to it
    assert not out.exists()
    arrange(csv, videos, out)  # a folder a killed run left is cleared and used
    assert not stage.exists() and list_videos(out).items


def test_the_command_line(tmp_path, capsys, monkeypatch):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    argv = ["--annotations", str(csv), "--videos", str(videos), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"arranged 4 of 10 rows into 5 class folders in {out} (symlink)",
        "rows without a video under --videos: 2 (gone, absent)",
        "rows whose name fits several files, left out: 1 "
        "(dup_000001_000011.mkv = dup_000001_000011.mp4)",
        "videos that rows of different labels name, left out: 1 (two_000000_000010.avi)",
        "rows repeating an earlier row's video and label: 1 (line 8)",
        "videos under --videos that no row names: 1 (extra_000000_000010.mp4)",
        f"all listed in {out / ARRANGE_RECORD}",
    ]
    arranged = tree(out)

    assert main(argv) == 2  # refused: one error line
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {out} holds an earlier arrangement (of {csv.resolve()}); add --force to "
        "replace it, or give another --out."
    ]
    with pytest.raises(SystemExit) as exit_:  # argparse's refusal (stam_jax.cli)
        main([*argv, "--mode", "move"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --mode: invalid choice: 'move'")

    # A failed write and a Ctrl-C while replacing leave the earlier arrangement as it was.
    calls, errors, real_symlink = [], [], os.symlink

    def symlink(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise errors[-1]
        real_symlink(source, target)

    monkeypatch.setattr(arrange_module.os, "symlink", symlink)
    for error, status, line in [
        (PermissionError(1, "Operation not permitted"), 1, "error: cannot symlink "),
        (KeyboardInterrupt(), 130, f"interrupted: --out {out} is as it was."),
    ]:
        calls.clear()
        errors.append(error)
        assert main([*argv, "--force"]) == status
        assert len(calls) == 2  # one video linked before it
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(line)
        if status == 1:
            assert "Operation not permitted; try --mode hardlink or copy." in err[0]
            assert err[0].endswith("--out is as it was.")
        assert tree(out) == arranged
        assert sorted(p.name for p in tmp_path.iterdir()) == ["by_class", "k400"]


def test_an_interrupted_first_run_leaves_no_folder(tmp_path, monkeypatch):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "new" / "deeper" / "by_class"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(arrange_module.os, "symlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        arrange(csv, videos, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k400"]


def test_failures_name_the_fix(tmp_path, monkeypatch):
    csv, videos = kinetics_copy(tmp_path)

    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(arrange_module.os, "link", cross_device)
    with pytest.raises(
        ArrangeFailed, match="Invalid cross-device link; try --mode symlink or copy"
    ):
        arrange(csv, videos, tmp_path / "by_class", mode="hardlink")
    assert not (tmp_path / "by_class").exists()


def test_hard_links_are_made_to_the_data_of_videos_that_are_links(tmp_path):
    # link() does not follow a link: a video that was a relative symbolic link was linked
    # itself, broken in its class folder (exit 0, every video failing later).
    csv, videos = kinetics_copy(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    source = videos / "-abc_000010_000020.mp4"
    source.rename(raw / source.name)
    source.symlink_to(Path("..", "..", "raw", source.name))
    out = tmp_path / "by_class"
    arrange(csv, videos, out, mode="hardlink")
    video = out / "air drumming" / source.name
    assert not video.is_symlink() and os.path.samefile(video, raw / source.name)
    assert video.read_bytes() == b"video 0"


@pytest.mark.parametrize("mode", ["symlink", "hardlink", "copy"])
def test_force_never_deletes_the_only_copy_of_a_video(tmp_path, mode):
    # A video of the arrangement replaced by a file of one's own (a repaired download), or
    # whose source is gone (only the hard link or the copy holds it): --force deleted them.
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    arrange(csv, videos, out, mode=mode)
    repaired = out / "zumba" / "q_000005_000015.mp4"
    repaired.unlink()
    repaired.write_bytes(b"my repaired video")
    with pytest.raises(
        ArrangeError,
        match=r"holds what arranging did not make, or the only copy of a video: \['zumba/q_00000"
        r"5_000015\.mp4 \(its source is gone or is another file\)'\]; move those elsewhere",
    ):
        arrange(csv, videos, out, mode=mode, force=True)
    assert repaired.read_bytes() == b"my repaired video"
    repaired.unlink()
    arrange(csv, videos, out, mode=mode, force=True)  # made again from its source
    gone = videos / "idonly.MP4"
    gone.unlink()
    if mode == "symlink":  # a link holds no data: replaced, its row now without a video
        assert arrange(csv, videos, out, mode=mode, force=True)["arranged"] == 3
        return
    with pytest.raises(ArrangeError, match=r"\['abseiling/idonly\.MP4 \(its source is gone"):
        arrange(csv, videos, out, mode=mode, force=True)
    assert (out / "abseiling" / "idonly.MP4").read_bytes() == b"video 4"


def test_out_given_as_dot_a_mount_point_and_a_ctrl_c_after_the_swap(tmp_path, capsys, monkeypatch):
    csv, videos = kinetics_copy(tmp_path)
    out = tmp_path / "by_class"
    out.mkdir()
    monkeypatch.chdir(out)
    argv = ["--annotations", str(csv), "--videos", str(videos), "--out"]
    # '.' has no name to build a sibling by: a ValueError traceback.
    assert main([*argv, "."]) == 0
    assert "air drumming/-abc_000010_000020.mp4" in [i.path for i in list_videos(out).items]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    # An empty mount point was accepted, everything built beside it, then the rename failed.
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(
        arrange_module.os.path, "ismount", lambda p: os.fspath(p) == str(tmp_path / "mnt")
    )
    assert main([*argv, str(tmp_path / "mnt")]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path / 'mnt'} is a mount point, which the arrangement cannot be "
        f"renamed onto; give a folder inside it, e.g. --out {tmp_path / 'mnt' / 'by_class'}.\n"
    )
    assert not list((tmp_path / "mnt").iterdir())
    # A Ctrl-C while the replaced arrangement is deleted: the new one is in place, not "as it
    # was".
    # Stopped part-way through the deletion (a class folder deleted, one not), which keeps
    # the record to the last: the next run still knows the rest for an arrangement, and
    # deletes it (it refused, "Directory not empty", where the record went first).
    real_rmtree, deleted = shutil.rmtree, []

    def interrupted(path, *args, **kwargs):
        if Path(path).parent.name.endswith(".stam-jax-old"):
            deleted.append(path)
            if len(deleted) == 2:
                raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(arrange_module.shutil, "rmtree", interrupted)
    csv.write_text(HEADER + "\n".join(ROWS[:2]) + "\n", encoding="utf-8")
    assert main([*argv, str(out), "--force"]) == 130
    old = tmp_path / ".by_class.stam-jax-old"
    assert capsys.readouterr().err == (
        f"interrupted: --out {out} holds the new arrangement; the one it replaced is partly "
        f"deleted, in {old} (the next run of arrange deletes the rest).\n"
    )
    assert len(list_videos(out).items) == 2 and old.exists()
    assert (old / ARRANGE_RECORD).exists() and len(list(old.iterdir())) == 5  # of 6
    monkeypatch.setattr(arrange_module.shutil, "rmtree", real_rmtree)
    assert main([*argv, str(out), "--force"]) == 0
    assert not old.exists()
