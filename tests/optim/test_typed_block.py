"""The optimizer block is typed once, when the config is validated (its registry record's hyperparameters, defaults
and checks), and handed down: nobody checks it again, reads it raw, or falls back to a value of their own; what a
run resolves from it goes to the run's records, not back into its config."""

import pytest
import yaml

from keel.cli.main import main
from keel.config import load_config, validate
from keel.rundir.metrics import read_metrics
from keel.train import Trainer, train

LION_LR = 1e-4  # the registry's default LR of lion


def test_the_block_is_typed_with_every_default_filled_in():
    import keel.optim as ko

    config = validate({"recipe": "baseline", "task": "digits", "optimizer": {"name": "lion"}})
    assert isinstance(config.optimizer, ko.OptimizerConfig)
    assert config.optimizer.name == "lion" and config.optimizer.lr == ko.get("lion").lr == LION_LR
    assert dict(config.optimizer) == {"name": "lion"}  # config.yaml records the block as given
    assert validate({}).optimizer.momentum == 0.95  # Muon's default, from the registry record


def test_keel_schedule_reads_the_typed_lr_of_a_run_config(tmp_path, capsys):
    """A run config whose optimizer block gives no lr: the optimizer's own default is the peak, as in training."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "digits", "recipe": "baseline", "max_steps": 100,
                                      "optimizer": {"name": "lion"}, "schedule": {"name": "constant"}}))
    assert main(["schedule", str(config), "--no-plot", "--at", "0"]) == 0
    assert float(capsys.readouterr().out.splitlines()[1].split()[1]) == LION_LR


def test_the_trainer_does_not_check_the_block_again(tmp_path, monkeypatch):
    import keel.optim.registry as registry

    config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=2", "lr_scaling.rule=linear",
                                "lr_scaling.base_batch=16", f"out_dir={tmp_path / 'r'}"])
    calls = []
    monkeypatch.setattr(registry, "_check_hparams", lambda *a, **k: calls.append(a) or pytest.fail("checked again"))
    trainer = Trainer(config, quiet=True)
    assert not calls and trainer.optimizer.param_groups[0]["lr"] is not None


def test_lr_scaling_results_go_to_the_runs_records_not_its_config(tmp_path):
    config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=2", "eval_interval=2",
                                "data.batch_size=32", "lr_scaling.rule=linear", "lr_scaling.base_batch=16",
                                f"out_dir={tmp_path / 'r'}"])
    train(config, quiet=True)
    assert config.lr_scaling.model_dump() == {"rule": "linear", "base_batch": 16}  # the input config is untouched
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["lr_scaling"] == {"rule": "linear", "base_batch": 16}
    (record,) = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "run"]
    assert record["global_batch"] == 32 and record["lr_scaling"]["factor"] == 2.0
    assert record["optimizer"] == {"name": "adamw", "lr": 2 * config.optimizer.lr,
                                   "kernels": {"fused": True, "foreach": False}}  # chosen for the CPU
    old = {**saved, "lr_scaling": {"rule": "linear", "base_batch": 16, "global_batch": 32, "factor": 2.0, "lr": 4e-3}}
    assert validate(old).lr_scaling.model_dump() == {"rule": "linear", "base_batch": 16}  # an older config.yaml


def test_an_error_about_the_recipes_optimizer_says_where_it_came_from():
    """Loaded before a plain-PyTorch task is known, the config is the language model's (recipe fast, Muon): an
    error about its optimizer says the optimizer is the recipe's, not the user's."""
    from keel.errors import KeelError

    with pytest.raises(KeelError, match=r"optimizer.lrr: not a hyperparameter of 'muon' \(recipe fast's optimizer\)"):
        load_config(None, ["optimizer.lrr=1e-3"])
    with pytest.raises(KeelError, match=r"optimizer.lrr: not a hyperparameter of 'adamw' \(recipe baseline's"):
        load_config(None, ["task=digits", "optimizer.lrr=1e-3"])
