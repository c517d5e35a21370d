"""The run directory's LOCK: a second process is refused with the holder's PID and host; a lock no process holds
(its flock is free) is stale and taken over, whatever PID or host its text names."""

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from keel.errors import KeelError
from keel.rundir import LOCK, RunLock

fork = multiprocessing.get_context("fork")  # the child starts with keel already imported: no second torch import


def hold_lock(run_dir, locked, release, leave_stale):
    lock = RunLock(run_dir, report=lambda message: None).acquire()
    locked.set()
    release.wait(30)
    if leave_stale:
        os._exit(0)  # dies holding it: LOCK stays behind, naming a PID that is gone
    lock.release()


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the run's lock; `holder(leave_stale)` returns (process, release event)."""
    started = []

    def start(leave_stale=False):
        locked, release = fork.Event(), fork.Event()
        process = fork.Process(target=hold_lock, args=(tmp_path, locked, release, leave_stale))
        process.start()
        started.append((process, release))
        assert locked.wait(30), "the child did not take the lock"
        return process, release

    yield start
    for process, release in started:
        release.set()
        process.join(30)


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path, holder):
    process, release = holder()
    content = json.loads((tmp_path / LOCK).read_text())
    assert content["pid"] == process.pid and content["host"] == socket.gethostname()
    host = socket.gethostname()
    with pytest.raises(KeelError, match=rf"is in use: LOCK is held by PID {process.pid} on host {host}"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == process.pid  # the holder's lock is untouched
    release.set()
    process.join(30)
    assert not (tmp_path / LOCK).exists()  # released: the file is gone
    with RunLock(tmp_path, report=pytest.fail) as lock:
        assert lock.held and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path, holder):
    process, release = holder(leave_stale=True)
    release.set()
    process.join(30)
    assert (tmp_path / LOCK).exists()
    messages = []
    with RunLock(tmp_path, report=messages.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and "took over the stale lock" in messages[0] and f"PID {process.pid}" in messages[0]
    assert not (tmp_path / LOCK).exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(KeelError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / LOCK).exists()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def write_lock(run_dir, **content):
    (run_dir / LOCK).write_text(json.dumps(content))


def test_a_stale_lock_file_of_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, host=socket.gethostname(), started="earlier")
    messages = []
    lock = RunLock(tmp_path, report=messages.append).acquire()
    assert f"PID {pid} on host {socket.gethostname()}" in messages[0]
    lock.release()


def test_a_lock_of_this_pid_from_an_earlier_life_is_taken_over(tmp_path):
    """Containers reuse PIDs: a LOCK naming this very PID that no open file holds is from a process that is gone."""
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname())
    messages = []
    with RunLock(tmp_path, report=messages.append):
        pass
    assert len(messages) == 1


@pytest.mark.parametrize("pid, host", [
    (os.getppid(), socket.gethostname()),  # a PID reused by a live, unrelated process (here: the test's parent)
    (1, socket.gethostname()),  # PID 1: in a container, the run's own earlier life; always alive
    (4242, "another-host.example"),  # a run on another host, on a filesystem whose locks reach every host
], ids=["reused-pid", "pid-1", "another-host"])
def test_a_lock_nobody_holds_is_taken_over_whatever_pid_or_host_it_names(tmp_path, pid, host):
    """The flock is the only arbiter: a LOCK file no open file holds is stale, so none of these needs deleting."""
    write_lock(tmp_path, pid=pid, host=host, started="earlier")
    messages = []
    with RunLock(tmp_path, report=messages.append) as lock:
        assert lock.held and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"took over the stale lock {tmp_path / LOCK} of PID {pid} on host {host}" in \
        messages[0]
    assert not (tmp_path / LOCK).exists()


def test_a_held_lock_is_refused_whatever_its_text_says(tmp_path, holder):
    """A live holder keeps its run even when LOCK's text names a dead PID or another host: the text only informs."""
    process, release = holder()
    write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname())  # same file (truncated in place): still held
    with pytest.raises(KeelError, match="is in use: LOCK is held by PID .* still holds the lock"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, pid=1, host="another-host.example")
    with pytest.raises(KeelError, match="is in use: LOCK is held by PID 1 on host another-host.example; allowed"):
        RunLock(tmp_path).acquire()
    release.set()
    process.join(30)


