"""Ctrl-C stops a command-line tool at any moment: one line, exit status 130, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import weakref
from pathlib import Path

import pytest
from conftest import TINY_CONFIGS, cli_args, free_port, random_params, run_processes, xla_flags
from test_eval import make_folder

from stam_jax import checkpoints, create_model
from stam_jax.interrupts import exit_interrupted
from stam_jax.partial import PARTIAL, kept_count

ROOT = Path(__file__).resolve().parents[1]


def test_a_ctrl_c_inside_a_garbage_collection_callback_still_stops_the_command():
    # JAX runs a callback at every garbage collection; a Ctrl-C that Python raises inside it
    # used to be printed as "Exception ignored" and lost, and the command went on to the end.
    code = textwrap.dedent(
        """
        import gc, os, signal, sys, time
        from stam_jax.interrupts import keep_interrupts

        if sys.argv[1] == "kept":
            keep_interrupts()
        sent = []

        def callback(phase, info):
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)  # raised here, inside the callback
                time.sleep(0.1)

        gc.callbacks.append(callback)
        try:
            gc.collect()
            time.sleep(2)
            print("went on")
        except KeyboardInterrupt:
            print("stopped")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {
        how: subprocess.run(
            [sys.executable, "-c", code, how], capture_output=True, text=True, env=env, timeout=60
        )
        for how in ("kept", "plain")
    }
    assert runs["kept"].stdout == "stopped\n" and runs["kept"].stderr == ""
    # Without the hook (what the check guards against): the interrupt is lost.
    assert runs["plain"].stdout == "went on\n" and "Exception ignored" in runs["plain"].stderr


class _Ended(Exception):
    """Raised by the stand-in for os._exit."""


def test_a_ctrl_c_during_compilation_ends_the_process_without_the_interpreter_shutdown(
    monkeypatch,
):
    # XLA goes on compiling in its own thread after a Ctrl-C; the interpreter's shutdown then
    # crashed under it (run_train.py and run_eval.py interrupted while compiling exited -11 with
    # "Fatal Python error: Segmentation fault", not 130). Such an interrupt skips that shutdown.
    import jax
    import jax._src.compiler as compiler
    import numpy as np

    from stam_jax.interrupts import exit_interrupted, interrupted_compilation

    def ended(status):
        raise _Ended(status)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "_exit", ended)
    monkeypatch.setattr(compiler, "backend_compile_and_load", ctrl_c)  # as XLA raises it
    with pytest.raises(KeyboardInterrupt) as compiling:
        jax.jit(lambda x: x * 3.25 + 0.5)(np.ones(3, np.float32))
    assert interrupted_compilation(compiling.value)
    with pytest.raises(_Ended) as end:
        exit_interrupted(compiling.value, 130)
    assert end.value.args == (130,)
    # Anywhere else, the interpreter shuts down as usual.
    with pytest.raises(KeyboardInterrupt) as elsewhere:
        raise KeyboardInterrupt
    assert not interrupted_compilation(elsewhere.value)
    with pytest.raises(SystemExit) as end:
        exit_interrupted(elsewhere.value, 130)
    assert end.value.code == 130


def test_exit_interrupted_frees_what_the_interrupted_frames_held():
    # A video's shared-memory block held by a frame the interrupt came up through was never
    # unlinked (the traceback keeps the frames to the end): Python's resource tracker warned of
    # a leaked shared_memory object as the command ended.
    class Block:
        pass

    held: list[weakref.ref] = []

    def reading():
        block = Block()
        held.append(weakref.ref(block))
        raise KeyboardInterrupt

    def evaluating():
        reading()

    try:
        evaluating()
    except KeyboardInterrupt as e:
        assert held[0]() is not None  # the traceback keeps it
        with pytest.raises(SystemExit) as end:
            exit_interrupted(e, 130)
        assert end.value.code == 130
        assert held[0]() is None  # freed while `e` and its traceback are still there


