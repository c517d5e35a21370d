"""Exponential moving average of a model's weights (Polyak & Juditsky 1992; TensorFlow/OpenNMT-tf's form)."""

from __future__ import annotations

import math

import torch
from torch import nn

from keel.averaging.shadow import ShadowWeights
from keel.errors import KeelError


class EMA(ShadowWeights):
    """Exponential moving average: shadow <- shadow - (1 - d_k) * (shadow - weight) at the k-th `update()`.

    The first update sets the shadow to the weights. The decay d_k of the k-th update (k = 1, 2, ...) is one of:

    - fixed: d_k = decay;
    - `dynamic_decay=True` (OpenNMT-tf, tf.train.ExponentialMovingAverage with num_updates):
      d_k = min(decay, (1 + k) / (10 + k));
    - `warmup_gamma`, `warmup_power` (the warmup form of timm / diffusers, t = k - 1 updates before this one):
      d_k = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power);
    - `half_life` h (in updates): d_k = 0.5 ** (1 / h), so a weight's influence halves every h updates.

    Example::

        ema = EMA(model, decay=0.999)
        for batch in data:
            loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
            ema.update()
        with ema.swapped():          # evaluate with the averaged weights, no third copy
            evaluate(model)
        ema.export("ema.safetensors")
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        dynamic_decay: bool = False,
        *,
        warmup_gamma: float | None = None,
        warmup_power: float | None = None,
        half_life: float | None = None,
        include_buffers: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise KeelError(f"ema.decay: {decay!r} is out of range; allowed: 0 <= decay <= 1")
        forms = [n for n, on in (("dynamic_decay", dynamic_decay), ("warmup_gamma", warmup_gamma is not None),
                                 ("half_life", half_life is not None)) if on]
        if len(forms) > 1:
            raise KeelError(f"ema: {' and '.join(forms)} are both set; allowed: at most one decay form")
        if (warmup_gamma is None) != (warmup_power is None):
            raise KeelError("ema: warmup_gamma and warmup_power must be given together")
        if warmup_gamma is not None and (warmup_gamma <= 0 or warmup_power <= 0):
            raise KeelError(f"ema: warmup_gamma {warmup_gamma!r} and warmup_power {warmup_power!r} must be > 0")
        if half_life is not None and not half_life > 0:
            raise KeelError(f"ema.half_life: {half_life!r} is not positive; allowed: a length > 0")
        self.decay = float(decay)
        self.dynamic_decay = dynamic_decay
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.half_life = half_life
        super().__init__(model, include_buffers=include_buffers, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, model: nn.Module, config, *, every: int = 1, steps=None, name: str = "ema") -> EMA:
        """The EMA an ``ema:`` block (``keel.averaging.config.EMAConfig``) describes, as keel's trainer and the
        Lightning and HF adapters all build it: ``steps(value, key)`` resolves a ``half_life`` in time units on the
        caller's clock, and the half-life counts the EMA's own updates, one every ``every`` steps."""
        half_life = None
        if config.half_life is not None:
            half_life = steps(config.half_life, f"{name}.half_life") / every
            if half_life <= 0:
                raise KeelError(f"{name}.half_life: {config.half_life!r} resolves to 0 steps; allowed: > 0")
        return cls(model, decay=config.decay, dynamic_decay=config.dynamic_decay, warmup_gamma=config.warmup_gamma,
                   warmup_power=config.warmup_power, half_life=half_life, include_buffers=config.include_buffers,
                   device=config.device, dtype=config.dtype)

    def decay_at(self, k: int) -> float:
        """The decay d_k of the k-th update (k = 1 for the first update, whose result is the weights)."""
        if self.half_life is not None:
            return 0.5 ** (1.0 / self.half_life)
        if self.dynamic_decay:
            return min(self.decay, (1.0 + k) / (10.0 + k))
        if self.warmup_gamma is not None:
            t = k - 1
            return min(self.decay, 1.0 - (1.0 + t / self.warmup_gamma) ** -self.warmup_power)
        return self.decay

    def lerp_weight(self, k: int) -> float:
        return 1.0 - self.decay_at(k)


def half_life_to_decay(half_life_steps: float, every: int = 1) -> float:
    """Decay per update for a half-life in steps when updating every `every` steps: 0.5 ** (every / half_life)."""
    return math.pow(0.5, every / half_life_steps)
