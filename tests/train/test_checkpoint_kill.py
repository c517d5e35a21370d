"""SIGKILL before each file operation of a checkpoint save, then ``keel train --resume``: bitwise the same run.

A run is started in a subprocess through a small wrapper (written below) that counts the file operations made while
the trainer saves a checkpoint (``Trainer.save_checkpoint``: writing it, pointing ``latest`` and ``best`` at it,
pruning the old ones) and SIGKILLs its own process right before operation N of save K. Counted operations:
``open`` (builtin and ``os.open``), ``os.fsync``, ``os.replace``, ``os.rename``, ``os.mkdir``, ``os.unlink``,
``os.rmdir``. The run is then resumed with ``keel train --resume`` and compared with an uninterrupted run: final
weights, every training loss and every validation loss, bitwise (CPU).

One kill point runs by default; every operation of two saves (one in the middle of the run, which also prunes,
and the last one) under ``-m faults``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from safetensors.torch import load_file

from keel import rundir
from keel.cli.main import main
from keel.config import load_config
from keel.rundir.metrics import read_metrics
from keel.train import train

from run_helpers import train_losses  # tests/ (the conftest's folder) is on sys.path

# tests/conftest.py's TINY config (a fixture there, so not importable from a module-scoped fixture)
TINY = ["device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "data.batch_size=8", "data.eval_tokens=4096", "sample.tokens=8", "optimizer.lr=3e-3", "schedule.min_lr=3e-4"]
RUN = ["max_steps=11", "checkpoint_interval=3", "eval_interval=3", "keep_last=2", "model.dropout=0.1",
       "schedule.warmup=2", "data.eval_tokens=1024"]  # saves at steps 3, 6, 9 and 11, evaluations with them
MIDDLE_SAVE, LAST_SAVE = 2, 3  # step 9 (which prunes step 3) and step 11

WRAPPER = '''
import builtins, json, os, signal, sys

from keel.cli.main import main
from keel.train.loop import Trainer

target_save, target_op = int(os.environ["KILL_SAVE"]), os.environ["KILL_OP"]  # a number, or an operation's text
state = {"save": -1, "op": 0, "inside": False, "ops": []}


def counted(name, function):
    def operation(*args, **kwargs):
        if state["inside"] and state["save"] == target_save:
            text = " ".join([name, *(os.path.basename(str(a)) for a in args[:2] if isinstance(a, (str, os.PathLike)))])
            if target_op in (str(state["op"]), text):
                os.kill(os.getpid(), signal.SIGKILL)
            state["ops"].append(text)
            state["op"] += 1
        return function(*args, **kwargs)
    return operation


for name in ("open", "fsync", "replace", "rename", "mkdir", "unlink", "rmdir"):
    setattr(os, name, counted(f"os.{name}", getattr(os, name)))
builtins.open = counted("open", builtins.open)
save_checkpoint = Trainer.save_checkpoint


def counting_save(self):
    state["save"] += 1
    state["inside"] = True
    try:
        return save_checkpoint(self)
    finally:
        state["inside"] = False
        if state["save"] == target_save and os.environ.get("KILL_LOG"):
            with open(os.environ["KILL_LOG"], "w") as log:
                json.dump({"step": self.state.step, "ops": state["ops"]}, log)


Trainer.save_checkpoint = counting_save
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The uninterrupted reference run, the wrapper script, and the overrides of every run."""
    root = tmp_path_factory.mktemp("kill")
    overrides = [*TINY, *RUN]
    reference = root / "reference"
    train(load_config(None, [*overrides, f"out_dir={reference}"]), quiet=True)
    wrapper = root / "kill_during_save.py"
    wrapper.write_text(WRAPPER)
    return root, overrides, reference, wrapper