def test_a_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """SIGKILL: the kernel releases the flock, the LOCK file stays; the next run takes it without help."""
    locked, release = fork.Event(), fork.Event()
    process = fork.Process(target=hold_lock, args=(tmp_path, locked, release, False))
    process.start()
    assert locked.wait(30)
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert (tmp_path / LOCK).exists()
    messages = []
    with RunLock(tmp_path, report=messages.append):
        pass
    assert f"of PID {process.pid} on host {socket.gethostname()}" in messages[0]


@pytest.fixture
def no_file_locks(monkeypatch):
    """A filesystem without flock (an NFS mount without a lock manager): flock fails with ENOLCK."""
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_file_locks_the_file_is_the_lock(tmp_path, no_file_locks, monkeypatch):
    messages = []
    with RunLock(tmp_path, report=messages.append):
        assert "this filesystem has no file locks" in messages[0]
        with pytest.raises(KeelError, match=f"is in use: LOCK is held by PID {os.getpid()} .*no file locks"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, host=socket.gethostname())  # this host, PID gone: stale
    messages = []
    with RunLock(tmp_path, report=messages.append):
        assert f"took over the stale lock {tmp_path / LOCK} of PID {pid}" in messages[0]
    (tmp_path / LOCK).write_text("{not json")  # unreadable once its grace is over: stale too
    monkeypatch.setattr(RunLock, "unreadable_grace_s", 0.05)
    messages = []
    with RunLock(tmp_path, report=messages.append):
        assert "an unknown process" in messages[0]


@pytest.mark.parametrize("pid, host", [(os.getppid(), socket.gethostname()), (4242, "another-host.example")],
                         ids=["live-pid", "another-host"])
def test_without_file_locks_a_lock_that_may_be_alive_is_refused_and_says_what_to_do(tmp_path, no_file_locks, pid,
                                                                                   host):
    write_lock(tmp_path, pid=pid, host=host)
    before = (tmp_path / LOCK).read_text()
    with pytest.raises(KeelError, match=rf"PID {pid} on host {host}, and this filesystem has no file locks .* "
                                        rf"delete .*LOCK if that process is gone"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK).read_text() == before


@pytest.mark.parametrize("content", ["", "{not json", "[]", "null"])
def test_an_unreadable_lock_nobody_holds_is_taken_over(tmp_path, content, monkeypatch):
    monkeypatch.setattr(RunLock, "unreadable_grace_s", 0.05)
    (tmp_path / LOCK).write_text(content)
    messages = []
    with RunLock(tmp_path, report=messages.append):
        pass
    assert "an unknown process" in messages[0]


def test_release_twice_and_release_after_someone_replaced_the_file(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK).unlink()
    write_lock(tmp_path, pid=1, host="elsewhere")  # not ours any more: release leaves it
    lock.release()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere"


def test_a_lock_in_a_missing_directory_is_a_keel_error(tmp_path):
    with pytest.raises(KeelError, match="cannot create LOCK"):
        RunLock(tmp_path / "missing").acquire()


def race(run_dir, start, results):
    start.wait(30)
    try:
        lock = RunLock(run_dir, report=lambda message: None).acquire()
    except KeelError:
        results.put(None)
        return
    began = time.monotonic()
    held_by = json.loads((run_dir / LOCK).read_text())["pid"]
    time.sleep(0.05)
    results.put((began, time.monotonic(), held_by == os.getpid()))
    lock.release()


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_never_hold_the_lock_at_once(tmp_path, stale):
    if stale:
        write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname())
    start, results = fork.Event(), fork.Queue()
    processes = [fork.Process(target=race, args=(tmp_path, start, results)) for _ in range(6)]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    held = sorted(outcome for outcome in outcomes if outcome is not None)
    assert held and all(own for _, _, own in held)
    assert all(earlier[1] <= later[0] for earlier, later in zip(held, held[1:]))  # no two at once
    assert not (tmp_path / LOCK).exists()
