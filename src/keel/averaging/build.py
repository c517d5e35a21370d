"""The unit each averaging block (``ema:``, ``polyak:``, ``swa:``) describes, built in one place for keel's
trainer and for the Lightning and Hugging Face adapters, so the three cannot drift apart.

``steps(value, key)`` resolves a length in keel's time units (``2%``, ``3ep``, a step count) on the calling
trainer's clock; ``every`` is the block's update interval, already in steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from keel.averaging.config import EMAConfig, PolyakConfig, SWAConfig
from keel.averaging.ema import EMA
from keel.averaging.swa import SWA, Polyak
from keel.errors import KeelError

Steps = Callable[[int | str, str], int]


def ema_unit(model: torch.nn.Module, config: EMAConfig, *, every: int, steps: Steps, name: str = "ema") -> EMA:
    """The EMA an ``ema`` block describes; a ``half_life`` in time units counts the EMA's own updates."""
    half_life = None
    if config.half_life is not None:
        half_life = steps(config.half_life, f"{name}.half_life") / every
        if half_life <= 0:
            raise KeelError(f"{name}.half_life: {config.half_life!r} resolves to 0 steps; allowed: > 0")
    return EMA(model, decay=config.decay, dynamic_decay=config.dynamic_decay, warmup_gamma=config.warmup_gamma,
               warmup_power=config.warmup_power, half_life=half_life, include_buffers=config.include_buffers,
               device=config.device, dtype=config.dtype)


def polyak_unit(model: torch.nn.Module, config: PolyakConfig) -> Polyak:
    return Polyak(model, include_buffers=config.include_buffers, device=config.device, dtype=config.dtype)


def swa_unit(model: torch.nn.Module, config: SWAConfig) -> SWA:
    return SWA(model, include_buffers=config.include_buffers, device=config.device, dtype=config.dtype)
