"""Resume of data-parallel runs: bitwise after SIGKILL of the whole 2-rank job (same world size), bitwise for
FSDP, the documented semantics with another world size, refusals without --allow-world-size-change, and a rank
that dies ending the job with its rank named and the last checkpoint intact."""

import os
import random
import shutil
import subprocess

import pytest
from ddp_helpers import (
    TINY_LM,
    assert_bitwise_same_run,
    assert_same_run,
    cli_main,
    eval_records,
    keel_command,
    keel_in_ranks,
    kill_job_when_step_reached,
    kill_ranks_when_step_reached,
    run_ranks,
    subprocess_env,
    task_modules_importable,  # noqa: F401  (an autouse fixture)
)
from safetensors.torch import load_file

from keel import rundir
from keel.cli.main import main

RESUME = ["max_steps=30", "checkpoint_interval=7", "eval_interval=15", "keep_last=2", "model.dropout=0.1"]


def drop_checkpoints_after(run, step):
    """The run as it was when its checkpoint ``step`` was the newest (what a kill right after it leaves)."""
    root = run / rundir.CHECKPOINTS
    for ckpt in rundir.list_checkpoints(root):
        if rundir.checkpoint_step(ckpt.name) > step:
            shutil.rmtree(ckpt)
    (root / "latest").write_text(rundir.step_dir_name(step) + "\n")
    (run / "model.safetensors").unlink()


def test_sigkill_of_both_ranks_at_random_steps_then_resume_is_bitwise_identical(tmp_path):
    overrides = [*TINY_LM, *RESUME, "ema.enabled=true", "ema.decay=0.9"]  # EMA: written once, by rank 0
    reference = tmp_path / "reference"
    keel_in_ranks(2, "train", *overrides, "--out", str(reference), "--quiet")
    run = tmp_path / "killed"
    seed = int(os.environ.get("KEEL_TEST_SEED", random.randrange(10**6)))  # rerun a failure with this seed
    kills = sorted(random.Random(seed).sample(range(3, 27), 3))
    print(f"KEEL_TEST_SEED={seed}: SIGKILL of both ranks at steps {kills}")
    kill_ranks_when_step_reached(2, ["train", *overrides, "--out", str(run), "--quiet"], run, kills[0])
    for step in kills[1:]:
        kill_ranks_when_step_reached(2, ["train", "--resume", str(run), "--quiet"], run, step)
    keel_in_ranks(2, "train", "--resume", str(run), "--quiet")
    assert_bitwise_same_run(reference, run)
    assert "val_loss_ema" in eval_records(run)[-1]
    ema = load_file(str(run / "checkpoints" / "step_00000030" / "ema.safetensors"))
    assert ema.keys() == load_file(str(run / "model.safetensors")).keys()


@pytest.mark.slow
def test_sigkill_of_the_whole_torchrun_job_then_resume_is_bitwise_identical(tmp_path):
    """The same through ``keel train --nproc 2`` (torchrun's agent and its ranks), killed as a process group."""
    overrides = [*TINY_LM, *RESUME]
    reference = tmp_path / "reference"
    keel_in_ranks(2, "train", *overrides, "--out", str(reference), "--quiet")

    run = tmp_path / "killed"
    seed = int(os.environ.get("KEEL_TEST_SEED", random.randrange(10**6)))  # rerun a failure with this seed
    kills = sorted(random.Random(seed).sample(range(3, 27), 2))
    print(f"KEEL_TEST_SEED={seed}: SIGKILL of the job at steps {kills}")
    kill_job_when_step_reached(keel_command("train", *overrides, "--nproc", "2", "--out", str(run), "--quiet"),
                               run, kills[0])
    kill_job_when_step_reached(keel_command("train", "--resume", str(run), "--nproc", "2", "--quiet"), run, kills[1])
    done = subprocess.run(keel_command("train", "--resume", str(run), "--nproc", "2"), capture_output=True,
                          text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "resumed from step_" in done.stdout and "distributed: 2 ranks (ddp, gloo)" in done.stdout
    assert_bitwise_same_run(reference, run)


@pytest.mark.slow
def test_fsdp_resume_from_a_checkpoint_is_bitwise_identical(tmp_path):
    overrides = [*TINY_LM, "strategy=fsdp", "max_steps=20", "checkpoint_interval=10", "eval_interval=10",
                 "model.dropout=0.1"]
    reference = tmp_path / "reference"
    keel_in_ranks(2, "train", *overrides, "--out", str(reference), "--quiet")
    run = tmp_path / "resumed"
    shutil.copytree(reference, run)
    drop_checkpoints_after(run, 10)
    keel_in_ranks(2, "train", "--resume", str(run), "--quiet")
    assert_bitwise_same_run(reference, run)


def test_another_world_size_is_refused_then_continues_on_the_same_global_batches_when_allowed(tmp_path, capsys):
    overrides = [*TINY_LM, "max_steps=24", "checkpoint_interval=12", "eval_interval=12"]
    two = tmp_path / "two"
    keel_in_ranks(2, "train", *overrides, "--out", str(two), "--quiet")
    run = tmp_path / "changed"
    shutil.copytree(two, run)
    drop_checkpoints_after(run, 12)
    before = (run / "metrics.jsonl").read_bytes()

    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by a run of 2 processes and this is a single process" in err
    assert "--allow-world-size-change" in err
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing lost

    # data.global_batch_size fixes the global batch: one process continues on the very batches two would have seen
    assert main(["train", "--resume", str(run), "--quiet", "--allow-world-size-change"]) == 0
    assert_same_run(two, run)


def test_a_single_process_run_is_not_resumed_by_two_ranks(tmp_path, capsys):
    run = tmp_path / "one"
    assert main(["train", *TINY_LM, "max_steps=4", "schedule.warmup=1", "checkpoint_interval=2", "eval_interval=2",
                 "--out", str(run), "--quiet"]) == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run), "max_steps=6", "--nproc", "2"]) == 2  # refused before launching
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by a run of a single process and this is 2 processes" in err
    assert run_ranks(2, cli_main, "train", "--resume", str(run), "max_steps=6", "--quiet") == [2, 2]  # torchrun
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_naming_it_and_the_last_checkpoint_stays_intact(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        keel_command("train", "task=ddp_tasks:rank_dies", "task_args.at_batch=12", "device=cpu", "threads=1",
                     "max_steps=30", "checkpoint_interval=5", "eval_interval=5", "data.batch_size=8",
                     "schedule.warmup=2",
                     "--nproc", "2", "--out", str(run), "--quiet"),
        capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "keel train: rank 1 was killed by signal SIGKILL" in last, done.stderr
    newest = rundir.newest_intact(run / rundir.CHECKPOINTS, report=pytest.fail)
    assert newest is not None and newest.name == "step_00000010" and rundir.verify(newest) is None
    assert f"the last complete checkpoint is {newest}" in last
