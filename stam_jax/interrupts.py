"""Ctrl-C, handled so that it stops a command at any moment: once, cleanly, and never lost."""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


def keep_interrupts() -> None:
    """Makes a Ctrl-C that lands in a garbage-collection callback stop the command all the same.

    Python raises KeyboardInterrupt in whatever the main thread runs when the signal comes. In a
    callback of the garbage collector (JAX registers one, run at every collection) it cannot
    propagate: Python prints "Exception ignored in: <function _xla_gc_callback>" and the
    command went on as if never interrupted. This hook marks SIGINT as arrived again, 50 ms
    later from another thread (at once, it would be raised in the hook itself), and the
    KeyboardInterrupt is raised in the main code then (or, should it land in a callback again,
    later still). Other reports go to the hook that was installed before. Installed by the
    command-line tools.
    """
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
