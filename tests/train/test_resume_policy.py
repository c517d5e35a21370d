"""A resume that changes max_steps never moves the LR silently: refused by default, or a documented policy."""

import pytest

from keel.cli.main import main
from keel.config import load_config
from keel.rundir.metrics import read_metrics
from keel.train import train


def lrs(run):
    return {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"}


@pytest.fixture
def finished(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides + ["max_steps=40", "checkpoint_interval=20", "eval_interval=40",
                                              "sample.tokens=0", f"out_dir={run}"]), quiet=True)
    return run


def test_changing_max_steps_on_resume_is_refused_with_the_jump(finished, capsys):
    before = (finished / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(finished), "max_steps=80", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "planned for 40 steps" in err and "resume_policy=keep_schedule" in err and "new_decay" in err
    assert (finished / "metrics.jsonl").read_bytes() == before
    assert not (finished / "LOCK").exists()


def test_keep_schedule_continues_at_the_final_lr(finished, capsys):
    assert main(["train", "--resume", str(finished), "max_steps=60", "resume_policy=keep_schedule"]) == 0
    assert "LR at step 39 (before the resume point)" in capsys.readouterr().out
    after = lrs(finished)
    assert after[39] > 3e-4
    assert all(after[s] == pytest.approx(3e-4, rel=1e-12) for s in range(40, 60))  # the schedule's end: min_lr


def test_new_decay_starts_from_the_current_lr_and_survives_another_resume(finished, tmp_path, tiny_overrides):
    assert main(["train", "--resume", str(finished), "max_steps=60", "resume_policy=new_decay",
                 "checkpoint_interval=10", "--quiet"]) == 0
    first = lrs(finished)
    assert first[40] == pytest.approx(first[39], rel=0.05)  # no jump at the resume point
    # killed after step 50 of the extended run: resuming it again rebuilds the same schedule
    import shutil

    again = tmp_path / "again"
    shutil.copytree(finished, again)
    shutil.rmtree(again / "checkpoints" / "step_00000060")
    assert main(["train", "--resume", str(again), "--quiet"]) == 0
    assert lrs(again) == first


def test_extending_in_the_middle_of_a_run_is_refused_too(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides + ["max_steps=20", "checkpoint_interval=10", f"out_dir={run}"]),
          quiet=True)
    assert main(["train", "--resume", str(run), "max_steps=30", "--quiet"]) == 2
    assert "move the LR at step 20" in capsys.readouterr().err
