"""What the Lightning and Hugging Face tests share: one tiny float64 regression, its batches, and the keel run
they are compared with (``keel.train`` on the same model, data order and settings, device cpu)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from keel import rundir
from keel.config import validate
from keel.rundir.metrics import read_metrics
from keel.safetensors_io import SafetensorsReader

BATCH = 8
TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64)


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``index``: a function of the index alone, so every trainer sees the same data in one order."""
    g = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    return x, x @ TRUE_W + 0.1 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64)


class Batches(torch.utils.data.Dataset):
    """Item i is the whole batch i (DataLoader(..., batch_size=None) hands them out in order)."""

    def __init__(self, count: int, start: int = 0):
        self.count, self.start = count, start

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        return batch(self.start + i)


class ResumableBatches:
    """Batches 0..count-1 each epoch, with the ``state_dict``/``load_state_dict`` of a resumable loader: Lightning
    saves the position in its checkpoints and a resume continues from the batch after it, mid-epoch."""

    def __init__(self, count: int):
        self.count, self.position, self._resume_at = count, 0, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        for i in range(start, self.count):
            self.position = i + 1
            yield batch(i)
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = int(state["position"])


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def keel_config(steps: int, out_dir, **blocks) -> object:
    raw = {"recipe": "baseline", "max_steps": steps, "device": "cpu", "threads": 1, "data": {"batch_size": BATCH},
           "optimizer": {"name": "adamw", "lr": 0.05}, "schedule": {"name": "cosine", "warmup": 3, "min_lr": 0.0},
           "clip": {"mode": "norm", "max_norm": 1.0}, "eval_interval": steps, "checkpoint_interval": steps,
           "log_interval": 1, "out_dir": str(out_dir), **blocks}
    return validate(raw)


def keel_run(config, net: nn.Module) -> dict:
    """Train ``net`` (a copy) with keel's own trainer; return the LR of every step and the final EMA (None without
    one) and weights."""
    from keel.train import train

    model = copy.deepcopy(net)
    train(config, model=model, train_data=batch, val_data=batch, loss_fn=nn.functional.mse_loss, quiet=True)
    run = rundir.RunDir(config.out_dir)
    records = read_metrics(run.metrics)
    lrs = [r["lr"] for r in records if r.get("kind") == "step" and "lr" in r]
    last = rundir.list_checkpoints(run.checkpoints)[-1]
    ema = None
    if rundir.checkpoint_weights(last, "ema").is_file():
        with SafetensorsReader(rundir.checkpoint_weights(last, "ema")) as reader:
            ema = {name: reader.read(name) for name in reader.tensors}
    return {"lrs": lrs, "ema": ema, "weights": [p.detach().clone() for p in model.parameters()], "records": records}


def assert_close_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Equal within float64 rounding (rel 1e-10, abs 1e-12): the two trainers compute the same float64 loss,
    gradients, update and average, up to the order of a few summations."""
    assert sorted(got) == sorted(prefix + k for k in expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[prefix + name].double(), value.double(), rtol=1e-10, atol=1e-12)


UNFREEZE_AT = 3
FROZEN_OPTIMIZER = {"name": "adamw", "lr": 0.05, "freeze": ["0.*"], "unfreeze_at": UNFREEZE_AT}  # the first layer


def assert_trains_from_the_unfreeze_step(first_layer: list[torch.Tensor], initial: torch.Tensor) -> None:
    """``first_layer[s]``: the frozen layer's weight after update ``s``; it stays as it was through the updates
    before ``UNFREEZE_AT`` and changes with every update from it (keel's trainer: update ``unfreeze_at`` is the first
    that trains it)."""
    for step, weight in enumerate(first_layer):
        before = initial if step == 0 else first_layer[step - 1]
        assert torch.equal(weight, before) == (step < UNFREEZE_AT), step
