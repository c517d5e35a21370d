"""The diagnostics technique: ||ΔW||/||W|| per weight, logged every N updates, off by default."""

import pytest
import torch

from keel.config import load_config
from keel.diagnose.update_ratio import UpdateRatio
from keel.errors import KeelError
from keel.rundir.metrics import read_metrics
from keel.train import train


def test_unit_ratio_is_exact():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    unit = UpdateRatio()
    unit.snapshot(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.add_(0.01)
    ratios = unit.ratios(model.named_parameters())
    assert set(ratios) == {"0.weight", "1.weight"}  # biases (1-D) are not measured
    with torch.no_grad():
        expected = float((model[0].weight - before["0.weight"]).norm() / model[0].weight.norm())
    assert ratios["0.weight"] == pytest.approx(expected, rel=1e-6)
    assert ratios["1.weight"] == 0.0
    assert unit.ratios(model.named_parameters()) == {}  # one measurement per snapshot
    unit.snapshot(model.named_parameters())  # reuses its buffers
    with torch.no_grad():
        model[1].weight.mul_(2.0)
    assert unit.ratios(model.named_parameters())["1.weight"] == pytest.approx(0.5, rel=1e-6)


def test_trainer_logs_ratios_every_n_updates(tmp_path, tiny_overrides):
    config = load_config(None, [*tiny_overrides, "max_steps=12", "eval_interval=12", "sample.tokens=0",
                                "diagnostics.update_ratio_every=5", f"out_dir={tmp_path / 'run'}"])
    train(config, quiet=True)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "diagnostic"]
    assert [r["step"] for r in records] == [0, 5, 10]
    assert all(r["diagnostic"] == "update_ratio" for r in records)
    assert "blocks.0.attn.qkv.weight" in records[1]["ratios"]
    assert all(v >= 0 for r in records for v in r["ratios"].values())
    assert records[1]["ratios"]["blocks.0.attn.qkv.weight"] > 0


def test_off_by_default_and_validated(tmp_path, tiny_overrides):
    config = load_config(None, [*tiny_overrides, "max_steps=12", "eval_interval=12", "sample.tokens=0",
                                f"out_dir={tmp_path / 'run'}"])
    assert config.diagnostics.update_ratio_every is None
    train(config, quiet=True)
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "diagnostic"]
    with pytest.raises(KeelError, match="diagnostics.update_ratio_every"):
        load_config(None, ["diagnostics.update_ratio_every=0"])
