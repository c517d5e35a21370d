"""The run directory's lock: one process at a time writes a run (``RUN/LOCK``)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.rundir.files import Report, _describe
from keel.rundir.layout import LOCK


class RunLock:
    """Exclusive use of a run directory: the file ``RUN/LOCK`` holding ``{"pid", "host", "started"}``.

    Created with O_CREAT|O_EXCL (atomic) and held with ``fcntl.flock`` for as long as the lock is. A second process
    is refused with a KeelError naming the holder's PID and host. A lock left by a process that is gone (same host,
    PID not running, flock free) is taken over with a message; one from another host is never taken over, since its
    process cannot be checked from here. ``release`` (or leaving the ``with`` block) deletes the file.

        with RunLock(run_dir):
            ...  # train
    """

    unreadable_grace_s = 1.0  # how long an unreadable LOCK is given to show its JSON before it counts as stale

    def __init__(self, run_dir: Path, report: Report = print) -> None:
        self.path = Path(run_dir) / LOCK
        self.report = report
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        stale_fd = None
        try:
            for _ in range(50):
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    taken = self._examine(me)  # raises when the holder is alive; else the stale lock's fd
                    if taken is not None:
                        if stale_fd is not None:
                            os.close(stale_fd)
                        stale_fd = taken
                    continue
                try:
                    os.write(fd, (json.dumps(me) + "\n").encode())
                    os.fsync(fd)
                    _flock(fd, blocking=True)  # someone examining the new file holds it for a moment at most
                except BaseException:
                    os.close(fd)
                    self.path.unlink(missing_ok=True)
                    raise
                self._fd = fd
                return self
        except OSError as error:
            raise KeelError(f"run directory '{self.path.parent}': cannot create {LOCK} ({_describe(error)})") from None
        finally:
            if stale_fd is not None:
                os.close(stale_fd)
        raise KeelError(f"run directory '{self.path.parent}': could not take {LOCK} (other processes keep taking it)")

    def _examine(self, me: dict[str, Any]) -> int | None:
        """Look at an existing lock: raise when its holder may be alive; else remove it and return its open fd."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # released meanwhile: try again
        try:
            holder = _read_holder(fd)
            deadline = time.monotonic() + self.unreadable_grace_s
            while holder is None and time.monotonic() < deadline:  # a lock just created may not hold its JSON yet
                time.sleep(0.02)
                holder = _read_holder(fd)
            free = _flock(fd, blocking=False)
            pid, host = (holder or {}).get("pid"), (holder or {}).get("host")
            who = f"PID {pid} on host {host}" if holder is not None else "an unknown process (LOCK is unreadable)"
            alive = holder is not None and (host != me["host"] or (pid != me["pid"] and _pid_alive(pid)))
            if not free or alive:
                if not free and holder is not None and host == me["host"] and not _pid_alive(pid):
                    who += " (that PID is gone, but a process, perhaps a child of it, still holds the lock)"
                elif host != me["host"] and holder is not None:
                    who += f", another host, whose process cannot be checked from here (delete {self.path} only if " \
                        "that process is gone)"
                raise KeelError(
                    f"run directory '{self.path.parent}' is in use: {LOCK} is held by {who}; "
                    "allowed: wait for that run to end, or another --out"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return None  # replaced meanwhile: look again
            os.unlink(self.path)
            self.report(f"took over the stale lock {self.path} of {who} (that process is gone)")
            return fd  # held (and flocked) until the new lock exists, so no one else takes over the same one
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """Delete ``LOCK`` (if it is still this lock's file) and let go of it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int, blocking: bool) -> bool:
    """Take an exclusive flock; False when another open file holds it. Filesystems without flock count as free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True  # the PID check alone decides
        raise
    return True


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
