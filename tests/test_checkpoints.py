"""stam-jax checkpoint directories: what an overwrite may replace, interrupted writes, damage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_CONFIGS, random_params

from stam_jax import checkpoints, create_model
from stam_jax.checkpoints import CheckpointError
from stam_jax.train_step import TrainState
from stam_jax.variants import model_config

TINY = TINY_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[object, dict, dict, Path]:
    """(model, params A, params B, a checkpoint of A to copy)."""
    model = create_model("stam_tiny")
    first, second = random_params(TINY, seed=0), random_params(TINY, seed=1)
    path = checkpoints.save(tmp_path_factory.mktemp("ckpt") / "a", model, first)
    return model, first, second, path


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f"{path.name}."))


def test_overwrite_replaces_only_checkpoints_or_empty_dirs(tiny, tmp_path):
    model, first, second, saved = tiny
    # A folder of the user's files, a file and a link are refused, and nothing is deleted.
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "stam_16.pth").write_bytes(b"weights")
    (folder / "notes.txt").write_text("keep")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    link = tmp_path / "link"
    shutil.copytree(saved, tmp_path / "target")
    link.symlink_to(tmp_path / "target")
    refusals = {
        folder: r"downloads is not a stam-jax checkpoint \(it holds notes\.txt, stam_16\.pth\)"
        r".*so nothing was deleted",
        afile: r"afile is a file, not a checkpoint directory.*nothing was deleted",
        link: r"link is a symbolic link \(to .*target\)",
    }
    for path, message in refusals.items():
        with pytest.raises(CheckpointError, match=message):
            checkpoints.save(path, model, second, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "stam_16.pth"]
    assert afile.read_text() == "keep"
    # A project that happens to hold config/ and params/, and a checkpoint holding the user's
    # own files, are refused too: replacing either would delete those files.
    project = tmp_path / "project"
    for name in ("config", "params", "src"):
        (project / name).mkdir(parents=True)
    (project / "config" / "app.yaml").write_text("keep")
    with pytest.raises(
        CheckpointError,
        match=r"holds what a stam-jax checkpoint does not \("
        r"src, config/app\.yaml, config/ without a stam-jax config\)",
    ):
        checkpoints.save(project, model, second, overwrite=True)
    shutil.copytree(saved, tmp_path / "mine")
    (tmp_path / "mine" / "stam_16.pth").write_bytes(b"weights")
    (tmp_path / "mine" / "params" / "NOTES.txt").write_text("keep")
    with pytest.raises(CheckpointError, match=r"\(stam_16\.pth, params/NOTES\.txt\)"):
        checkpoints.save(tmp_path / "mine", model, second, overwrite=True)
    assert (project / "config" / "app.yaml").exists() and (tmp_path / "mine/stam_16.pth").exists()
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "mine")[1], first)
    # Names like orbax's own ('_' first, 'ocdbt.process_' first) are the user's all the same
    # unless they are exactly orbax's, as the file or folder orbax makes.
    shutil.copytree(saved, tmp_path / "look_alike")
    own = tmp_path / "look_alike"
    (own / "_notes.txt").write_text("keep")
    (own / "_backup").mkdir()
    (own / "_backup" / "stam_16.pth").write_bytes(b"weights")
    (own / "params" / "_sharding.bak").write_text("keep")
    (own / "params" / "ocdbt.process_old.tar").write_text("keep")
    (own / "config" / "_METADATA").mkdir()  # orbax's name, but a folder: not orbax's
    with pytest.raises(
        CheckpointError,
        match=r"\(_backup, _notes\.txt, config/_METADATA, params/_sharding\.bak, "
        r"params/ocdbt\.process_old\.tar\)",
    ):
        checkpoints.save(own, model, second, overwrite=True)
    assert (own / "_notes.txt").read_text() == "keep"
    assert (own / "_backup" / "stam_16.pth").read_bytes() == b"weights"
    chex.assert_trees_all_equal(checkpoints.load(own)[1], first)
    chex.assert_trees_all_equal(checkpoints.load(link)[1], first)

    # An empty directory and a checkpoint directory are replaced.
    (tmp_path / "empty").mkdir()
    checkpoints.save(tmp_path / "empty", model, second, overwrite=True)
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "empty")[1], second)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    checkpoints.save(ckpt, model, second, overwrite=True)
    chex.assert_trees_all_equal(checkpoints.load(ckpt)[1], second)
    assert leftovers(ckpt) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt, PermissionError], ids=["ctrl_c", "oserror"])
def test_interrupted_overwrite_keeps_the_old_checkpoint(failure, tiny, tmp_path, monkeypatch):
    model, first, second, saved = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)

    def fail_midway(self, directory):  # the new checkpoint is written, not yet committed
        raise failure(13, "Permission denied", str(directory))

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", fail_midway)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else CheckpointError
    with pytest.raises(expected) as info:
        checkpoints.save(ckpt, model, second, overwrite=True)
    if expected is CheckpointError:
        assert f"cannot write {ckpt}: Permission denied" in str(info.value)
        assert "previous checkpoint there is unchanged" in str(info.value)
    chex.assert_trees_all_equal(checkpoints.load(ckpt)[1], first)
    assert leftovers(ckpt) == []


def test_leftovers_of_a_killed_overwrite(tiny, tmp_path):
    model, first, second, saved = tiny
    ckpt = tmp_path / "ckpt"
    # Killed while writing the new checkpoint: a staging copy is left; the next save removes it.
    shutil.copytree(saved, ckpt)
    (tmp_path / "ckpt.stam-jax-new.orbax-checkpoint-tmp-123").mkdir()
    shutil.copytree(saved, tmp_path / "ckpt.stam-jax-new")
    checkpoints.save(ckpt, model, second, overwrite=True)
    chex.assert_trees_all_equal(checkpoints.load(ckpt)[1], second)
    assert leftovers(ckpt) == []

    # Killed between its two renames: both complete checkpoints remain, and are named.
    os.rename(ckpt, tmp_path / "ckpt.stam-jax-old")
    shutil.copytree(saved, tmp_path / "ckpt.stam-jax-new")
    with pytest.raises(
        CheckpointError,
        match=r"ckpt does not exist, but an overwrite of it was interrupted and left .*"
        r"ckpt\.stam-jax-new \(the new checkpoint\) and .*ckpt\.stam-jax-old \(the previous "
        r"checkpoint\): rename the one you want to .*ckpt\.",
    ):
        checkpoints.read_config(ckpt)
    checkpoints.save(ckpt, model, first)
    assert leftovers(ckpt) == []


def damage_manifest(path: Path) -> None:
    (path / "params" / "manifest.ocdbt").unlink()


def damage_chunks(path: Path) -> None:
    for chunk in (path / "params").rglob("d/*"):
        os.truncate(chunk, chunk.stat().st_size // 2)


def damage_config(path: Path) -> None:
    (path / "config" / "metadata").unlink()


def damage_json(path: Path) -> None:
    (path / "config" / "metadata").write_text('{"format": "stam_jax", ')


@pytest.mark.parametrize("damage", [damage_manifest, damage_chunks, damage_config, damage_json])
def test_damaged_checkpoint_is_one_clear_error(damage, tiny, tmp_path):
    _, _, _, saved = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    damage(ckpt)
    with pytest.raises(CheckpointError, match=f"{ckpt} is damaged or incompletely copied \\("):
        checkpoints.load(ckpt)


def test_training_workdir_names_its_final_checkpoints(tiny, tmp_path):
    _, _, _, saved = tiny
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "100").mkdir(parents=True)
    with pytest.raises(
        CheckpointError,
        match=r"run looks like a run_train\.py workdir, not a stam-jax checkpoint: pass "
        r".*run/final once training has finished",
    ):
        checkpoints.read_config(workdir)
    shutil.copytree(saved, workdir / "final")
    shutil.copytree(saved, workdir / "final_ema")
    with pytest.raises(
        CheckpointError, match=r"workdir.*: pass .*run/final or .*run/final_ema \(the EMA params\)"
    ):
        checkpoints.load(workdir)


def test_load_documents_and_takes_every_attention_impl(tiny):
    # The docstring lists exactly the values the model accepts, and each loads.
    from stam_jax.model import ATTENTION_IMPLS

    _, _, _, saved = tiny
    documented = next(
        line for line in checkpoints.load.__doc__.splitlines() if "attention_impl:" in line
    )
    assert documented.split(":", 1)[1].split("(")[0].replace(" or ", ", ").strip(" .") == (
        ", ".join(repr(impl) for impl in ATTENTION_IMPLS)
    )
    for impl in ("auto", "xla", "heads_first"):  # 'cudnn' needs an NVIDIA GPU
        assert checkpoints.load(saved, attention_impl=impl)[0].attention_impl == impl


def test_params_beyond_float16_range_are_refused_in_float16(tiny, tmp_path):
    # A cast to float16 params made them Inf without a word (and every logit NaN).
    model, first, _, saved = tiny
    params = jax.tree.map(np.array, first)
    params["head"]["bias"][3] = 1e5
    params["norm"]["bias"][0] = np.inf  # Inf already: not one the cast makes
    path = checkpoints.save(tmp_path / "big", model, params)
    beyond = r"big holds values beyond float16's range \(\+-65504\) in 1 param\(s\) \(head/bias\)"
    with pytest.raises(CheckpointError, match=beyond + r".*param_dtype='bfloat16'"):
        checkpoints.load(path, param_dtype="float16")
    assert checkpoints.load(path, param_dtype="bfloat16")[1]["head"]["bias"][3] == 1e5
    assert checkpoints.load(saved, param_dtype="float16")[1]["head"]["bias"].dtype == np.float16


def test_a_config_of_another_format_or_a_newer_version_is_refused(tiny, tmp_path):
    model, _, second, saved = tiny
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    metadata = path / "config" / "metadata"
    config = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**config, "version": checkpoints.VERSION + 1}))
    newer = rf"written by a newer stam-jax \(version {checkpoints.VERSION + 1} > 1\); upgrade"
    with pytest.raises(CheckpointError, match=newer):
        checkpoints.read_config(path)
    # Another tool's files under the same names: not read, and not replaced by --force.
    metadata.write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(CheckpointError, match=r"ckpt holds format 'other', not 'stam_jax'\."):
        checkpoints.load(path)
    with pytest.raises(CheckpointError, match=r"\(config/ without a stam-jax config\)"):
        checkpoints.save(path, model, second, overwrite=True)
    assert json.loads(metadata.read_text())["format"] == "other"


def test_reports_of_abandoned_reads_are_silenced_and_nothing_else(monkeypatch):
    # A failed read of a damaged checkpoint leaves orbax reads that each report 'Event loop is
    # closed' when collected (60 lines under `python -m convert.to_torch`); only those are
    # dropped, any other unraisable report reaches the hook installed before.
    import sys
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._quiet_abandoned_reads()
    closed = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]


def test_a_read_across_an_overwrite_is_made_again_from_the_new_checkpoint(
    tiny, tmp_path, monkeypatch
):
    model, first, second, saved = tiny
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    read_params = checkpoints._read_params
    calls = []

    def swapped_mid_read(directory, model_, fix):
        # The first read meets `convert --force` swapping the new checkpoint in, and fails on
        # a file that moved; the read is made again, whole, from the new checkpoint.
        calls.append(directory)
        if len(calls) == 1:
            checkpoints.save(path, model, second, overwrite=True)
            raise checkpoints._damaged(directory, FileNotFoundError("params/d/0.0"))
        return read_params(directory, model_, fix)

    monkeypatch.setattr(checkpoints, "_read_params", swapped_mid_read)
    chex.assert_trees_all_equal(checkpoints.load(path)[1], second)
    assert len(calls) == 2
    # A read that succeeds across a swap may hold parts of both: it is made again too.
    calls.clear()

    def swapped_after_read(directory, model_, fix):
        calls.append(directory)
        params = read_params(directory, model_, fix)
        if len(calls) == 1:
            checkpoints.save(path, model, first, overwrite=True)
        return params

    monkeypatch.setattr(checkpoints, "_read_params", swapped_after_read)
    chex.assert_trees_all_equal(checkpoints.read_params(path, model), first)
    assert len(calls) == 2
    # Damage with no overwrite under way is reported at once, not retried.
    calls.clear()

    def damaged(directory, model_, fix):
        calls.append(directory)
        raise checkpoints._damaged(directory, ValueError("bad chunk"))

    monkeypatch.setattr(checkpoints, "_read_params", damaged)
    with pytest.raises(CheckpointError, match="is damaged or incompletely copied"):
        checkpoints.read_params(path, model)
    assert len(calls) == 1
    # An overwrite at every try: the error says so rather than calling the checkpoint damaged.
    monkeypatch.setattr(checkpoints.time, "sleep", lambda seconds: None)

    def always_swapped(directory, model_, fix):
        os.rename(path, tmp_path / "moved")
        os.rename(tmp_path / "moved", tmp_path / "moved2")
        shutil.copytree(tmp_path / "moved2", path)
        shutil.rmtree(tmp_path / "moved2")
        raise checkpoints._damaged(directory, FileNotFoundError("params/d/0.0"))

    monkeypatch.setattr(checkpoints, "_read_params", always_swapped)
    with pytest.raises(CheckpointError, match="was replaced while it was read, 3 times in a row"):
        checkpoints.read_params(path, model)


def test_params_read_after_the_config_are_refused_from_a_checkpoint_replaced_between(
    tiny, tmp_path
):
    # run_eval, the teacher of run_train and the converters read the config first and build
    # the model from it; an overwrite before the params are read must not go unnoticed.
    model, first, second, saved = tiny
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    stored = checkpoints.read_config(path)
    # The same config: the new params are what the model was built for, and are read.
    checkpoints.save(path, model, second, overwrite=True)
    chex.assert_trees_all_equal(checkpoints.read_params(path, model, config=stored), second)
    # Another model: refused, naming what changed, instead of a param-shape listing.
    other = create_model("stam_tiny", num_classes=7)
    checkpoints.save(path, other, random_params(model_config(other), seed=2), overwrite=True)
    with pytest.raises(
        CheckpointError,
        match=r"ckpt was replaced after its config was read, by an overwrite such as python -m "
        r"convert --force \(model num_classes 10 -> 7\); nothing was read from the new one",
    ):
        checkpoints.read_params(path, model, config=stored)
    # The same model with other metadata: refused too (the caller reports the old metadata).
    checkpoints.save(path, model, first, overwrite=True, metadata={"source": "elsewhere"})
    with pytest.raises(CheckpointError, match=r"\(the same model, other metadata\)"):
        checkpoints.read_params(path, model, config=stored)
    # Without `config`, the params are checked against the model alone.
    checkpoints.save(path, other, random_params(model_config(other), seed=2), overwrite=True)
    with pytest.raises(CheckpointError, match="params do not fit the model") as error:
        checkpoints.read_params(path, model)
    assert str(error.value).endswith(
        "To read them, build the model from the checkpoint's config, stam_jax.variants."
        f"model_from_config(read_config({str(path.absolute())!r})['model']), or read both with "
        "stam_jax.checkpoints.load."
    )


def test_a_ctrl_c_during_a_save_comes_after_the_write_and_leaves_nothing(
    tiny, tmp_path, monkeypatch
):
    model, first, second, saved = tiny
    make_checkpointer = checkpoints._checkpointer
    interrupted_saves = []

    class Interrupted:  # orbax's checkpointer, with a Ctrl-C in the middle of its write
        def __enter__(self):
            self.inner = make_checkpointer().__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def save(self, path, args):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python would act on the signal here
            self.inner.save(path, args)
            interrupted_saves.append(path)

    monkeypatch.setattr(checkpoints, "_checkpointer", Interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        # A new checkpoint: written whole, then removed; the interrupt reaches the caller.
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save(tmp_path / "new", model, first)
        # An overwrite: the old checkpoint stays, the staged new one is removed.
        shutil.copytree(saved, tmp_path / "old")
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save(tmp_path / "old", model, second, overwrite=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(interrupted_saves) == 2  # each write ran to its end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.undo()
    chex.assert_trees_all_equal(checkpoints.load(tmp_path / "old")[1], first)


def test_metadata_or_a_model_that_is_not_json_is_refused_before_any_write(tiny, tmp_path):
    # A numpy float used to fail inside orbax's writer thread: pages of tracebacks, a
    # *.orbax-checkpoint-tmp left behind, and a retry that failed on it.
    import numpy as np

    model, first, _, _ = tiny
    out = tmp_path / "m"
    bad = {
        "top1": (np.float32(0.8), r"metadata\['top1'\] = np\.float32\(0\.8\) cannot be stored"),
        "loss": (float("nan"), r"metadata\['loss'\] = nan cannot be stored as JSON \(Out of range"),
        3: ("x", r"metadata\[3\] = 'x' cannot be stored as JSON \(keys must be str, not int\)"),
        # json.dumps would have saved these keys as "1" and "null", read back as other keys
        "per_class": (
            [{1: 0.5}],
            r"metadata\['per_class'\] = \[\{1: 0\.5\}\] cannot be stored as JSON \(key 1 inside "
            r"it: keys must be str, not int\)",
        ),
        "by": ({"a": {None: 1}}, r"\(key None inside it: keys must be str, not NoneType\)"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(CheckpointError, match=message + r".*Nothing was written\."):
            checkpoints.save(out, model, first, metadata={key: value})
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match=r"the model's num_classes=np\.int64\(10\) \(int64\)"):
        checkpoints.save(out, model.clone(num_classes=np.int64(10)), first)
    assert list(tmp_path.iterdir()) == []
    checkpoints.save(out, model, first, metadata={"top1": 0.8, "steps": [1, 2]})
    assert checkpoints.read_config(out)["metadata"] == {"top1": 0.8, "steps": [1, 2]}


def test_variables_instead_of_params_are_refused_with_the_fix(tiny, tmp_path):
    # model.init's whole output: every param was listed twice, as missing and as unexpected.
    model, first, _, _ = tiny
    with pytest.raises(CheckpointError, match=r"whole variables .*pass the params tree, var"):
        checkpoints.save(tmp_path / "v", model, {"params": first})
    # A loop's own train state, or the leaves in a list: every param was listed as missing and
    # every leaf of the state as unexpected (22,600 characters for the tiny model).
    state = TrainState(np.int32(0), first, {"mu": first}, first)
    for wrong, fix in (
        (state, r"a TrainState, not a params tree; pass its params, state\.params \(or its EMA"),
        (list(first.values()), r"a list, not a params tree; pass the nested dict of arrays"),
    ):
        with pytest.raises(CheckpointError, match=rf"^params do not fit the model: got {fix}"):
            checkpoints.save(tmp_path / "v", model, wrong)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, first, _, _ = tiny
    out = tmp_path / "c"

    class Failing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, path, args):
            (Path(path) / "params").mkdir(parents=True)
            Path(f"{path}.orbax-checkpoint-tmp-17").mkdir()
            raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "_checkpointer", Failing)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save(out, model, first)
    assert list(tmp_path.iterdir()) == []


def test_export_reads_a_run_named_by_digits_and_keeps_out_of_its_saved_steps(tmp_path, capsys):
    # python -m stam_jax.export: RUN_DIR/checkpoints/N is step N of RUN_DIR; a run folder
    # named by digits elsewhere is a run.
    from stam_jax.export import main as export_main

    run = tmp_path / "runs" / "42"
    run.mkdir(parents=True)
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert capsys.readouterr() == (
        "",
        f"error: {run} has no run_config.json, so the run's architecture is unknown: pass the "
        "folder run_train.py wrote (--workdir), not a run without one.\n",
    )
    # The saved steps' folder itself is no output either, and is named as that folder.
    saved = run / "checkpoints"
    assert export_main([str(run), str(saved)]) == 2
    assert capsys.readouterr().err == (
        f"error: {saved} is the folder where the run keeps its saved training steps: a "
        "checkpoint there would be taken for one (the run could no longer resume); write it "
        f"outside, e.g. {run / 'exported'}.\n"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["42", "runs"]
    # An empty path is refused as that, not taken for the current directory.
    for args, name in [([str(run), ""], "OUT_DIR"), ([" ", str(tmp_path / "o")], "RUN_DIR")]:
        with pytest.raises(SystemExit) as ended:
            export_main(args)
        assert ended.value.code == 2
        assert f"error: {name} is empty (" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["42", "runs"]


def test_export_of_a_run_without_a_complete_step_names_the_unfinished_ones(tmp_path, capsys):
    # Step folders without orbax's mark of a finished save: one is named as itself, more as N.
    from stam_jax.export import main as export_main

    run = tmp_path / "run"
    (run / "checkpoints" / "9").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"model": "stam_tiny"}))
    saved = run / "checkpoints"
    for unfinished in (f"{saved / '9'} is", f"{saved}/N for N in [4, 9] are"):
        assert export_main([str(run), str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == (
            f"error: {run} has no complete saved training step (no {saved}/N that orbax marked "
            f"finished; {unfinished} unfinished): export once the run has saved one (every "
            "train.save_every steps).\n"
        )
        (saved / "4").mkdir(exist_ok=True)
    assert not (tmp_path / "out").exists()
