"""optimizer.freeze with optimizer.unfreeze_at: the head first on frozen features, then the whole network, in one
run; exact for every registered optimizer, and bitwise across a resume at the unfreeze point."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from keel import optim
from keel.config import load_config
from keel.errors import KeelError
from keel.optim import unfreeze
from keel.rundir.metrics import read_metrics
from keel.train import train

from run_helpers import StopAt  # tests/ (the conftest's folder) is on sys.path


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _settings(group):
    return {k: v for k, v in group.items() if k not in ("params", "param_names", "unfreeze_at")}


@pytest.mark.parametrize("name", list(optim.names()))
def test_frozen_parameters_are_untouched_until_the_step_then_train_with_their_groups_settings(name):
    model = _model()
    optimizer = optim.create(name, model, freeze=["0."], unfreeze_at=3, total_steps=10)
    frozen = [model[0].weight, model[0].bias]
    start = [p.detach().clone() for p in frozen]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for step in range(6):
        unfreeze(optimizer, step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step < 3:  # no update, no weight decay, no optimizer state
            assert all(torch.equal(p, s) for p, s in zip(frozen, start)), step
            assert all(not optimizer.state.get(p) for p in frozen), step
    assert all(not torch.equal(p, s) for p, s in zip(frozen, start))
    if any(optimizer.state.get(p) for p in model[4].parameters()):  # an optimizer with state (not plain SGD)
        assert all(optimizer.state.get(p) for p in frozen)
    # their groups have the settings they would have had unfrozen
    reference = optim.create(name, _model(), total_steps=10)
    by_name = {n: _settings(g) for g in reference.param_groups for n in g["param_names"]}
    for group in optimizer.param_groups:
        for param_name in group["param_names"]:
            settings = _settings(group)
            assert settings == by_name[param_name], param_name
            assert ("unfreeze_at" in group) == param_name.startswith("0.")


def test_unfreeze_at_needs_something_frozen():
    with pytest.raises(KeelError, match="optimizer.unfreeze_at: 10 is given but nothing is frozen"):
        load_config(None, ["task=digits", "optimizer.unfreeze_at=10"])
    with pytest.raises(KeelError, match="optimizer.unfreeze_at"):
        load_config(None, ["task=digits", "optimizer.freeze=[features]", "optimizer.unfreeze_at=later"])


DIGITS = ["task=digits", "device=cpu", "threads=1", "max_steps=20", "eval_interval=5", "checkpoint_interval=5",
          "keep_last=10",
          "optimizer.freeze=[features]", "optimizer.unfreeze_at=50%"]


def _parameters(weights):
    return {k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k}


def test_the_head_trains_first_then_the_whole_network(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, DIGITS + [f"out_dir={run}"]), quiet=True)
    at = {s: load_file(str(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors")) for s in (5, 10, 15)}
    features = [k for k in _parameters(at[5]) if k.startswith("features")]
    assert features and all(torch.equal(at[5][k], at[10][k]) for k in features)  # frozen for steps 0..9
    assert not torch.equal(at[5]["head.1.weight"], at[10]["head.1.weight"])
    assert all(not torch.equal(at[10][k], at[15][k]) for k in features)  # unfrozen from step 10 (50% of 20)
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "unfreeze"]
    assert [(r["step"], r["parameters"]) for r in events] == [(10, len(features))]
    state = torch.load(run / "checkpoints" / "step_00000010" / "state.pt", weights_only=True)["optimizer"]
    assert len(state["state"]) == 2  # only the head's weight and bias have optimizer state before the unfreeze


def test_a_resume_across_the_unfreeze_point_is_bitwise(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(load_config(None, DIGITS + [f"out_dir={reference}"]), quiet=True)
    train(load_config(None, DIGITS + [f"out_dir={resumed}"]), callbacks=[StopAt(3)], quiet=True)
    train(load_config(None, DIGITS + [f"out_dir={resumed}"]), run_dir=resumed, resume=True, quiet=True)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [[{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run / "metrics.jsonl")
              if "grad_norm" in r or "event" in r] for run in (reference, resumed)]  # the stop added an evaluation
    assert strip[0] == strip[1]
