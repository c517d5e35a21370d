"""A keel sweep that is terminated or killed takes its worker processes with it: they do not go on taking trials
with nobody to report to, and the trials they were running are retried by --resume (real processes, real signals)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna")

import keel  # noqa: E402

from process_helpers import alive, children, wait_for  # noqa: E402 (tests/ is on sys.path)

SRC = str(Path(keel.__file__).resolve().parents[1])


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
        assert wait_for(lambda: trials.is_dir() and len(list(trials.iterdir())) == 2, 60), "no trial started"
        workers += children(sweep.pid)
        assert len(workers) == 2
        sweep.send_signal(stop)
        assert sweep.wait(timeout=30) == (143 if stop == signal.SIGTERM else -signal.SIGKILL)
        assert wait_for(lambda: not any(alive(w) for w in workers), 15), "a worker outlived its sweep"
        assert len(list(trials.iterdir())) == 2  # no new trial was started
    finally:
        sweep.kill()
        sweep.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_trial_that_finished_training_is_recorded_complete_when_nobody_reads_its_lines(tmp_path):
    """A worker whose keel sweep is gone writes to a pipe nobody reads (BrokenPipeError): its trial is still
    recorded complete, not failed for a print."""
    import optuna

    config = {"task": "digits", "max_steps": 10, "eval_interval": 10, "checkpoint_interval": 10, "threads": 1,
              "sweep": {"optimizer.lr": "loguniform(1e-3, 3e-2)"}, "sweep_options": {"sampler": "random"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "keel.cli.main", "sweep", "c.yaml", "--trials", "1", "--out", "s"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stage = yaml.safe_load((tmp_path / "s" / "stage.yaml").read_text())
    (tmp_path / "s" / "stage.yaml").write_text(yaml.safe_dump({**stage, "trials": 2}))
    read, write = os.pipe()
    os.close(read)  # every line the worker prints goes to a pipe without a reader
    worker = subprocess.Popen([sys.executable, "-m", "keel.sweep.worker", "s"], cwd=tmp_path, env=env, stdout=write,
                              stderr=write)
    os.close(write)
    try:
        worker.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass  # keel before issue 20 failed every trial on its first line, and went on trying new ones
    finally:
        worker.kill()
        worker.wait()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    states = [trial.state.name for trial in study.get_trials()]
    assert states == ["COMPLETE", "COMPLETE"], states
    assert worker.returncode == 0


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_sweep_draws_new_points_not_the_ones_it_started_with(tmp_path, sampler):
    """--resume continues the sampler: re-seeded as at the start, it would repeat the points it drew then."""
    import csv

    from keel.cli.main import main

    config = {"task": "digits", "max_steps": 5, "eval_interval": 5, "checkpoint_interval": 5, "threads": 1,
              "sweep": {"optimizer.lr": "loguniform(1e-3, 3e-2)", "optimizer.weight_decay": "uniform(0, 1e-3)"},
              "sweep_options": {"sampler": sampler}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "s"
    assert main(["sweep", str(tmp_path / "c.yaml"), "--trials", "2", "--out", str(out)]) == 0
    assert main(["sweep", "--resume", str(out), "--trials", "4"]) == 0
    with open(out / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    points = [(row["optimizer.lr"], row["optimizer.weight_decay"]) for row in rows]
    assert len(points) == 4 and len(set(points)) == 4, points
