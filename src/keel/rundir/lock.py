"""The run directory's lock: one process at a time trains in a run (``RUN/LOCK``).

The operating system holds the lock: ``fcntl.flock`` on ``RUN/LOCK``, taken when the run starts and held for its
whole life. The kernel lets go of a flock when the last descriptor of its open file is closed, so a process that
dies in any way (SIGKILL, out of memory, a crash) leaves a lock that the next run simply takes. Whether a lock is
held is the only question asked: no PID is looked up, so a PID reused by an unrelated process, PID 1 in a container
or a holder on another host never makes a stale lock look alive. The file's text, ``{"pid", "host", "started"}``,
only tells the messages who holds or held it.

Filesystems without ``flock`` (``ENOLCK``, ``EOPNOTSUPP``: an NFS mount without a lock manager, some FUSE
filesystems): the file's existence is the lock. A LOCK left there is taken over only when it is unreadable or names
this host and a PID that is not running; otherwise the run is refused, saying that the filesystem has no locks and that LOCK may be
deleted by hand once its process is gone. Network filesystems whose locks work across hosts (NFSv4, NFSv3 with
lockd) need nothing of this; one mounted so that each host sees only its own locks (``nolock``,
``local_lock=flock``) cannot keep two hosts out of one run directory.
"""

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

_HELD, _FREE, _NO_LOCKS = "held", "free", "no locks"


class RunLock:
    """Exclusive use of a run directory: ``fcntl.flock`` on the file ``RUN/LOCK``, held while the lock is.

    A second process is refused with a KeelError naming the holder's PID and host (the file's text). A LOCK file
    whose flock nobody holds is stale, whatever PID or host it names: it is taken over with a message.
    ``release`` (or leaving the ``with`` block) deletes the file and lets go of the flock.

        with RunLock(run_dir):
            ...  # train
    """

    unreadable_grace_s = 1.0  # how long a held LOCK is given to show its JSON before it is reported as unreadable
    _held_here: set[Path] = set()  # LOCKs this process holds (without flock, its own PID alone cannot tell)

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
        for _ in range(50):
            fd, created = self._open()
            if fd is None:
                continue  # removed between two looks: look again
            try:
                taken = self._take(fd, created, me)
            except BaseException as error:
                os.close(fd)
                if isinstance(error, OSError):
                    raise KeelError(
                        f"run directory '{self.path.parent}': cannot take {LOCK} ({_describe(error)})") from None
                raise
            if taken:
                self._fd = fd
                RunLock._held_here.add(self.path.absolute())
                return self
            os.close(fd)  # the file was replaced or removed meanwhile: look again
        raise KeelError(f"run directory '{self.path.parent}': could not take {LOCK} (other processes keep taking it)")

    def _open(self) -> tuple[int | None, bool]:
        """An open descriptor of LOCK, creating it if it is not there, and whether this call created it."""
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as error:
            raise KeelError(f"run directory '{self.path.parent}': cannot create {LOCK} ({_describe(error)})") from None
        try:
            return os.open(self.path, flags), False
        except FileNotFoundError:
            return None, False
        except OSError as error:
            raise KeelError(f"run directory '{self.path.parent}': cannot open {LOCK} ({_describe(error)})") from None

    def _take(self, fd: int, created: bool, me: dict[str, Any]) -> bool:
        """Take the lock through ``fd``: True when taken, False when LOCK changed meanwhile; KeelError when held."""
        state = _flock(fd)
        if state == _HELD:
            self._refuse(fd, me)
        if state == _NO_LOCKS:
            return self._take_by_existence(fd, created, me)
        if not _is_current(fd, self.path):
            return False  # its holder released it (deleting it) between our open and our flock
        if not created:
            self.report(f"took over the stale lock {self.path} of {_who(_read_holder(fd))} (no process holds it)")
        os.ftruncate(fd, 0)
        _write_holder(fd, me)
        return True

    def _refuse(self, fd: int, me: dict[str, Any]) -> None:
        """Raise the KeelError for a lock another open file holds, naming its holder as LOCK's text gives it."""
        holder = self._read_holder_waiting(fd)
        who = _who(holder)
        if holder is not None and holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
            who += " (that PID is gone, but a process, perhaps a child of it, still holds the lock)"
        raise KeelError(f"run directory '{self.path.parent}' is in use: {LOCK} is held by {who}; "
                        "allowed: wait for that run to end, or another --out")

    def _read_holder_waiting(self, fd: int) -> dict[str, Any] | None:
        """LOCK's text, given ``unreadable_grace_s`` to appear: a lock just taken may not hold its JSON yet."""
        holder = _read_holder(fd)
        deadline = time.monotonic() + self.unreadable_grace_s
        while holder is None and time.monotonic() < deadline:
            time.sleep(0.02)
            holder = _read_holder(fd)
        return holder

    def _take_by_existence(self, fd: int, created: bool, me: dict[str, Any]) -> bool:
        """Without flock: the file is the lock. Ours when we created it; a stale one (unreadable, or naming a PID of
        this host that is not running) is removed so the next look creates ours; any other is refused."""
        if created:
            _write_holder(fd, me)
            self.report(f"{self.path.parent}: this filesystem has no file locks; {LOCK} itself marks the run as in "
                        f"use, and a run killed here leaves it behind")
            return True
        holder = self._read_holder_waiting(fd)
        pid, host = (holder or {}).get("pid"), (holder or {}).get("host")
        mine = pid == me["pid"] and self.path.absolute() in RunLock._held_here
        if holder is not None and (host != me["host"] or mine or (pid != me["pid"] and _pid_alive(pid))):
            raise KeelError(
                f"run directory '{self.path.parent}' is in use: {LOCK} is held by {_who(holder)}, and this "
                f"filesystem has no file locks to tell whether that process is alive; allowed: wait for that run "
                f"to end, delete {self.path} if that process is gone, or another --out"
            )
        if not _is_current(fd, self.path):
            return False
        os.unlink(self.path)
        self.report(f"took over the stale lock {self.path} of {_who(holder)} (that process is gone)")
        return False  # look again: the next look creates ours

    def release(self) -> None:
        """Delete ``LOCK`` (if it is still this lock's file) and let go of it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        RunLock._held_here.discard(self.path.absolute())
        try:
            if _is_current(fd, self.path):
                os.unlink(self.path)  # while the flock is held: whoever opens it next sees it replaced
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> str:
    """Try to take an exclusive flock on ``fd`` without waiting: taken (``_FREE``), ``_HELD`` by another open file,
    or ``_NO_LOCKS`` where the filesystem has none."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _HELD
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return _NO_LOCKS
        raise
    return _FREE


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(fd: int, me: dict[str, Any]) -> None:
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _who(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unknown process (LOCK is unreadable)"
    return f"PID {holder.get('pid')} on host {holder.get('host')}"


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
