"""The task: the one owner of everything model- and data-specific, so the trainer need not know what it trains.

A task builds the model, hands out training batches by index (deterministic and resumable: batch ``i`` depends
only on the seed and ``i``), counts what a batch's loss sums over, computes that summed loss, and names the
batches its evaluations run on. The trainer, checkpoint averaging (``keel average --eval``) and ensembles
(``keel ensemble``) go through this interface alone.

The loss is a sum plus a count, both known per micro-batch, so gradient accumulation and data parallelism divide
once by the global count and match one large batch exactly (a mean per micro-batch would weight short ones more).

Composer's ``ComposerModel`` and Lightning's ``LightningModule`` likewise put forward, loss and metrics on one
object; keel keeps it to the few methods the loop calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from keel.errors import KeelError
from keel.timeunits import Time

__all__ = ["Task", "batch_examples", "move_to_device"]


class Task:
    """Base class of keel's tasks; subclass it, or wrap plain PyTorch objects with ``keel.tasks.PlainTask``.

    Methods a task must provide: ``build_model``, ``train_batch``, ``count``, ``loss``, ``eval_batches`` and the
    ``batches_per_epoch`` attribute. The rest have defaults.

    What the trainer's clock counts comes from the task: ``examples(batch)`` and ``tokens(batch)`` of every batch
    trained on (the target positions that contribute to the loss), summed over ranks.
    """

    name: str = "task"
    batches_per_epoch: int = 1
    #: Whether ``batch_counts`` changes from one index to the next (the language model's length buckets); if not,
    #: lengths in tokens and examples resolve in closed form.
    batch_counts_vary: bool = False
    #: The word for what ``tokens`` counts, in messages, throughput and plots: a language model's ``tokens``,
    #: another task's ``targets``.
    token_unit: str = "targets"
    #: Number of classes (or vocabulary entries) of a classifier's output, for the expected initial loss ln(C).
    num_classes: int | None = None

    def bind(self, config: Any) -> Task:
        """Take the run's settings (batch size, seed, data options) before use; returns the task itself."""
        return self

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> Any:
        """Micro-batch ``index`` of the training data (this rank's share of it), on the CPU."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """How many terms ``loss`` sums over for ``batch`` (tokens that are not padding, or examples): the trainer
        divides the summed loss of a global batch by the summed count."""
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens (target positions) ``batch`` trains on: what the clock's ``tokens``, throughput and lengths in
        tokens ('2Mtok') count. Default: ``count(batch)``, the loss's terms."""
        return self.count(batch)

    def batch_counts(self, index: int, world_size: int = 1) -> tuple[float, float]:
        """(examples, tokens) of training micro-batch ``index`` over ``world_size`` ranks, as the clock will count
        them, projected before training: keel resolves lengths in examples, tokens and epochs to steps with it
        (``keel.timeunits.Timeline``). Default: the counts of micro-batch 0 (built once), for every index: exact
        when every batch holds as many examples and targets; where counts vary with the data (padding, ignored
        targets) a task may override it with its own projection."""
        cache = self.__dict__.setdefault("_batch0_counts", {})
        if world_size not in cache:
            batches = [self.train_batch(0, rank, world_size) for rank in range(world_size)]
            cache[world_size] = (sum(self.examples(b) for b in batches), sum(self.tokens(b) for b in batches))
        return cache[world_size]

    def epoch(self) -> Time | None:
        """One epoch as the clock counts it (``'3ep'`` is three of these): a ``keel.timeunits.Time`` in examples or
        tokens, or None for a task without epochs. Default: the examples of ``batches_per_epoch`` micro-batches of
        one rank, as ``batch_counts`` projects them."""
        return Time(self.batches_per_epoch * self.batch_counts(0, 1)[0], "example")

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss of ``model`` on ``batch``, summed (not averaged) over its ``count(batch)`` terms."""
        raise NotImplementedError

    def eval_batches(self, split: str, rank: int = 0, world_size: int = 1) -> Iterable[Any]:
        """The fixed batches of an evaluation: ``"val"`` (validation data) or ``"train"`` (a fixed slice of the
        training data, so over- and underfitting show side by side)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Summed metrics of one evaluation batch; each is divided by the summed ``count``. ``loss`` is required;
        a classifier adds ``accuracy`` (the number of correct predictions)."""
        return {"loss": self.loss(model, batch)}

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's logits for ``inputs`` (scoring and ensembles use them): ``model(inputs)``, or its
        ``.logits`` for models that return an output object (Hugging Face)."""
        out = model(inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def examples(self, batch: Any) -> int:
        """Examples (sequences, images) in ``batch``: the leading dimension of its first tensor."""
        return batch_examples(batch)

    def sample(self, model: nn.Module, generator: torch.Generator, autocast) -> str:
        """A short sample to print at each evaluation (a language model's continuation); empty for none."""
        return ""

    def step_metrics(self, batches: list[Any]) -> dict[str, float]:
        """Keys added to a step's metrics record from its micro-batches (the language model without packing:
        ``pad_fraction``); none by default."""
        return {}

    def flops_per_token(self, model: nn.Module, batch: Any = None) -> float | None:
        """Model FLOPs of one training token (forward and backward) for ``model`` (on ``batch``, whose sequence
        length may matter), for MFU in the step records and for ``compile: auto``; None (the default): unknown."""
        return None

    def run_files(self) -> dict[str, str]:
        """Text files the run directory keeps beside ``config.yaml`` (a trained tokenizer's ``tokenizer.json``)."""
        return {}

    def describe(self) -> list[str]:
        """Lines printed when a run starts: the data and what a trivial model would score."""
        return []

    def reference_metrics(self) -> dict[str, float]:
        """Baselines to report beside the final metrics (e.g. ``unigram_baseline``)."""
        return {}


def batch_examples(batch: Any) -> int:
    for tensor in _tensors(batch):
        return int(tensor.shape[0]) if tensor.dim() else 1
    raise KeelError(f"batch: a {type(batch).__name__} holds no tensor; allowed: a tensor or a tuple, list or dict "
                    "of tensors")


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) on ``device``; other values pass through.

    To a CUDA device a CPU tensor goes through pinned memory, so the copy is queued behind the GPU's work: a copy
    from pageable memory is staged by the driver and can hold the host until it is done, which delays the launches
    of the next step's kernels (PyTorch's guide to `non_blocking` and `pin_memory`)."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def check_loss(value: Any, where: str) -> torch.Tensor:
    """The loss a task returned, checked to be a scalar floating-point tensor that carries a gradient."""
    if not isinstance(value, torch.Tensor):
        raise KeelError(f"{where}: the loss is a {type(value).__name__}; allowed: a scalar torch.Tensor")
    if value.dim() != 0:
        raise KeelError(f"{where}: the loss has shape {tuple(value.shape)}; allowed: a scalar (shape ()) — reduce "
                        "it with .sum() or .mean()")
    if not value.is_floating_point():
        raise KeelError(f"{where}: the loss has dtype {value.dtype}; allowed: a floating-point scalar")
    return value


def check_model(model: Any, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise KeelError(f"{where}: built a {type(model).__name__}; allowed: a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise KeelError(f"{where}: the model has no trainable parameters (none with requires_grad=True); allowed: "
                        "a model with at least one trainable parameter")
    return model


def expected_initial_loss(task: Task) -> float | None:
    """ln(C) for a task with C classes: the cross-entropy of a uniform prediction at initialisation."""
    return math.log(task.num_classes) if task.num_classes else None
