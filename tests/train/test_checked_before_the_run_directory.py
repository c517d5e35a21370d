"""Bad input keel train can only find once the task is built is still found before the run directory is made (an
early-stopping metric the evaluations lack, early stopping without validation data, sequence warmup on a task
without sequences); what can only fail later leaves nothing in a new run's directory without a checkpoint, so the
corrected command runs again with the same --out."""

from pathlib import Path

import pytest
from fault_helpers import keel_train

DIGITS = ["task=digits", "max_steps=10", "eval_interval=5", "checkpoint_interval=5", "threads=1", "--quiet"]


@pytest.fixture(autouse=True)
def user_tasks(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tasks"))


@pytest.mark.parametrize("argv, said", [
    (["early_stopping.patience=2", "early_stopping.metric=val_los"],
     "early_stopping.metric: 'val_los' is not in the evaluation record; allowed: train_eval_accuracy, "
     "train_eval_loss, val_accuracy, val_loss"),
    (["task=user_task:no_validation", "early_stopping.patience=2"],
     "early_stopping.metric: 'val_loss' needs validation data, and task 'user_task:no_validation' has none"),
    (["task=user_task:make", "seq_warmup.enabled=true"], "seq_warmup.enabled: task 'user_task:make' has no block_size"),
    (["task=user_task:make", "seq_warmup.enabled=auto"], None),  # auto: off for a task without sequences
    (["early_stopping.patience=2", "early_stopping.metric=val_loss_ema", "ema.enabled=true"], None),
    (["early_stopping.patience=2", "early_stopping.metric=train_eval_accuracy", "early_stopping.mode=max"], None),
])
def test_found_before_the_run_directory_is_made(tmp_path, argv, said):
    run = tmp_path / "run"
    code, err = keel_train(*DIGITS, *argv, "--out", str(run))
    if said is None:
        assert code == 0, err
        return
    assert code == 2 and said in err and err.count("\n") == 1
    assert not run.exists()


def test_a_late_error_of_a_new_run_leaves_nothing_so_the_corrected_command_runs_in_the_same_directory(tmp_path):
    run = tmp_path / "run"
    code, err = keel_train(*DIGITS, "ema.enabled=true", "ema.every=1%", "--out", str(run))  # 1% of 10 steps: 0
    assert code == 2 and "ema.every: '1%' resolves to 0 steps" in err and err.count("\n") == 1
    assert f"nothing was kept in '{run}'" in err and not run.exists()
    assert keel_train(*DIGITS, "ema.enabled=true", "--out", str(run)) == (0, "")


def test_a_late_error_in_a_directory_that_existed_removes_only_what_the_run_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    code, err = keel_train(*DIGITS, "ema.enabled=true", "ema.every=1%", "--out", str(run))
    assert code == 2 and sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert keel_train(*DIGITS, "--out", str(run))[0] == 0


def test_a_late_error_after_a_checkpoint_keeps_the_run_to_resume(tmp_path):
    from keel import rundir

    run = tmp_path / "run"
    assert keel_train(*DIGITS, "max_steps=5", "--out", str(run))[0] == 0
    code, err = keel_train("--resume", str(run), "max_steps=10", "resume_policy=keep_schedule", "ema.enabled=true",
                           "ema.every=1%", "--quiet")
    assert code == 2 and "nothing was kept" not in err
    assert rundir.list_checkpoints(run / rundir.CHECKPOINTS)


def test_a_late_error_after_a_snapshot_removes_the_snapshots_too(tmp_path):
    """Snapshots are part of a run (a new run is refused beside them): a new run that fails after writing one, but
    before its first checkpoint, removes them with the rest, so the corrected command runs in the same folder."""
    from keel.config import load_config
    from keel.errors import KeelError
    from keel.techniques import Callback
    from keel.train import train

    class FailsAtStep3(Callback):
        name = "fails_at_step_3"

        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                raise KeelError("late: bad input found at step 3")

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=6", "checkpoint_interval=4",
                                "snapshot.enabled=true", "snapshot.cycle=2", f"out_dir={run}"])
    with pytest.raises(KeelError, match=f"late: bad input found at step 3 \\(nothing was kept in '{run}'"):
        train(config, callbacks=[FailsAtStep3()], quiet=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert train(config, quiet=True)["step"] == 6
