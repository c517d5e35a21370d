"""Plain PyTorch objects as a task: an ``nn.Module``, a map-style dataset (or a batch function) and a loss.

``PlainTask(model, train_data, val_data, loss_fn)`` is what ``keel.train(config, model=..., train_data=...)``
builds, and what a ``task: package.module:factory`` factory may return. Batches are ``(inputs, targets)``:
``loss_fn(model(inputs), targets)`` is averaged over the batch's examples (as torch's losses are by default), and
the task turns it into a sum over examples so accumulation stays exact. Classifiers (2-D outputs, integer
targets of shape ``(batch,)``) also report ``accuracy``.

Training batches come from ``keel.data.IndexSampler`` (an epoch is a seeded permutation; any batch is reproduced
from its index, so runs resume bitwise) and are stacked with torch's ``default_collate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from keel.data import IndexSampler
from keel.errors import KeelError
from keel.grad.accumulate import IGNORE_INDEX
from keel.tasks.base import Task, batch_examples, check_loss, check_model
from keel.timeunits import Time


class DatasetBatches:
    """Deterministic batches of a map-style dataset: the sampler's indices, collated."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, key: str):
        try:
            size = len(dataset)
        except TypeError:
            raise KeelError(f"{key}: a {type(dataset).__name__} has no len(); allowed: a map-style Dataset "
                            "(__len__ and __getitem__) or a function index -> batch") from None
        if size == 0:
            raise KeelError(f"{key}: the dataset is empty; allowed: at least one example")
        self.dataset, self.key = dataset, key
        self.sampler = IndexSampler(size, batch_size, seed)

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> Any:
        return self.collate(self.sampler.indices(index, rank, world_size).tolist())

    def collate(self, indices: Sequence[int]) -> Any:
        try:
            return default_collate([self.dataset[i] for i in indices])
        except (TypeError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0]
            raise KeelError(f"{self.key}: examples do not stack into a batch ({first}); allowed: examples of equal "
                            "shape, each a tensor, number or tuple/dict of them") from None

    def sequential(self, batch_size: int, limit: int | None = None):
        """Consecutive batches from the start (at most ``limit`` examples): a fixed evaluation set."""
        size = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        for first in range(0, size, batch_size):
            yield self.collate(range(first, min(first + batch_size, size)))


def split_inputs_targets(batch: Any, key: str) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"inputs", "targets"} <= batch.keys():
        return batch["inputs"], batch["targets"]
    raise KeelError(f"{key}: a batch is a {type(batch).__name__}"
                    f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; allowed: "
                    "(inputs, targets) or a dict with 'inputs' and 'targets'")


class PlainTask(Task):
    """A task from plain PyTorch objects.

    ``model``: the ``nn.Module`` to train, or a function returning it (called after the run's seed is set, so
    the initialisation follows ``seed``; a module built beforehand keeps the initialisation it has). ``train_data`` / ``val_data``: map-style datasets of
    ``(input, target)`` examples, or functions ``index -> (inputs, targets)`` returning whole batches
    (deterministic in ``index``). ``loss_fn(outputs, targets)``: a scalar averaged over the batch (default:
    cross-entropy). ``eval_examples`` caps the examples of each evaluation (``None``: the whole validation set,
    and a training slice of the same size).
    """

    name = "plain"

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        train_data: Any,
        val_data: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        eval_examples: int | None = None,
        num_classes: int | None = None,
        eval_batches: int = 8,
    ):
        if not isinstance(model, nn.Module) and not callable(model):
            raise KeelError(f"model: a {type(model).__name__}; allowed: a torch.nn.Module or a function returning one")
        self.model = model
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.eval_examples = eval_examples
        self.num_classes = num_classes
        self._eval_batches = eval_batches  # for batch functions: how many batches an evaluation reads

    def bind(self, config) -> PlainTask:
        self.batch_size, self.seed = config.data.batch_size, config.seed
        self._train = self._source(self.train_data, self.seed, "train_data")
        self._val = self._source(self.val_data, self.seed + 1, "val_data") if self.val_data is not None else None
        if isinstance(self._train, DatasetBatches):
            self.batches_per_epoch = self._train.sampler.batches_per_epoch
        return self

    def _source(self, data: Any, seed: int, key: str):
        if callable(data) and not hasattr(data, "__getitem__"):
            return data
        return DatasetBatches(data, self.batch_size, seed, key)

    def build_model(self) -> nn.Module:
        model = self.model if isinstance(self.model, nn.Module) else self.model()
        return check_model(model, "model")

    def epoch(self) -> Time | None:
        """A pass over ``train_data``'s examples. A batch function has no epoch (None: lengths in epochs are refused)
        unless the task sets ``batches_per_epoch`` (then that many batches' examples)."""
        if isinstance(self._train, DatasetBatches):
            return Time(len(self._train.dataset), "example")
        if "batches_per_epoch" in vars(self) or type(self).batches_per_epoch != Task.batches_per_epoch:
            return super().epoch()
        return None

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> Any:
        if isinstance(self._train, DatasetBatches):
            return self._train.batch(index, rank, world_size)
        return self._train(index * world_size + rank)

    def count(self, batch: Any) -> int:
        return batch_examples(split_inputs_targets(batch, "train_data")[1])

    def tokens(self, batch: Any) -> int:
        """The target positions that contribute to the loss: integer targets not equal to the loss's
        ``ignore_index`` (an ``nn.CrossEntropyLoss``'s, else -100, torch's default), every element of floating
        targets. A classifier's ``(batch,)`` labels count one per example; a sequence model's ``(batch, length)``
        targets count each position (a character model's 32 x 64 targets: 2,048)."""
        targets = split_inputs_targets(batch, "train_data")[1]
        if not isinstance(targets, torch.Tensor):
            return batch_examples(targets)
        if targets.is_floating_point() or targets.is_complex():
            return targets.numel()
        return int((targets != getattr(self.loss_fn, "ignore_index", IGNORE_INDEX)).sum())

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._outputs_and_loss(model, batch)[1]

    def _outputs_and_loss(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        inputs, targets = split_inputs_targets(batch, "train_data")
        outputs = model(inputs)
        loss = check_loss(self.loss_fn(outputs, targets), "loss_fn")
        return outputs, loss * batch_examples(targets)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        outputs, loss = self._outputs_and_loss(model, batch)
        sums = {"loss": loss}
        targets = split_inputs_targets(batch, "val_data")[1]
        if (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and isinstance(targets, torch.Tensor)
                and targets.dim() == 1 and not targets.is_floating_point()):
            sums["accuracy"] = (outputs.argmax(dim=1) == targets).sum()
        return sums

    def eval_batches(self, split: str, rank: int = 0, world_size: int = 1):
        source = self._val if split == "val" else self._train
        if source is None:
            return iter(())
        if isinstance(source, DatasetBatches):
            limit = self.eval_examples
            if split == "train" and limit is None and isinstance(self._val, DatasetBatches):
                limit = len(self._val.dataset)
            batches = source.sequential(self.batch_size, limit)
        else:  # a batch function: its first batches (the training ones from the end of its index range)
            start = 0 if split == "val" else 1 << 40
            batches = (source(start + i) for i in range(self._eval_batches))
        return (b for i, b in enumerate(batches) if i % world_size == rank)

    def describe(self) -> list[str]:
        def size(source):
            return f"{len(source.dataset):,} examples" if isinstance(source, DatasetBatches) else "a batch function"

        val = size(self._val) if self._val is not None else "none"
        return [f"data: train {size(self._train)}, validation {val}; batch {self.batch_size}"]
