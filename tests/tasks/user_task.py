"""A user's own task, as a module outside keel would define it: named in configs as ``user_task:make``."""

import torch
from torch import nn

from keel.tasks import PlainTask


class TwoLayerNet(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(self.body(x))


def spirals(n: int, seed: int):
    """Three interleaved spirals: 2-D points and their arm (0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    radius = torch.rand(n, generator=g)
    angle = labels * (2 * torch.pi / 3) + radius * 4 + 0.2 * torch.randn(n, generator=g)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return torch.utils.data.TensorDataset(points, labels)


def make(hidden: int = 32, n: int = 600):
    return PlainTask(model=lambda: TwoLayerNet(hidden), train_data=spirals(n, 0), val_data=spirals(n // 4, 1),
                     loss_fn=nn.functional.cross_entropy)


def not_a_task():
    return nn.Linear(2, 3)


def frozen(hidden: int = 8):
    net = TwoLayerNet(hidden).requires_grad_(False)
    return PlainTask(model=net, train_data=spirals(60, 0), val_data=spirals(30, 1))


def wrong_shape():
    """Examples of 3 features for a model that takes 2."""
    data = torch.utils.data.TensorDataset(torch.zeros(40, 3), torch.zeros(40, dtype=torch.long))
    return PlainTask(model=lambda: TwoLayerNet(4), train_data=data, val_data=data)


def vector_loss():
    return PlainTask(model=lambda: TwoLayerNet(4), train_data=spirals(60, 0), val_data=spirals(30, 1),
                     loss_fn=nn.CrossEntropyLoss(reduction="none"))


NOT_CALLABLE = 3


def no_validation(hidden: int = 8):
    """A task without validation data: its evaluations hold train_eval_* only."""
    return PlainTask(model=lambda: TwoLayerNet(hidden), train_data=spirals(60, 0), loss_fn=nn.functional.cross_entropy)
