"""A config changed after loading keeps the user's values: assignment is validated, one run length replaces the
other, and ``train(config, model=...)`` rebuilds it for the object's task without losing a value the user set."""

import pytest
import torch
import yaml
from torch import nn

from keel.config import dump_config, load_config, validate
from keel.errors import KeelError
from keel.train import train

DATA = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)),
                                      torch.arange(64) % 2)


def recorded(run):
    return yaml.safe_load((run / "config.yaml").read_text())


def test_values_assigned_after_loading_survive_a_model_passed_in(tmp_path):
    """max_steps and data.batch_size set by assignment are the run's (it trained 600 steps of 32 before)."""
    config = load_config(None, ["device=cpu", "threads=1", f"out_dir={tmp_path / 'r'}"])
    config.max_steps = 3
    config.data.batch_size = 8
    result = train(config, model=nn.Linear(4, 2), train_data=DATA, val_data=DATA, quiet=True)
    assert result["step"] == 3 and result["examples"] == 24
    written = recorded(tmp_path / "r")
    assert (written["max_steps"], written["data"]["batch_size"], written["task"]) == (3, 8, "python")
    assert written["recipe"] == "baseline" and written["optimizer"]["name"] == "adamw"  # the recipe follows the task


def test_for_task_keeps_what_was_given_assigned_or_copied_and_lets_the_recipe_follow():
    config = load_config(None, ["optimizer.lr=1e-2", "schedule.warmup=7"])
    config.seed = 5
    config.grad_accum = 2
    copied = config.model_copy(update={"keep_last": 9})
    python = copied.for_task("python")
    assert (python.seed, python.grad_accum, python.keep_last, python.optimizer["lr"]) == (5, 2, 9, 1e-2)
    assert python.recipe == "baseline" and python.optimizer["name"] == "adamw"  # not lm's fast (muon, wsd)
    assert python.schedule["name"] == "cosine" and python.schedule["warmup"] == 7
    assert "model" not in python.model_dump() and "sample" not in python.model_dump()  # lm's own blocks
    config.schedule = {"name": "multistep", "milestones": [100, 200]}  # another schedule: the user's, whole
    assert config.for_task("python").schedule == {"name": "multistep", "milestones": [100, 200]}
    config.optimizer = {"name": "muon", "lr": 0.02, "adam_lr": 2e-3}  # as the recipe had it, but assigned
    assert config.for_task("python").optimizer["name"] == "muon"


def test_a_config_naming_another_task_gives_way_to_the_object(tmp_path, capsys):
    """A config that says task: lm (every lm run's config.yaml does) with a model passed in trains the model as
    task python, with python's recipe unless the config names one, and says so in one line."""
    config = validate({"task": "lm", "device": "cpu", "threads": 1, "max_steps": 2, "data": {"batch_size": 8},
                       "model": {"n_layer": 1}, "out_dir": str(tmp_path / "r")})
    train(config, model=nn.Linear(4, 2), train_data=DATA, val_data=DATA)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert lines == ["train: the model passed in replaces the config's task 'lm' (the run records task: python; "
                     "that task's own settings are dropped)"]
    written = recorded(tmp_path / "r")
    assert (written["task"], written["recipe"], written["optimizer"]["name"]) == ("python", "baseline", "adamw")
    assert "model" not in written and "source" not in written["data"] and written["data"]["batch_size"] == 8


def test_setting_the_run_length_one_way_clears_the_other(tmp_path):
    config = load_config(None, ["task=digits"])
    config.duration = "0.05ep"
    assert config.max_steps is None and str(config.duration) == "0.05ep"
    written = yaml.safe_load(dump_config(config))
    assert written["max_steps"] is None and validate(written).duration == "0.05ep"  # what --resume reads back
    config.max_steps = 7
    assert (config.max_steps, config.duration) == (7, None)
    config.duration = 30  # in steps: max_steps
    assert (config.max_steps, config.duration) == (30, None)


def test_a_refused_assignment_is_one_keel_error_and_changes_nothing():
    config = load_config(None, ["task=digits", "max_steps=30"])
    before = config.model_dump()
    with pytest.raises(KeelError) as error:
        config.schedule = {"name": "cosine", "warmup": 50}
    assert str(error.value) == ("schedule.warmup: 50 (50 steps) is at or beyond the run length (30 steps); the "
                                "warmup must end before the run does")
    with pytest.raises(KeelError, match=r"^max_steps: Input should be greater than or equal to 1 \(got 0\)$"):
        config.max_steps = 0
    assert config.model_dump() == before
    config = load_config(None, ["task=digits", "max_steps=30", "schedule.warmup=20"])
    with pytest.raises(KeelError, match=r"^schedule\.warmup: 20 \(20 steps\) is at or beyond the run length \(10 "):
        config.duration = "10"
    assert (config.max_steps, config.duration) == (30, None)  # the run length it cleared is back