def run_killed(setup, run: Path, save: int, op: int | str, log: Path | None = None) -> subprocess.CompletedProcess:
    root, overrides, _, wrapper = setup
    env = {**os.environ, "KILL_SAVE": str(save), "KILL_OP": str(op), **({"KILL_LOG": str(log)} if log else {})}
    return subprocess.run([sys.executable, str(wrapper), "train", *overrides, "--out", str(run), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)


def operations_of_save(setup, save: int) -> tuple[int, list[str]]:
    """The step of save ``save`` and its file operations, from a run that is not killed."""
    root = setup[0]
    log = root / f"ops-{save}.json"
    if not log.exists():
        done = run_killed(setup, root / f"count-{save}", save, op=-1, log=log)
        assert done.returncode == 0, done.stderr
    counted = json.loads(log.read_text())
    return counted["step"], counted["ops"]


def newest_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's newest intact checkpoint: what a resume or ``keel average`` reads (not ``latest``,
    a pointer for people, see test_latest_names_the_newest_checkpoint_after_a_resume_with_nothing_left)."""
    newest = rundir.newest_intact(run / rundir.CHECKPOINTS, report=pytest.fail)
    return load_file(str(newest / "model.safetensors"))


def assert_same_run(reference: Path, run: Path) -> None:
    a, b = newest_weights(reference), newest_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the final weights differ"
    assert train_losses(reference) == train_losses(run), "the training losses differ"
    val = [[r["val_loss"] for r in read_metrics(path / rundir.METRICS) if "val_loss" in r] for path in (reference, run)]
    assert val[0] == val[1], "the validation losses differ"


def kill_and_resume(setup, save: int, op: int | str, name: str, before_resume=lambda run: None) -> None:
    """SIGKILL before operation ``op`` of save ``save``, resume with ``keel train --resume``, compare bitwise."""
    run = setup[0] / name
    killed = run_killed(setup, run, save, op)
    assert killed.returncode == -signal.SIGKILL, f"not killed at operation {op} of save {save}: {killed.stderr}"
    before_resume(run)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(setup[2], run)
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())  # the torn write is gone


@pytest.mark.faults
def test_a_save_makes_the_file_operations_counted(setup):
    step, ops = operations_of_save(setup, MIDDLE_SAVE)
    assert step == 9
    names = [op.split()[0] for op in ops]
    assert {"open", "os.fsync", "os.replace", "os.mkdir", "os.unlink", "os.rmdir"} <= set(names)
    assert RENAME in ops
    assert "os.rmdir step_00000003" in ops  # pruning


RENAME = "os.replace .tmp-step_00000009 step_00000009"  # the checkpoint's rename into place


def test_sigkill_before_the_checkpoint_is_renamed_into_place_resumes_bitwise_even_without_config_yaml(setup):
    """Killed as step 9's checkpoint is about to be renamed into place; config.yaml then lost as well: the run
    resumes from step 6 with the config its checkpoint stores, and ends as the uninterrupted run did."""
    def lose_config(run):
        (run / "config.yaml").unlink()

    kill_and_resume(setup, MIDDLE_SAVE, RENAME, "killed-at-rename", before_resume=lose_config)


@pytest.mark.faults
@pytest.mark.parametrize("save", [MIDDLE_SAVE, LAST_SAVE], ids=["middle-save", "last-save"])
def test_sigkill_before_each_file_operation_of_a_save_resumes_bitwise(setup, save, record_property):
    step, ops = operations_of_save(setup, save)
    failed = []
    for op in range(len(ops)):
        try:
            kill_and_resume(setup, save, op, f"killed-{save}-{op}")
        except AssertionError as error:
            failed.append(f"before operation {op} ({ops[op]}): {str(error).splitlines()[0]}")
    record_property("tried", len(ops))
    record_property("passed", len(ops) - len(failed))
    print(f"SIGKILL before each of the {len(ops)} file operations of the save at step {step}: "
          f"{len(ops) - len(failed)} resumed bitwise")
    assert not failed, "\n".join(failed)


@pytest.mark.faults
def test_latest_names_the_newest_checkpoint_after_a_resume_with_nothing_left(setup):
    run = setup[0] / "stale-latest"
    killed = run_killed(setup, run, LAST_SAVE, "os.replace .latest.tmp latest")
    assert killed.returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    newest = rundir.list_checkpoints(run / rundir.CHECKPOINTS)[-1].name
    assert (run / rundir.CHECKPOINTS / rundir.LATEST).read_text().strip() == newest