def start_in_own_group(*args: str) -> subprocess.Popen:
    """`python *args` in a process group of its own, so that a SIGINT to the group reaches it
    and its children as a terminal's Ctrl-C does."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupts")
    ckpt = checkpoints.save(
        root / "ckpt", create_model("stam_tiny"), random_params(TINY_CONFIGS["tiny"])
    )
    return ckpt, make_folder(root / "videos")


@pytest.mark.parametrize(
    "after, how",
    [
        (0.4, "ctrl-c"),  # importing JAX
        (2.0, "ctrl-c"),  # decoding and compiling
        # SIGTERM (`kill PID`, a scheduler ending the job) to the command alone: it is taken as
        # a Ctrl-C. It used to end the process at once, keeping no results and leaving its
        # decoding processes to end on their own.
        (2.0, "sigterm"),
    ],
)
def test_run_eval_stops_on_ctrl_c_at_any_moment(eval_inputs, tmp_path, after, how):
    # As a terminal does: SIGINT to the whole process group, decoding processes included.
    ckpt, videos = eval_inputs
    workdir = tmp_path / "out"
    process = start_in_own_group(
        "run_eval.py",
        "--config=configs/tiny.py",
        f"--config.checkpoint={ckpt}",
        f"--config.data.root={videos}",
        "--config.data.workers=2",
        f"--workdir={workdir}",
    )
    time.sleep(after)
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if process.returncode == 0:  # it had finished: the results are whole
        assert (workdir / "results.json").is_file() and after > 1
    else:
        assert process.returncode == 130, err
        lines = [line for line in err.splitlines() if line.startswith("interrupted")]
        assert not (workdir / "results.json").exists()
        kept = kept_count(workdir / PARTIAL)  # each finished batch's results are kept
        if kept:
            assert lines == [
                f"interrupted: the results of {kept} videos are kept in {workdir / PARTIAL}; run "
                "the same command again to evaluate the others (results.json comes at the end)."
            ], err
        else:
            want = "interrupted: no results were kept yet; the same command starts again."
            assert lines == [want], err


def test_run_train_stops_on_ctrl_c_during_a_save(eval_inputs, tmp_path):
    # Saving at every step, the Ctrl-C comes while an asynchronous save runs: it is let finish
    # (orbax's threads used to print pages of errors and leave a *.orbax-checkpoint-tmp).
    _, videos = eval_inputs
    workdir = tmp_path / "run"
    process = start_in_own_group(
        "run_train.py",
        "--config=configs/tiny.py",
        f"--config.train.root={videos}",
        "--config.batch_size=4",
        "--config.train.steps=100000",
        "--config.train.save_every=1",
        "--config.train.keep=2",
        "--config.data.workers=0",
        f"--workdir={workdir}",
    )
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "3").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        f"interrupted: the checkpoints in {workdir}/checkpoints are kept; run the same command "
        "again to resume from the last one."
    ]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert left and all(name.isdigit() for name in left), left


@pytest.mark.parametrize("command", ["convert", "convert.to_torch"])
def test_convert_stops_on_ctrl_c_while_importing_jax(official_pth, eval_inputs, tmp_path, command):
    # JAX takes about a second to import; a Ctrl-C then used to be lost ("Exception ignored",
    # exit 0 with the output written) or to print a traceback.
    if command == "convert":
        pth, _ = official_pth(TINY_CONFIGS["tiny"])
        args = [str(pth), str(tmp_path / "ckpt"), *cli_args(TINY_CONFIGS["tiny"])]
        message = "interrupted: nothing was written (a checkpoint already there is kept)."
    else:
        args = [str(eval_inputs[0]), str(tmp_path / "out.pth")]
        message = "interrupted: the .pth was not written."
    process = start_in_own_group("-m", command, *args)
    time.sleep(0.4)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (130, message + "\n")
    assert not any(tmp_path.glob("ckpt*")) and not (tmp_path / "out.pth").exists()


def _wrapped_interrupt() -> None:
    """A Ctrl-C as C code that does not look for it hands it on (numpy asking a JAX scalar
    type for its dtype while a model is traced: seen once in about 40 runs under load)."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise SystemError("<function f> returned a result with an exception set") from e


