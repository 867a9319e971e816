"""Ctrl-C, handled so that it stops a command at any moment: once, cleanly, and never lost."""

from __future__ import annotations

import _thread
import contextlib
import gc
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn


def keep_interrupts() -> None:
    """Makes a Ctrl-C that lands in a garbage-collection callback stop the command all the same,
    and SIGTERM (`kill`, a scheduler ending a job) a Ctrl-C.

    Python raises KeyboardInterrupt in whatever the main thread runs when the signal comes. In a
    callback of the garbage collector (JAX registers one, run at every collection) it cannot
    propagate: Python prints "Exception ignored in: <function _xla_gc_callback>" and the
    command went on as if never interrupted. This hook marks SIGINT as arrived again, 50 ms
    later from another thread (at once, it would be raised in the hook itself), and the
    KeyboardInterrupt is raised in the main code then (or, should it land in a callback again,
    later still). Other reports go to the hook that was installed before. Installed by the
    command-line tools.

    SIGTERM would end the process at once, leaving what a Ctrl-C cleans up (a partial
    output's staging folder, decoding processes, a save under way) and without the line that
    says what was kept; it is sent on as SIGINT, to be handled as one wherever the command is.
    (Training saves the step it is at instead, once its steps have begun:
    `stam_jax.train.train_and_evaluate`.) Main thread only.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    previous = sys.unraisablehook
    if getattr(previous, "keeps_interrupts", False):
        return

    def hook(unraisable: Any) -> None:
        if (
            isinstance(unraisable.exc_value, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()
        ):
            threading.Timer(0.05, _thread.interrupt_main, (signal.SIGINT,)).start()
            return
        previous(unraisable)

    hook.keeps_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


_TERMINATED: list[int] = []  # SIGTERM's arrivals, for `terminated`


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM's handler: a Ctrl-C (SIGINT to this process), noted for `terminated`."""
    _TERMINATED.append(signum)
    os.kill(os.getpid(), signal.SIGINT)


def terminated() -> bool:
    """Whether this process's interrupt came as SIGTERM (`keep_interrupts`), so that what
    reports it names it as such."""
    return bool(_TERMINATED)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Holds a Ctrl-C back until the block has run, then acts on it as it would have.

    For what must not be cut in two: importing JAX (a KeyboardInterrupt inside the import of
    jaxlib's compiled modules aborts the process: "terminate called after throwing an
    instance of 'nanobind::python_error'", exit 134) and starting an asynchronous checkpoint
    save (cut short, it leaves a partial directory behind). Main thread only (elsewhere the
    block runs as is: Python handles signals in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived and callable(previous):
            previous(signal.SIGINT, None)  # Python's default raises KeyboardInterrupt


@contextlib.contextmanager
def interrupts_unwrapped() -> Iterator[None]:
    """Raises a Ctrl-C that C code wrapped in a SystemError as the KeyboardInterrupt it is.

    A KeyboardInterrupt raised in Python code called from C code that does not look for it
    (numpy asking one of JAX's scalar types for its dtype, while a model is traced) comes out
    as "SystemError: <function ...> returned a result with an exception set", the interrupt as
    its cause: the command ended with that traceback and status 1 instead of 130. It is raised
    with the SystemError's traceback (the frames the interrupt came up through).
    """
    try:
        yield
    except SystemError as e:
        if not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        raise e.__cause__.with_traceback(e.__traceback__) from None


def interrupted_compilation(error: BaseException) -> bool:
    """Whether `error` was raised while XLA compiled: JAX's compiler module is in its traceback.

    A Ctrl-C then stops the wait for the compilation, not the compilation itself, which goes on
    in a thread of XLA's own.
    """
    return any(
        frame.f_globals.get("__name__") == "jax._src.compiler"
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )


def exit_interrupted(error: KeyboardInterrupt, status: int) -> NoReturn:
    """Ends a command that `error` stopped, with exit `status`; its message is printed already.

    After a Ctrl-C during XLA's compilation (`interrupted_compilation`), the interpreter's
    shutdown tore JAX's backend down under the compiling thread, and the command died of a
    segmentation fault (exit status -11, "Fatal Python error" on stderr) instead of exiting
    with `status`. The process then ends without that shutdown (`os._exit`), once its output is
    flushed; the command's own cleanup (decoding processes stopped, saves let finish) has run,
    as the interrupt came up through it. Any other interrupt: `sys.exit(status)`.

    Either way, what the frames the interrupt came up through still hold is freed first (the
    traceback keeps them to the end): a video read by grain's reading processes lies in a
    shared-memory block that is unlinked only when its array is freed, and Python's resource
    tracker warned of "leaked shared_memory objects" as the command ended.
    """
    compiling = interrupted_compilation(error)
    _release(error)
    if compiling:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def _release(error: BaseException) -> None:
    """Frees what the frames `error` came up through still hold, now."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()
