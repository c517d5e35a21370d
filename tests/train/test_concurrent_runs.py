"""Two writers on one run directory, end to end: while ``keel train`` trains in a run, a second ``keel train
--resume`` of it, or a new run with ``--out`` at it, is refused in one line with exit code 2, and the first run ends
exactly as if it had been alone (every step logged once, weights bitwise those of an undisturbed run).

Kept out of the default run (``pytest -m faults``); the lock itself is tested in test_rundir_lock.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel import rundir
from keel.rundir.metrics import read_metrics

from fault_helpers import keel_train as keel, reference_run  # tests/ is on sys.path
from run_helpers import assert_bitwise_equal, train_losses  # tests/ (the conftest's folder) is on sys.path

pytestmark = pytest.mark.faults

TINY = ["device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "data.batch_size=8", "data.eval_tokens=1024", "sample.tokens=8", "optimizer.lr=3e-3", "schedule.min_lr=3e-4"]
RUN = [*TINY, "max_steps=400", "checkpoint_interval=50", "eval_interval=100", "schedule.warmup=10"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory, RUN)


@pytest.mark.parametrize("second", ["--resume", "--out"])
def test_a_second_writer_is_refused_and_the_first_run_is_undisturbed(tmp_path, reference, second):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "keel.cli.main", "train", *RUN, "--out", str(run), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / rundir.METRICS).exists() or not read_metrics(run / rundir.METRICS):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.01)
        argv = ["--resume", str(run)] if second == "--resume" else [*RUN, "seed=2", "--out", str(run)]
        code, err = keel(*argv, "--quiet")
        still_training = first.poll() is None
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert still_training, "the first run ended before the second one was tried: make it longer"
    assert code == 2 and err.count("\n") == 1, err
    holder = f"is in use: LOCK is held by PID {first.pid}"
    assert holder in err or "already holds (part of) a run" in err, err
    assert list(train_losses(run)) == list(range(400))  # each step once: no second trajectory mixed in
    assert_bitwise_equal(reference, run)
