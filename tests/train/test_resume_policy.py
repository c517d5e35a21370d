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


# ---------------------------------------------------------------------------------------- extending a finished run


@pytest.fixture
def finished_at_zero(tmp_path, tiny_overrides):
    """A finished run of keel's default recipe for lm (fast: Muon, warmup-stable-decay to LR 0)."""
    run = tmp_path / "run"
    default = [item for item in tiny_overrides if not item.startswith(("recipe=", "schedule.", "optimizer."))]
    train(load_config(None, default + ["max_steps=20", "checkpoint_interval=10", "eval_interval=20",
                                       "sample.tokens=0", f"out_dir={run}"]), quiet=True)
    assert load_config(run / "config.yaml").schedule["name"] == "wsd"  # its LR reaches 0 at step 20, the end
    return run


def test_new_decay_extends_a_run_that_ended_at_lr_0_from_the_schedules_peak(finished_at_zero, capsys):
    # what keel diagnose's train_longer recommends: max_steps x2, resume_policy=new_decay
    assert main(["train", "--resume", str(finished_at_zero), "max_steps=40", "resume_policy=new_decay"]) == 0
    out = capsys.readouterr().out
    assert "the LR is 0 at step 20" in out and "restarts from the schedule's peak 2.000e-02" in out
    after = lrs(finished_at_zero)
    assert after[20] == 0.0 and after[21] > 0  # a warmup from the current LR (the schedule's own: 5% = 1 step)
    assert max(after[s] for s in range(20, 40)) == pytest.approx(0.02)
    assert all(after[s] > after[s + 1] for s in range(21, 39)) and after[39] < 0.02 / 100  # down to 0 at 40
    assert load_config(finished_at_zero / "config.yaml").max_steps == 40


def test_new_decay_restarts_from_resume_peak_lr_after_resume_warmup_and_survives_another_resume(
        finished_at_zero, tmp_path):
    import shutil

    assert main(["train", "--resume", str(finished_at_zero), "max_steps=40", "resume_policy=new_decay",
                 "resume_peak_lr=5e-3", "resume_warmup=4", "checkpoint_interval=10", "--quiet"]) == 0
    first = lrs(finished_at_zero)
    assert [first[s] for s in range(20, 25)] == pytest.approx([0.0, 1.25e-3, 2.5e-3, 3.75e-3, 5e-3])
    assert all(first[s] > first[s + 1] for s in range(24, 39))
    again = tmp_path / "again"  # killed after step 30 of the extension: the same schedule is rebuilt
    shutil.copytree(finished_at_zero, again)
    shutil.rmtree(again / "checkpoints" / "step_00000040")
    assert main(["train", "--resume", str(again), "resume_peak_lr=1.0", "--quiet"]) == 0  # the record wins
    assert lrs(again) == first


def test_keep_schedule_refuses_to_train_an_extension_at_lr_0(finished_at_zero, capsys):
    before = (finished_at_zero / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(finished_at_zero), "max_steps=40", "resume_policy=keep_schedule",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would train at LR 0 and change nothing" in err
    assert "resume_policy=new_decay" in err and "the schedule's peak 2.000e-02" in err
    assert (finished_at_zero / "metrics.jsonl").read_bytes() == before


def test_refuse_names_the_peak_new_decay_would_restart_from(finished_at_zero, capsys):
    assert main(["train", "--resume", str(finished_at_zero), "max_steps=40", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "resume_policy=new_decay (a new decay from the schedule's peak 2.000e-02 (the current LR is 0)" in err


def test_a_resume_warmup_as_long_as_the_extension_is_refused(finished_at_zero, capsys):
    assert main(["train", "--resume", str(finished_at_zero), "max_steps=30", "resume_policy=new_decay",
                 "resume_warmup=10", "--quiet"]) == 2
    assert "resume_warmup: 10 is 10 steps, and the extension from step 20 to max_steps 30 has 10" in \
        capsys.readouterr().err


@pytest.mark.parametrize("policy", ["refuse", "keep_schedule", "new_decay"])
def test_extending_a_constant_schedule_changes_nothing_and_is_accepted(tmp_path, tiny_overrides, policy):
    run = tmp_path / "run"
    overrides = [item for item in tiny_overrides if not item.startswith("schedule.")]
    train(load_config(None, overrides + ["schedule.name=constant", "max_steps=20", "checkpoint_interval=10",
                                         "eval_interval=20", "sample.tokens=0", f"out_dir={run}"]), quiet=True)
    assert main(["train", "--resume", str(run), "max_steps=30", f"resume_policy={policy}", "--quiet"]) == 0
    assert set(lrs(run).values()) == {3e-3}
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # finished at its new length: nothing to do


def test_the_messages_name_a_run_length_given_as_a_duration_as_given(tmp_path, tiny_overrides, capsys):
    """40 steps of 256 tokens, then duration 20480tok (80 steps): the messages say duration, not max_steps."""
    run = tmp_path / "run"
    overrides = [item for item in tiny_overrides if not item.startswith("max_steps=")]
    train(load_config(None, overrides + ["duration=10240tok", "checkpoint_interval=20", "eval_interval=40",
                                         "sample.tokens=0", f"out_dir={run}"]), quiet=True)
    assert main(["train", "--resume", str(run), "duration=20480tok", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "duration: 20480tok (80 steps) on resume, but the run was planned for 40 steps" in err
    assert err.rstrip().endswith("or the old duration=40 (steps)") and "max_steps" not in err
    assert main(["train", "--resume", str(run), "duration=20480tok", "resume_policy=keep_schedule"]) == 0
    out = capsys.readouterr().out
    assert "resume_policy keep_schedule: duration 20480tok (40 -> 80 steps); LR at step 39" in out
    assert "max_steps" not in out
