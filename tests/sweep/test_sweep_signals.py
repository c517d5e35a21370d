"""A keel sweep that is terminated or killed takes its worker processes with it: they do not go on taking trials
with nobody to report to, and the trials they were running are retried by --resume (real processes, real signals)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna")

import keel  # noqa: E402

SRC = str(Path(keel.__file__).resolve().parents[1])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_workers_stop_with_their_sweep(tmp_path, stop):
    config = {"task": "digits", "max_steps": 100000, "eval_interval": 1000, "checkpoint_interval": 1000,
              "device": "cpu", "threads": 1, "sweep": {"optimizer.lr": [1e-3, 2e-3, 3e-3, 4e-3]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sweep = subprocess.Popen([sys.executable, "-m", "keel.cli.main", "sweep", "c.yaml", "--workers", "2", "--out",
                              "s"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        trials = tmp_path / "s" / "trials"
        assert _wait_for(lambda: trials.is_dir() and len(list(trials.iterdir())) == 2, 60), "no trial started"
        workers += _children(sweep.pid)
        assert len(workers) == 2
        sweep.send_signal(stop)
        assert sweep.wait(timeout=30) == (143 if stop == signal.SIGTERM else -signal.SIGKILL)
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 15), "a worker outlived its sweep"
        assert len(list(trials.iterdir())) == 2  # no new trial was started
    finally:
        sweep.kill()
        sweep.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
