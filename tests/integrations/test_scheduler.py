"""What both trainer adapters rest on, without either trainer: the KeelLRScheduler, building keel's optimizer and
schedule from a config, and the skip (an update without gradients changes no optimizer of the registry)."""

import copy
import io

import pytest
import torch
from torch import nn

from keel import optim
from keel.errors import KeelError
from keel.integrations.scheduler import KeelLRScheduler, make_schedule, optimizer_and_scheduler
from keel.schedules import cosine_decay, warmup


def test_the_lr_of_update_s_is_schedule_s_and_hold_and_rewind_move_the_position():
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = warmup(cosine_decay(1.0, 8), 2)
    scheduler = KeelLRScheduler(optimizer, schedule)
    assert optimizer.param_groups[0]["lr"] == schedule(0) and scheduler.position == 0
    scheduler.step()
    scheduler.hold()  # the next update is skipped: its step() keeps the position
    scheduler.step()
    assert scheduler.position == 1 and optimizer.param_groups[0]["lr"] == schedule(1)
    scheduler.step()
    scheduler.step()
    scheduler.multiplier = 0.5
    scheduler.rewind(1)
    assert optimizer.param_groups[0]["lr"] == 0.5 * schedule(1) and scheduler.get_last_lr() == [0.5 * schedule(1)]
    state = scheduler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = KeelLRScheduler(torch.optim.SGD([param], lr=1.0), schedule)
    other.load_state_dict(torch.load(buffer, weights_only=True))  # plain numbers: safe to load
    assert other.position == 1 and other.optimizer.param_groups[0]["lr"] == 0.5 * schedule(1)
    with pytest.raises(KeelError, match="epoch"):
        scheduler.step(3)


def test_the_scheduler_unfreezes_the_frozen_groups_at_their_step_and_after_a_load():
    """optimizer.unfreeze_at: requires_grad follows the position (built, stepped, held, rewound, loaded)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    config = {"optimizer": {"name": "adamw", "lr": 1e-3, "freeze": ["0.*"], "unfreeze_at": 2}, "max_steps": 10}
    _, scheduler = optimizer_and_scheduler(model, config)

    def frozen() -> bool:
        return not any(p.requires_grad for p in model[0].parameters())

    assert frozen() and all(p.requires_grad for p in model[1].parameters())
    scheduler.step()
    scheduler.hold()
    scheduler.step()
    assert scheduler.position == 1 and frozen()
    scheduler.step()
    assert scheduler.position == 2 and not frozen()
    scheduler.rewind(1)
    assert frozen()
    state = {**scheduler.state_dict(), "last_epoch": 5}
    other_model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    _, other = optimizer_and_scheduler(other_model, config)
    assert not any(p.requires_grad for p in other_model[0].parameters())
    other.load_state_dict(state)  # a resume past the unfreeze step trains the whole network at once
    assert all(p.requires_grad for p in other_model.parameters())


def test_unfreezing_refuses_several_processes(monkeypatch):
    """As keel's trainer: a wrapped data-parallel model would not reduce the gradients of parameters frozen when
    it was wrapped."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(KeelError, match="optimizer.unfreeze_at: not supported with several processes"):
        optimizer_and_scheduler(model, {"optimizer": {"name": "adamw", "freeze": ["0.*"], "unfreeze_at": 2},
                                        "max_steps": 10})
    optimizer_and_scheduler(model, {"optimizer": {"name": "adamw"}, "max_steps": 10})  # nothing to unfreeze: fine


def test_group_ratios_and_a_plateau_schedule():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    scheduler = KeelLRScheduler(optimizer, make_schedule(optimizer, {"name": "plateau", "patience": 0}, 10))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.01])  # the peak is the largest LR
    scheduler.observe(1.0)
    scheduler.observe(2.0)  # no improvement: the LR is cut at once
    assert optimizer.param_groups[0]["lr"] < 0.1 and scheduler.state_dict()["schedule"]


def test_optimizer_and_schedule_from_a_keel_config_mapping():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer, scheduler = optimizer_and_scheduler(model, {"optimizer": {"name": "adamw", "lr": 1e-3},
                                                           "schedule": {"name": "cosine", "warmup": 2},
                                                           "max_steps": 10})
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)  # keel's completion of adamw, as keel train's
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}  # no decay on biases and norms
    assert scheduler.schedule(10) == pytest.approx(1e-4)  # cosine to a tenth of the peak by default
    with pytest.raises(KeelError, match="total_steps: not given"):
        optimizer_and_scheduler(model, {"optimizer": {"name": "adamw", "lr": 1e-3}})
    with pytest.raises(KeelError, match="optimizer.name"):
        optimizer_and_scheduler(model, {"optimizer": {"name": "adamx"}, "max_steps": 10})
    with pytest.raises(KeelError, match="total_steps"):
        make_schedule(optimizer, {"name": "cosine"}, total_steps=float("inf"))


@pytest.mark.parametrize("name", sorted(optim.names()))
def test_an_update_without_gradients_changes_no_registered_optimizer(name):
    """What NonFinite and SpikeRollback rely on to skip an update from a callback: they drop the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = optim.create(name, model, lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for param in model.parameters():
        param.grad = None
    optimizer.step()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert _equal(state, optimizer.state_dict())


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