def test_a_ctrl_c_that_c_code_wrapped_in_a_system_error_is_raised_as_an_interrupt():
    from stam_jax.interrupts import interrupted_compilation, interrupts_unwrapped

    with pytest.raises(KeyboardInterrupt) as info, interrupts_unwrapped():
        _wrapped_interrupt()
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(info.value.__traceback__)]
    assert frames[-1] == "_wrapped_interrupt"  # the frames it came up through, to be freed
    assert not interrupted_compilation(info.value)
    with pytest.raises(SystemError, match="other"), interrupts_unwrapped():
        raise SystemError("other")
    with pytest.raises(SystemError) as info, interrupts_unwrapped():
        try:
            raise ValueError
        except ValueError as e:
            raise SystemError("returned a result with an exception set") from e
    assert isinstance(info.value.__cause__, ValueError)


_WRAPPED = """
import stam_jax.{module} as module


def interrupted(*args, **kwargs):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise SystemError("<function f> returned a result with an exception set") from e


module.{function} = interrupted
"""


@pytest.mark.parametrize(
    "command, module, function, message",
    [
        (
            "run_eval.py",
            "evaluate",
            "evaluate",
            "interrupted: no results were kept yet; the same command starts again.",
        ),
        (
            "run_train.py",
            "train",
            "train_and_evaluate",
            "interrupted: no checkpoint was saved yet (none in {workdir}/checkpoints); the same "
            "command starts the run again.",
        ),
    ],
)
def test_the_commands_end_a_wrapped_ctrl_c_as_interrupted(
    eval_inputs, tmp_path, command, module, function, message
):
    # It ended run_eval.py with the SystemError's traceback and status 1.
    ckpt, videos = eval_inputs
    (tmp_path / "site").mkdir()
    site = _WRAPPED.format(module=module, function=function)
    (tmp_path / "site" / "sitecustomize.py").write_text(site)
    args = ["--config=configs/tiny.py", f"--config.checkpoint={ckpt}"]
    args += [f"--config.data.root={videos}", f"--config.train.root={videos}"]
    result = subprocess.run(
        [sys.executable, command, *args, f"--workdir={tmp_path / 'out'}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    expected = message.format(workdir=tmp_path / "out") + "\n"
    assert (result.returncode, result.stderr) == (130, expected)


def interrupt_both(
    tmp_path: Path, script: str, *args: tuple[str, ...], sig: int = signal.SIGINT
) -> tuple[list[int], list[tuple[str, str]]]:
    """Runs `script PORT RANK *args[RANK]` as processes 0 and 1 of one jax.distributed run,
    sends each `sig` (SIGINT) once both print "ready", and returns their exit statuses and
    their (stdout, stderr)."""
    path = tmp_path / "both.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags(1)}
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(path), str(port), str(rank), *rank_args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, rank_args in enumerate(args)
    ]
    try:
        for process in processes:
            assert process.stdout.readline() == "ready\n", process.communicate()
        for process in processes:
            process.send_signal(sig)
        ended = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [process.returncode for process in processes], ended


_LATE = """
import sys, time

import jax

from stam_jax import sharding
from stam_jax.interrupts import keep_interrupts

port, rank, cleanup_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
keep_interrupts()
jax.distributed.initialize(f"localhost:{port}", 2, rank)
try:
    with sharding.stop_together(lambda e: 130 if isinstance(e, KeyboardInterrupt) else 1, 5):
        try:
            print("ready", flush=True)
            # Short waits, as a command's steps: Python raises the KeyboardInterrupt only when
            # the main thread runs again, and a SIGINT that lands between the print and one
            # long sleep's system call (this process preempted after waking the test) would
            # wait for the whole sleep, the process never knowing it was interrupted.
            for _ in range(1200):
                time.sleep(0.1)
        finally:
            time.sleep(cleanup_s)  # what a command does before it reports (a save let finish)
except KeyboardInterrupt:
    print(f"interrupted {rank}", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("cleanup_s", ["5", "60"])
def test_a_ctrl_c_that_one_process_reports_late_still_ends_it_as_interrupted(tmp_path, cleanup_s):
    # A Ctrl-C reaches both processes at once; process 1 cleans up before it reports it,
    # process 0 does not. Process 1 was ended by process 0's report after 3 s, with status 5
    # and "error: process 0 failed: interrupted (Ctrl-C)", as if it had not been interrupted.
    # Now it is left 8 s to end as itself; past that (process 0 ends at 10 s, and jax would
    # end it with its fatal message), it is ended with that line, but as interrupted: 130.
    statuses, ended = interrupt_both(tmp_path, _LATE, ("0",), (cleanup_s,))
    assert statuses == [130, 130], ended
    assert "interrupted 0" in ended[0][1].splitlines() and "error:" not in ended[0][1]
    if cleanup_s == "5":
        assert "interrupted 1" in ended[1][1].splitlines() and "error:" not in ended[1][1]
    else:
        assert ended[1][1].splitlines()[-1] == (
            "error: process 0 failed: interrupted (Ctrl-C) (process 1 stopped with it; process "
            "0's own output says more)."
        ), ended[1][1]


_TERMINATED = """
import sys, time

from stam_jax import sharding
from stam_jax.interrupts import keep_interrupts

port, rank = sys.argv[1], int(sys.argv[2])
keep_interrupts()
sharding.initialize_distributed(f"localhost:{port}", 2, rank, preemption=False)
try:
    with sharding.stop_together(lambda e: 130 if isinstance(e, KeyboardInterrupt) else 1, 5):
        print("ready", flush=True)
        for _ in range(1200):
            time.sleep(0.1)
except KeyboardInterrupt:
    print(f"interrupted {rank}", file=sys.stderr)
    sys.exit(130)
"""


def test_sigterm_to_the_processes_of_an_evaluation_ends_them_as_a_ctrl_c(tmp_path):
    # jax.distributed's preemption notifier took SIGTERM over in every process that joined:
    # a multi-process evaluation told to end (`kill`, a scheduler) went on to its end.
    # Joined as evaluation joins (no preemption service), the commands' own handling stays:
    # SIGTERM is a Ctrl-C, and each process ends as interrupted.
    statuses, ended = interrupt_both(tmp_path, _TERMINATED, (), (), sig=signal.SIGTERM)
    assert statuses == [130, 130], ended
    for rank, (_, err) in enumerate(ended):
        assert f"interrupted {rank}" in err.splitlines(), err


_IN_C = """
import sys, threading, time

import jax
from jax._src import distributed

from stam_jax import sharding
from stam_jax.interrupts import keep_interrupts

port, rank = sys.argv[1], int(sys.argv[2])
keep_interrupts()
jax.distributed.initialize(f"localhost:{port}", 2, rank)


def ready():
    time.sleep(0.1)  # lets go of the GIL, had again only once the main thread waits in C++
    print("ready", flush=True)


try:
    with sharding.stop_together(lambda e: 130 if isinstance(e, KeyboardInterrupt) else 1, 5):
        if rank == 0:
            print("ready", flush=True)
            for _ in range(1200):
                time.sleep(0.1)
        else:
            sys.setswitchinterval(60)  # the main thread keeps the GIL up to the barrier's wait
            threading.Thread(target=ready, daemon=True).start()
            # A collective process 0 never joins, waited on in C++: a signal does not end the
            # wait, and SIGINT's Python handler runs only when it ends (here: a minute later).
            distributed.global_state.client.wait_at_barrier("stam_jax/test/never", 60_000)
except KeyboardInterrupt:
    print(f"interrupted {rank}", file=sys.stderr)
    sys.exit(130)
"""


def test_a_ctrl_c_that_comes_while_a_process_waits_in_c_still_ends_it_as_interrupted(tmp_path):
    # A Ctrl-C reaches both processes at once; process 1 is waiting in C++ (a collective, a
    # device's computation), where Python does not run SIGINT's handler, which noted the
    # interrupt. It so looked not interrupted, and process 0's report ended it after 3 s with
    # status 5. Python's C-level handler, which runs at once, now notes it (a wakeup fd): it is
    # left 8 s, then ended with process 0's line, as interrupted: 130.
    statuses, ended = interrupt_both(tmp_path, _IN_C, (), ())
    assert statuses == [130, 130], ended
    assert "interrupted 0" in ended[0][1].splitlines() and "error:" not in ended[0][1]
    assert ended[1][1].splitlines()[-1] == (
        "error: process 0 failed: interrupted (Ctrl-C) (process 1 stopped with it; process "
        "0's own output says more)."
    ), ended[1][1]


def test_stop_together_leaves_the_wakeup_fd_as_it_found_it(monkeypatch):
    from stam_jax import sharding

    monkeypatch.setattr(sharding._Stop, "status_of", None)
    monkeypatch.setattr(sharding._Stop, "peer_status", 1)
    assert signal.set_wakeup_fd(-1) == -1
    # None set: its own is set in the block, unset and closed after it, an error's way too.
    with pytest.raises(ValueError), sharding.stop_together(lambda e: 1, 5):
        inside = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(inside, warn_on_full_buffer=False)
        assert inside != -1
        raise ValueError
    assert signal.set_wakeup_fd(-1) == -1
    with pytest.raises(OSError):
        os.fstat(inside)
    # Another's (asyncio's) is left alone.
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write)
        with sharding.stop_together(lambda e: 1, 5):
            assert signal.set_wakeup_fd(write) == write
        assert signal.set_wakeup_fd(-1) == write
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read)
        os.close(write)


def test_a_ctrl_c_held_back_is_acted_on_once_the_block_has_run():
    import threading

    from stam_jax.interrupts import interrupts_held

    before = signal.getsignal(signal.SIGINT)
    ran = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler now: it only notes the signal
        ran.append("the rest of the block")
    assert ran == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is before
    with interrupts_held():  # no Ctrl-C: nothing is raised
        ran.append("a block not interrupted")
    assert signal.getsignal(signal.SIGINT) is before
    # Elsewhere than the main thread (where no handler can be set) the block runs as is.
    errors = []

    def in_thread() -> None:
        try:
            with interrupts_held():
                ran.append("in a thread")
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors == [] and ran[-1] == "in a thread"


def test_keep_interrupts_hands_other_reports_on_and_is_installed_once(monkeypatch):
    import threading
    from types import SimpleNamespace

    from stam_jax.interrupts import keep_interrupts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    sigterm = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(signal, "signal", lambda *args: sigterm)  # this process's stays
    keep_interrupts()
    hook = sys.unraisablehook
    keep_interrupts()
    assert sys.unraisablehook is hook  # not wrapped twice
    other = SimpleNamespace(exc_value=ValueError("in a callback"))
    hook(other)
    # A KeyboardInterrupt reported in another thread was not Ctrl-C's (Python raises that in
    # the main thread only): reported as usual.
    elsewhere = SimpleNamespace(exc_value=KeyboardInterrupt())
    thread = threading.Thread(target=hook, args=(elsewhere,))
    thread.start()
    thread.join()
    assert seen == [other, elsewhere]


def test_an_interrupted_compilation_ends_with_the_status_and_the_output_so_far():
    # os._exit skips the interpreter's shutdown (no atexit, no flush of stdout's buffer): what
    # was printed is flushed first.
    code = textwrap.dedent(
        """
        import atexit, sys
        from stam_jax import interrupts

        interrupts.interrupted_compilation = lambda error: True
        atexit.register(lambda: print("shut down", file=sys.stderr))
        print("the output so far")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            interrupts.exit_interrupted(e, 7)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe: held in its buffer until flushed
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (7, "the output so far\n", "")
    # Any other interrupt: the interpreter shuts down as usual, with the status given.
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        with pytest.raises(SystemExit) as end:
            exit_interrupted(e, 3)
    assert end.value.code == 3


def test_an_unwrapped_ctrl_c_keeps_the_frames_between_the_block_and_the_c_call():
    # The interrupt's own traceback starts below the C code that wrapped it; the frames above
    # (the caller's, up to the block) are the SystemError's.
    from stam_jax.interrupts import interrupts_unwrapped

    def below_the_c_call() -> KeyboardInterrupt:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            return e

    def calls_into_c() -> None:
        raise SystemError("<function f> returned a result with an exception set") from (
            below_the_c_call()
        )

    with pytest.raises(KeyboardInterrupt) as info, interrupts_unwrapped():
        calls_into_c()
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(info.value.__traceback__)]
    assert "calls_into_c" in frames


