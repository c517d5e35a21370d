"""keel.parent_process: a child whose parent is killed outright (SIGKILL) stops within seconds, running its
``finally`` clauses; a notice inside ``deferred()`` waits for the block's end; a notice while the parent lives is
ignored (real processes, real signals)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import keel

from process_helpers import alive, wait_for  # tests/ is on sys.path

SRC = str(Path(keel.__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")

CHILD = textwrap.dedent("""
    import os, sys, time
    from keel import parent_process

    out = sys.argv[2]
    def note(text):
        with open(out, "a") as handle:
            handle.write(text + "\\n")

    parent_process.stop_with_parent(int(sys.argv[1]))
    note("ready")
    try:
        if sys.argv[3] == "deferred":
            with parent_process.deferred():
                while not os.path.exists(out + ".go"):  # the parent is killed meanwhile
                    time.sleep(0.01)
                time.sleep(0.5)
                note("deferred block finished")
        while True:
            sum(range(1000))
    except parent_process.ParentGone as gone:
        note(f"gone {gone.parent}")
        raise
    finally:
        note("finally ran")
""")

MIDDLE = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), *sys.argv[2:]])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _start(tmp_path: Path, mode: str):
    out = tmp_path / "notes.txt"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD, str(out), mode], stdout=subprocess.PIPE,
                              text=True, env=env)
    child = int(middle.stdout.readline())
    assert wait_for(lambda: out.is_file() and "ready" in out.read_text(), 60, poll=0.01), "the child never started"
    return middle, child, out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("mode", ["plain", "deferred"])
def test_a_child_stops_when_its_parent_is_killed(tmp_path, mode):
    middle, child, out = _start(tmp_path, mode)
    try:
        middle.send_signal(signal.SIGKILL)
        middle.wait()
        killed = time.monotonic()
        Path(str(out) + ".go").touch()
        assert wait_for(lambda: not alive(child), 30, poll=0.01), "the orphan went on running"
        print(f"orphan gone {time.monotonic() - killed:.2f} s after its parent's SIGKILL")
        notes = out.read_text().splitlines()
        assert f"gone {middle.pid}" in notes and notes[-1] == "finally ran"
        if mode == "deferred":  # the block was not cut short; the notice came at its end
            assert notes.index("deferred block finished") < notes.index(f"gone {middle.pid}")
    finally:
        middle.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_the_notice_signal_from_elsewhere_is_ignored_while_the_parent_lives(tmp_path):
    from keel.parent_process import NOTICE_SIGNAL

    middle, child, out = _start(tmp_path, "plain")
    try:
        os.kill(child, NOTICE_SIGNAL)
        time.sleep(1.0)
        assert alive(child) and "gone" not in out.read_text()
    finally:
        middle.kill()
        middle.wait()
        assert wait_for(lambda: not alive(child), 30, poll=0.01)
