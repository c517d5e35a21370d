"""``task: digits``: classify the 8x8 handwritten digits that ship with scikit-learn (no download).

1,797 grey-scale images (``sklearn.datasets.load_digits``, the UCI optical digits test set), pixel values 0-16
scaled to [0, 1]. The train/validation split is a fixed permutation (seed 0, independent of the run's seed, so
runs with different seeds are scored on the same images); ``data.val_fraction`` of the images are held out.

``task_args``: ``classes`` (the digits to keep, in label order; default all ten: ``[5, 6, 7, 8, 9]`` trains a
five-way classifier whose label 0 is the digit 5), ``width`` (channels of the first convolution, default 32) and
``dropout`` (before the head, default 0.1).

The model is a small CNN with two parts named for transfer learning: ``features`` (three 3x3 convolutions with
BatchNorm, 8x8 -> 4x4 -> 2x2) and ``head`` (a linear classifier), so ``optimizer.freeze: [features]`` trains a
new head on frozen features (see docs/transfer.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from keel.errors import KeelError
from keel.tasks.plain import PlainTask
from keel.task_registry import TaskSpec, register_task

SPLIT_SEED = 0


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.1):
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, width), nn.MaxPool2d(2),  # 8x8 -> 4x4
            *conv(width, 2 * width), nn.MaxPool2d(2),  # 4x4 -> 2x2
            *conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_tensors(classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 8, 8)`` in [0, 1] and labels (positions in ``classes``) of the chosen digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KeelError("task: digits needs scikit-learn (pip install scikit-learn); allowed without it: task: lm "
                        "or your own task") from None
    data = load_digits()
    keep = np.isin(data.target, classes)
    lookup = {digit: i for i, digit in enumerate(classes)}
    images = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor([lookup[int(t)] for t in data.target[keep]], dtype=torch.long)
    return images, labels


class DigitsTask(PlainTask):
    name = "digits"

    def __init__(self, classes: Sequence[int] = tuple(range(10)), width: int = 32, dropout: float = 0.1):
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes) or any(
                not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 9 for c in classes):
            raise KeelError(f"task_args.classes: {classes!r}; allowed: distinct digits 0-9, e.g. [0, 1, 2, 3, 4]")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 1024:
            raise KeelError(f"task_args.width: {width!r}; allowed: an int from 1 to 1024")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise KeelError(f"task_args.dropout: {dropout!r}; allowed: a number in [0, 1)")
        self.classes, self.width, self.dropout = classes, width, float(dropout)
        self.num_classes = len(classes)

    def bind(self, config) -> DigitsTask:
        images, labels = load_digits_tensors(self.classes)
        order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
        n_val = max(1, int(round(len(labels) * config.data.val_fraction)))
        val, train = order[:n_val], order[n_val:]
        self.train_data = torch.utils.data.TensorDataset(images[train], labels[train])
        self.val_data = torch.utils.data.TensorDataset(images[val], labels[val])
        self.loss_fn, self.eval_examples, self.model = nn.functional.cross_entropy, None, None
        return super().bind(config)

    def build_model(self) -> nn.Module:
        return DigitsCNN(self.num_classes, self.width, self.dropout)

    def describe(self) -> list[str]:
        shown = "all ten digits" if self.classes == list(range(10)) else f"digits {self.classes}"
        return [f"data: scikit-learn's 8x8 handwritten digits, {shown}; train {len(self.train_data):,} / val "
                f"{len(self.val_data):,} images; chance accuracy {1 / self.num_classes:.3f}, "
                f"initial loss ln({self.num_classes}) = {np.log(self.num_classes):.4f}"]


register_task(TaskSpec("digits", "keel.tasks.digits:DigitsTask", "scikit-learn's 8x8 handwritten digits, a small CNN",
                       context_length=lambda config: None))
