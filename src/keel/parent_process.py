"""A child process that stops when the process that started it is gone: ``stop_with_parent(pid)``.

keel starts processes that must not outlive their starter: the ranks of ``keel train --nproc N`` (started by
torchrun's agent inside the launcher) and the workers of ``keel sweep --workers K``. A starter that is killed
outright (SIGKILL, the out-of-memory killer) cannot stop them, and they would go on training with nobody to report
to. Two ways of noticing, one reaction:

- on Linux the kernel sends ``NOTICE_SIGNAL`` the moment the parent exits (``prctl(PR_SET_PDEATHSIG)``);
- everywhere, a daemon thread compares ``os.getppid()`` with the parent every ``poll_s`` seconds (an orphan is
  re-parented to init or a subreaper) and sends the same signal to the main thread.

The signal's handler raises ``ParentGone`` (a ``SystemExit``, so no ``except Exception`` swallows it) in the main
thread: ``with`` blocks and ``finally`` clauses run, so a run directory's LOCK is released and a checkpoint being
written is abandoned cleanly (checkpoints are written atomically: the newest complete one stays). Should the process
not be gone ``grace_s`` seconds later (a call blocked in C), it ends with ``os._exit``. A notice while the parent
is still there (the signal sent by someone else, or a parent *thread* that exited) is ignored.

A process with work that must not be cut short (a sweep worker recording a finished trial in its database) wraps it
in ``deferred()``: a notice there waits for its end, or for an ``interruptible()`` block inside it (the trial's
training).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

__all__ = ["ParentGone", "deferred", "end_now", "gone_parent", "interruptible", "stop_with_parent"]

#: The signal that carries the notice (its default action would end the process; keel's handler decides instead).
NOTICE_SIGNAL = getattr(signal, "SIGUSR2", None)
#: Exit code of a process that stopped because its parent was gone (128 + SIGHUP: its controlling process went away).
EXIT_CODE = 129
_PR_SET_PDEATHSIG = 1


class ParentGone(SystemExit):
    """Raised in the main thread when the process that started this one is gone."""

    def __init__(self, parent: int):
        super().__init__(EXIT_CODE)
        self.parent = parent

    def __str__(self) -> str:
        return f"the process that started this one (PID {self.parent}) is gone"


class _Watch:
    def __init__(self, parent: int, grace_s: float):
        self.parent, self.grace_s = parent, grace_s
        self.gone = False  # noticed
        self.raised = False
        self.regions: list[bool] = []  # the main thread's open deferred() (False) and interruptible() (True) blocks

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def may_interrupt(self) -> bool:
        return self.regions[-1] if self.regions else True

    def on_notice(self, signum, frame) -> None:
        if not self.orphaned():
            return  # someone else's signal, or the thread of the parent that started us exited: not our notice
        self.gone = True
        if self.may_interrupt():
            self.raise_now()

    def raise_now(self) -> None:
        if self.raised:
            return
        self.raised = True
        _end_after(self.grace_s)
        raise ParentGone(self.parent)


_watch: _Watch | None = None


def stop_with_parent(parent: int, *, poll_s: float = 1.0, grace_s: float = 5.0) -> None:
    """From the main thread: raise ``ParentGone`` there once the process ``parent`` is no longer this one's
    parent, and end the process ``grace_s`` seconds after the notice if it is still running. Already orphaned:
    raises now."""
    global _watch
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_with_parent: call it from the main thread (it installs a signal handler)")
    watch = _Watch(parent, grace_s)
    _watch = watch
    if NOTICE_SIGNAL is not None:
        signal.signal(NOTICE_SIGNAL, watch.on_notice)
        _ask_the_kernel(NOTICE_SIGNAL)
    threading.Thread(target=_poll, args=(watch, poll_s), name="keel-parent-watch", daemon=True).start()
    if watch.orphaned():  # gone before the watch was set up
        watch.gone = True
        watch.raise_now()


def gone_parent() -> int | None:
    """The PID of the parent this process stops with, once that parent is gone; None before (or without a watch)."""
    if _watch is not None and (_watch.gone or _watch.orphaned()):
        return _watch.parent
    return None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block ``ParentGone`` does not cut short (unless an ``interruptible()`` block inside it): a notice that
    comes while it runs is raised when it ends."""
    with _region(False):
        yield


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block inside ``deferred()`` that ``ParentGone`` may cut short (a notice that came before it is raised on
    entry)."""
    with _region(True):
        yield


@contextlib.contextmanager
def _region(interrupt: bool) -> Iterator[None]:
    watch = _watch
    if watch is None:
        yield
        return
    if interrupt and gone_parent() is not None:
        watch.raise_now()
    watch.regions.append(interrupt)
    try:
        yield
    finally:
        watch.regions.pop()
    if gone_parent() is not None and watch.may_interrupt():
        watch.raise_now()


def _poll(watch: _Watch, poll_s: float) -> None:
    while not watch.orphaned():
        time.sleep(poll_s)
    watch.gone = True
    _end_after(watch.grace_s)  # the main thread may be stuck in a call that no signal handler interrupts
    if NOTICE_SIGNAL is not None and hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, NOTICE_SIGNAL)


def _ask_the_kernel(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)`` on Linux: the kernel sends ``signum`` when the parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the polling thread still notices


def end_now() -> NoReturn:
    """End the process now with ``EXIT_CODE``, once ``ParentGone`` has unwound what it had to (the run's lock, a
    trial's record): an orphan has nobody to finish for, and the interpreter's teardown of torch (its process
    group, its threads) can take seconds."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_CODE)


_ending = threading.Lock()


def _end_after(seconds: float) -> None:
    """End the process with ``EXIT_CODE`` in ``seconds`` (once, however often asked)."""
    if not _ending.acquire(blocking=False):
        return

    def end() -> None:
        time.sleep(seconds)
        end_now()

    threading.Thread(target=end, name="keel-parent-gone-exit", daemon=True).start()
