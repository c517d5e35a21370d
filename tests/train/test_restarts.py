"""restarts: N: a diverged run starts again with a new seed, each failed attempt kept in the run directory."""

import json

import pytest
import yaml
from torch import nn

from keel.cli.main import main
from keel.config import load_config
from keel.errors import TrainingUnstableError
from keel.rundir.metrics import read_metrics
from keel.train import Callback, train

RUN = ["task=digits", "device=cpu", "threads=1", "max_steps=12", "eval_interval=6", "checkpoint_interval=6",
       "nonfinite.max_consecutive_skips=2"]


class DivergeWithSeeds(Callback):
    """Makes every gradient infinite from step 3 on when the run's seed is one of ``seeds``: the run stops."""

    name = "diverge"

    def __init__(self, seeds):
        self.seeds = set(seeds)

    def on_after_backward(self, trainer):
        if trainer.config.seed in self.seeds and trainer.state.step >= 3:
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))


def test_a_diverged_run_starts_again_with_a_new_seed(tmp_path, capsys):
    run = tmp_path / "run"
    result = train(load_config(None, RUN + ["restarts=2", f"out_dir={run}"]), callbacks=[DivergeWithSeeds({1337})])
    out = capsys.readouterr().out
    assert result["step"] == 12 and "restart 1 of 2: the run diverged at step 3 with seed 1337" in out
    assert [(r["attempt"], r["seed"], r["step"]) for r in result["restarts"]] == [(1, 1337, 3)]
    assert "consecutive updates skipped" in result["restarts"][0]["reason"]
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1338
    assert not any(r.get("event") == "stopped" for r in read_metrics(run / "metrics.jsonl"))
    failed = run / "restarts" / "attempt_1_seed_1337"
    assert yaml.safe_load((failed / "config.yaml").read_text())["seed"] == 1337
    assert [r["step"] for r in read_metrics(failed / "metrics.jsonl") if r.get("event") == "stopped"] == [3]
    assert (failed / "loss.png").is_file() and (run / "model.safetensors").is_file()
    lines = (run / "restarts" / "restarts.jsonl").read_text().splitlines()
    assert [json.loads(line)["folder"] for line in lines] == ["attempt_1_seed_1337"]


def test_restarts_used_up_end_the_run_and_say_where_the_attempts_are(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingUnstableError, match=r"restarts: 1 used up \(the earlier attempts are in "):
        train(load_config(None, RUN + ["restarts=1", f"out_dir={run}"]), callbacks=[DivergeWithSeeds({1337, 1338})],
              quiet=True)
    assert (run / "restarts" / "attempt_1_seed_1337").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1338  # the last attempt stays in place


def test_the_divergence_message_says_how_to_restart(tmp_path):
    with pytest.raises(TrainingUnstableError, match=r"set restarts: N \(docs/stability.md\)"):
        train(load_config(None, RUN + [f"out_dir={tmp_path / 'run'}"]), callbacks=[DivergeWithSeeds({1337})],
              quiet=True)


def test_a_model_built_before_train_starts_each_attempt_from_its_initial_weights(tmp_path):
    import torch

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Record(Callback):
        name = "record"

        def on_run_start(self, trainer):
            seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    config = load_config(None, ["device=cpu", "threads=1", "max_steps=8", "eval_interval=4", "checkpoint_interval=4",
                                "nonfinite.max_consecutive_skips=2", "restarts=1", "data.batch_size=16",
                                f"out_dir={tmp_path / 'run'}"])
    result = train(config, model=model, train_data=data, val_data=data, quiet=True,
                   callbacks=[Record(), DivergeWithSeeds({1337})])
    assert len(result["restarts"]) == 1 and len(seen) == 2
    assert all(torch.equal(seen[1][k], initial[k]) for k in initial)


def test_keel_train_restarts_from_the_command_line(tmp_path, capsys):
    # without a divergence, restarts change nothing: the run trains once
    assert main(["train", *RUN, "restarts=3", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert not (tmp_path / "run" / "restarts").exists()
