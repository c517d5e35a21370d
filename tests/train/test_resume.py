"""Exact resume: SIGKILL at random steps, resume, and compare weights and every logged loss bitwise."""

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from keel.config import load_config
from keel.train import train
from run_helpers import assert_bitwise_equal, keel_train, kill_when_step_reached  # tests/ is on sys.path

RESUME = ["max_steps=60", "checkpoint_interval=7", "eval_interval=20", "keep_last=2", "model.dropout=0.1"]


def kill_at_steps_then_resume(tmp_path: Path, overrides: list[str], seed: int, kills: int = 3) -> None:
    """SIGKILL a run at ``kills`` random steps (drawn with ``seed``), resuming after each; the end must equal an
    uninterrupted run bitwise."""
    reference = tmp_path / "reference"
    train(load_config(None, overrides + [f"out_dir={reference}"]), quiet=True)

    run = tmp_path / "killed"
    steps = sorted(random.Random(seed).sample(range(3, 57), kills))
    print(f"KEEL_TEST_SEED={seed}: SIGKILL at steps {steps}")
    kill_when_step_reached(keel_train(*overrides, "--out", str(run), "--quiet"), run, steps[0])
    for step in steps[1:]:
        kill_when_step_reached(keel_train("--resume", str(run), "--quiet"), run, step)
    done = subprocess.run(keel_train("--resume", str(run)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resumed from step_" in done.stdout
    assert_bitwise_equal(reference, run)


def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(tmp_path, tiny_overrides):
    seed = int(os.environ.get("KEEL_TEST_SEED", random.randrange(10**6)))  # rerun a failure with this seed
    kill_at_steps_then_resume(tmp_path, tiny_overrides + RESUME, seed)


def test_the_fast_recipe_resumes_bitwise_too(tmp_path, tiny_overrides):
    """Muon's state, the WSD schedule and an active sequence-length warmup (32 -> 64 tokens) survive a SIGKILL."""
    fast = ["recipe=fast", "optimizer.lr=2e-2", "optimizer.adam_lr=3e-3", "model.block_size=64"]
    kill_at_steps_then_resume(tmp_path, tiny_overrides + RESUME + fast, seed=7, kills=1)


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11, 22, 33, 44, 55])
def test_sigkill_at_random_steps_matrix(tmp_path, tiny_overrides, seed):
    """The full matrix: five runs with three kills each at steps drawn from fixed seeds (15 kills)."""
    kill_at_steps_then_resume(tmp_path, tiny_overrides + RESUME, seed)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_overrides):
    overrides = tiny_overrides + RESUME
    reference = tmp_path / "reference"
    train(load_config(None, overrides + [f"out_dir={reference}"]), quiet=True)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = subprocess.run(keel_train("--resume", str(run)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {newest.name} is corrupt (model.safetensors has" in done.stdout
    assert "using step_00000056" in done.stdout
    assert "resumed from step_00000056" in done.stdout
    assert_bitwise_equal(reference, run)


def test_resume_with_no_intact_checkpoint_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    from keel.cli.main import main

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides + ["max_steps=5", "schedule.warmup=1", "checkpoint_interval=5", f"out_dir={run}"]), quiet=True)
    for manifest in run.glob("checkpoints/step_*/manifest.json"):
        manifest.unlink()
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "holds no intact checkpoint" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before