_SLOW_CALL_AT_EXIT = """
import sys, threading

from stam_jax import sharding

port, rank = sys.argv[1], int(sys.argv[2])
reports = sharding._reports


def slow_reports(client, me):
    # Once this process is ending (its main thread done), the watcher's next call to jax's
    # client lasts, as an RPC may while the processes leave the run.
    if not threading.main_thread().is_alive():
        client.blocking_key_value_get("stam_jax/test/never", 60_000)
    return reports(client, me)


sharding._reports = slow_reports
with sharding.stop_together(lambda e: 1, 5):
    sharding.initialize_distributed(f"localhost:{port}", 2, rank)
print(f"done {rank}", flush=True)
sys.exit(3)
"""


def test_a_normal_end_leaves_no_call_of_the_watcher_to_the_interpreters_end():
    # Both processes end normally (status 3) while the watcher thread is in a call to jax's
    # client. jax's exit handler left the run with that call in progress; it returned once the
    # interpreter was finalising, which unwound the daemon thread through C++: the process
    # aborted after its work was done ("terminate called after throwing an instance of ''",
    # SIGABRT), as a two-process run_eval.py did under load.
    port = str(free_port())
    commands = [[sys.executable, "-c", _SLOW_CALL_AT_EXIT, port, str(rank)] for rank in (0, 1)]
    results = run_processes(commands, devices_each=1, timeout=120)
    assert [status for status, _, _ in results] == [3, 3], results
    assert [out for _, out, _ in results] == ["done 0\n", "done 1\n"]
    assert not any("terminate called" in err for _, _, err in results), results


