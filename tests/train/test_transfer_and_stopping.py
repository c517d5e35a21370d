"""init_from (transfer learning) and early stopping, on the digits task; exact resume for digits and a user task."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel.cli.main import main
from keel.config import load_config
from keel.train import train

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
FIVE = ["task=digits", "device=cpu", "threads=1", "eval_interval=50", "checkpoint_interval=50", "data.batch_size=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "digits04"
    train(load_config(None, FIVE + ["max_steps=100", "task_args.classes=[0,1,2,3,4]", f"out_dir={run}"]), quiet=True)
    return run


def test_init_from_a_run_loads_every_weight_strictly(pretrained, tmp_path, capsys):
    config = load_config(None, FIVE + ["max_steps=1", "optimizer.lr=1e-12", "task_args.classes=[5,6,7,8,9]",
                                       f"init_from={pretrained}", f"out_dir={tmp_path / 'r'}"])
    train(config)
    assert "init_from: loaded 20 of 20 weights" in capsys.readouterr().out
    mine = load_file(str(tmp_path / "r" / "model.safetensors"))
    theirs = load_file(str(pretrained / "model.safetensors"))
    for key in (k for k in theirs if "running" not in k and "num_batches" not in k):  # parameters: ~unchanged
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_a_new_head_needs_strict_false_and_is_reported(pretrained, tmp_path, capsys):
    ten = FIVE + ["max_steps=1", f"init_from={pretrained}"]
    assert main(["train", *ten, "--out", str(tmp_path / "strict"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch: head.1.bias (5,) vs (10,), head.1.weight (5, 64) vs (10, 64)" in err
    assert "init_from_strict: false" in err
    assert not (tmp_path / "strict").exists()
    train(load_config(None, ten + ["init_from_strict=false", f"out_dir={tmp_path / 'loose'}"]))
    out = capsys.readouterr().out
    assert "loaded 18 of 20 weights" in out and "head.1.weight" in out


def test_frozen_features_with_a_fresh_head(pretrained, tmp_path):
    config = load_config(None, FIVE + ["max_steps=20", "task_args.classes=[5,6,7,8,9]", f"init_from={pretrained}",
                                       "init_from_exclude=[head]", "optimizer.freeze=[features]",
                                       f"out_dir={tmp_path / 'r'}"])
    train(config, quiet=True)
    mine = load_file(str(tmp_path / "r" / "model.safetensors"))
    theirs = load_file(str(pretrained / "model.safetensors"))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k.startswith("features") and "running" not in k
               and "num_batches" not in k)
    assert not torch.equal(mine["head.1.weight"], theirs["head.1.weight"])


def test_early_stopping_ends_the_run_and_exports_the_best_weights(tmp_path):
    run = tmp_path / "r"
    config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=400", "eval_interval=10",
                                "checkpoint_interval=1000", "optimizer.lr=3e-2", "schedule.warmup=0",
                                "early_stopping.metric=val_accuracy", "early_stopping.mode=max",
                                "early_stopping.patience=2", "early_stopping.min_delta=0.5", f"out_dir={run}"])
    result = train(config, quiet=True)
    evals = [r for r in result["history"] if "val_accuracy" in r]
    # min_delta 0.5 accuracy: nothing after the first evaluation counts as an improvement
    assert result["step"] == 30 and [r["step"] for r in evals] == [10, 20, 30]
    assert result["best_step"] == 10 and result["stopped_early"]
    assert result["best_val_accuracy"] == evals[0]["val_accuracy"]
    best = (run / "checkpoints" / "best").read_text().strip()
    assert best == "step_00000010"
    exported = load_file(str(run / "model.safetensors"))
    kept = load_file(str(run / "checkpoints" / best / "model.safetensors"))
    assert all(torch.equal(exported[k], kept[k]) for k in kept)


def test_finding_the_evaluation_keys_puts_every_generator_back():
    """Early stopping's check runs the task's evaluation once: a task that draws from Python's, NumPy's or torch's
    generator there leaves the training streams as they were."""
    import contextlib
    import random
    from types import SimpleNamespace

    import numpy as np

    from keel.train.early_stopping import evaluation_keys

    class Drawing:
        def eval_batches(self, split, rank, world_size):
            return [torch.zeros(2, 3)]

        def eval_sums(self, model, batch):
            noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
            return {"loss": model(batch).sum() * 0 + noise}

    trainer = SimpleNamespace(model=torch.nn.Linear(3, 1), device=torch.device("cpu"), task=Drawing(),
                              precision=SimpleNamespace(autocast=contextlib.nullcontext))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert evaluation_keys(trainer) == {"val_loss", "train_eval_loss"}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_early_stopping_reads_the_evaluation_after_the_averages_whatever_was_imported_first():
    """Its callback comes after the averages' (which add val_loss_ema to the record) even where its module was
    imported before the techniques were discovered (a fresh interpreter: the registry fills on first use)."""
    import sys

    code = ("import keel.train.early_stopping\n"
            "from keel.config import load_config\n"
            "from keel.techniques import make_callbacks\n"
            "config = load_config(None, ['task=digits', 'ema.enabled=true', 'early_stopping.patience=2', "
            "'early_stopping.metric=val_loss_ema'])\n"
            "print(*[callback.name for callback in make_callbacks(config)])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ema", "early_stopping"]


def _kill_and_resume(tmp_path, overrides, kill_at, env=None):
    """A reference run in-process; the same run SIGKILLed at ``kill_at`` and resumed: bitwise equal."""
    from run_helpers import assert_bitwise_equal, keel_train, kill_when_step_reached

    reference = tmp_path / "reference"
    train(load_config(None, overrides + [f"out_dir={reference}"]), quiet=True)
    run = tmp_path / "killed"
    kill_when_step_reached(keel_train(*overrides, "--out", str(run), "--quiet"), run, kill_at, env=env)
    done = subprocess.run(keel_train("--resume", str(run)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from step_" in done.stdout
    assert_bitwise_equal(reference, run)


def test_sigkill_then_resume_is_bitwise_for_digits(tmp_path):
    overrides = ["task=digits", "device=cpu", "threads=1", "max_steps=300", "checkpoint_interval=37",
                 "eval_interval=100", "task_args.dropout=0.3"]
    _kill_and_resume(tmp_path, overrides, 100)


def test_sigkill_then_resume_is_bitwise_for_a_user_task(tmp_path, monkeypatch):
    import os

    monkeypatch.syspath_prepend(str(TASKS_DIR))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")])}
    overrides = ["task=user_task:make", "device=cpu", "threads=1", "max_steps=1000", "checkpoint_interval=41",
                 "eval_interval=500", "data.batch_size=8"]
    _kill_and_resume(tmp_path, overrides, 300, env=env)
