"""Uniform weight averages: Polyak-Ruppert averaging and Stochastic Weight Averaging (SWA)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from keel.averaging.shadow import ShadowWeights
from keel.errors import KeelError


class Polyak(ShadowWeights):
    """Polyak-Ruppert averaging (Polyak & Juditsky 1992): the uniform mean of the weights seen at `update()`.

    shadow <- shadow + (weight - shadow) / k at the k-th update, so after n updates shadow = (1/n) sum_k weight_k.
    Call `update()` only from the step the mean should start at.
    """

    def lerp_weight(self, k: int) -> float:
        return 1.0 / k


class SWA(Polyak):
    """Stochastic Weight Averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima").

    A uniform mean of the weights taken during a phase with its own learning rate (`swa_learning_rate`),
    after which BatchNorm statistics are recomputed for the averaged weights (`update_batchnorm`).
    Buffers are not averaged by default: they follow the model until `update_batchnorm` recomputes them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include_buffers: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self._model = model
        super().__init__(model, include_buffers=include_buffers, device=device, dtype=dtype)

    @torch.no_grad()
    def update_batchnorm(
        self, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
    ) -> int:
        """Recompute the BatchNorm statistics of the averaged weights with one pass over `batches`.

        The averaged weights are swapped into the model, its BatchNorm layers re-estimate their running mean and
        variance as a cumulative average over the pass, and the result is kept in the average. Returns the number
        of BatchNorm layers (0: nothing to do, no pass is made).
        """
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self._model.modules()):
            return 0
        with self.swapped():
            count = recompute_batchnorm(self._model, batches, forward)
            buffers = {
                f"{prefix}.{b}" if prefix else b
                for prefix, m in self._model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b, _ in m.named_buffers(recurse=False)
            }
            recomputed = {
                name: self._sources[i].detach().clone() for i, name in enumerate(self.names) if name in buffers
            }
        for name, value in recomputed.items():
            self.shadow[name].copy_(value)
        return count


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> int:
    """Re-estimate BatchNorm running statistics of `model` as a cumulative average over one pass of `batches`.

    Running statistics are reset, momentum is set to None (cumulative average) for the pass and restored after,
    as in torch.optim.swa_utils.update_bn. `forward(model, batch)` runs the model; by default `model(batch)`,
    or `model(batch[0])` for a tuple or list. Returns the number of BatchNorm layers.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


def swa_learning_rate(
    step: int, *, start: int, start_lr: float, swa_lr: float, anneal_steps: int = 0, strategy: str = "cos"
) -> float | None:
    """The learning rate of the SWA phase at `step`, or None before the phase starts.

    With u = step - start and a = f(min(1, u / anneal_steps)), lr = swa_lr * a + start_lr * (1 - a), where
    f(t) = (1 - cos(pi t)) / 2 ("cos") or t ("linear"), as torch.optim.swa_utils.SWALR; constant swa_lr once
    u >= anneal_steps (and from the start if anneal_steps is 0).
    """
    if strategy not in ("cos", "linear"):
        raise KeelError(f"swa.anneal_strategy: {strategy!r} is not a strategy; allowed: cos, linear")
    if step < start:
        return None
    if anneal_steps <= 0:
        return swa_lr
    t = min(1.0, (step - start) / anneal_steps)
    a = (1.0 - math.cos(math.pi * t)) / 2.0 if strategy == "cos" else t
    return swa_lr * a + start_lr * (1.0 - a)