_ONE_ENDS_THE_OTHER_FAILS = """
import sys, time

from stam_jax import sharding

port, rank = sys.argv[1], int(sys.argv[2])
with sharding.stop_together(lambda e: 1, 5):
    sharding.initialize_distributed(f"localhost:{port}", 2, rank)
    if rank == 1:
        time.sleep(2)  # process 0 has ended its work and is leaving the run
        raise RuntimeError("disk full")
sys.exit(0)
"""


def test_a_process_leaving_the_run_still_ends_on_anothers_failure():
    # Process 0 has ended normally and waits in the run's end for process 1, which then fails:
    # the failure ends it at once, with the peer status, not after jax's shutdown barrier.
    port = str(free_port())
    commands = [[sys.executable, "-c", _ONE_ENDS_THE_OTHER_FAILS, port, str(r)] for r in (0, 1)]
    start = time.monotonic()
    results = run_processes(commands, devices_each=1, timeout=120)
    assert [status for status, _, _ in results] == [5, 1], results
    assert results[0][2].splitlines()[-1] == (
        "error: process 1 failed: RuntimeError: disk full (process 0 stopped with it; process "
        "1's own output says more)."
    )
    assert time.monotonic() - start < 30


def test_an_interrupt_that_came_as_sigterm_is_named_so_to_the_other_processes(monkeypatch):
    # SIGTERM is taken as a Ctrl-C (`keep_interrupts`); the line the other processes of a run
    # end with named it "interrupted (Ctrl-C)" all the same.
    from stam_jax import interrupts, sharding

    monkeypatch.setattr(interrupts, "_TERMINATED", [])
    assert sharding._one_line(KeyboardInterrupt()) == "interrupted (Ctrl-C)"
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    interrupts._terminate_as_interrupt(signal.SIGTERM, None)
    assert sent == [(os.getpid(), signal.SIGINT)] and interrupts.terminated()
    assert sharding._one_line(KeyboardInterrupt()) == "interrupted (SIGTERM)"
