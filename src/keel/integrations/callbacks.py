"""What keel's Lightning and Hugging Face callbacks share: the checks of their arguments, the SWA phase's LR and the
clipper a run starts with. Each function is the same in both trainers; what the host differs in (its step, its
events, where its scheduler sits) stays in ``keel.integrations.lightning`` and ``keel.integrations.hf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from keel import schedules
from keel.averaging import swa_learning_rate
from keel.config import validate
from keel.errors import KeelError
from keel.grad import ClipConfig, Clipper
from keel.integrations.scheduler import KeelLRScheduler
from keel.timeunits import Timeline

__all__ = ["clip_config", "config_block", "count", "every_steps", "last_checkpoint", "start_clipper",
           "swa_phase_lr"]


def config_block(model, **fields: Any):
    """A keel config block (``ema:``, ``swa:``, ...) from keyword arguments: the same keys, defaults and checks; an
    argument left None takes the block's default."""
    return validate({"enabled": True, **{k: v for k, v in fields.items() if v is not None}}, model)


def count(value: Any, key: str) -> int:
    """``value``, an int >= 1 (a number of checkpoints, an interval in updates), else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeelError(f"{key}: {value!r}; allowed: an int >= 1")
    return value


def every_steps(timeline: Timeline, value: int | str, key: str) -> int:
    """An interval in keel's time units, in updates of the run (at least one)."""
    steps = timeline.steps(value, key)
    if steps < 1:
        raise KeelError(f"{key}: {value!r} resolves to 0 steps; allowed: >= 1 step")
    return steps


def last_checkpoint(path: str | Path | None) -> str:
    """The end of a stop message: where the host trainer's last checkpoint is, or that it wrote none."""
    return f"the last good checkpoint is {path}" if path else "no checkpoint was written"


def swa_phase_lr(step: int, *, start: int, start_lr: float | None, config, anneal_steps: int,
                 optimizers: Sequence[torch.optim.Optimizer], scheduler: KeelLRScheduler | None) -> float | None:
    """Set the LR of the SWA phase (``swa_learning_rate``, ``config``: the ``swa:`` block) for the update at ``step``
    on ``optimizers``, times the keel scheduler's multiplier. Returns the phase's start LR: ``start_lr`` once known,
    else the schedule's LR at ``start`` (the scheduler's, or the first group's base LR) when the phase has begun,
    else None (nothing set)."""
    if start_lr is None and step >= start:
        group = optimizers[0].param_groups[0]
        start_lr = scheduler.schedule(start) if scheduler is not None \
            else float(group["lr"]) / group.get("lr_scale", 1.0)
    if start_lr is None:
        return None
    lr = swa_learning_rate(step, start=start, start_lr=start_lr, swa_lr=config.lr, anneal_steps=anneal_steps,
                           strategy=config.anneal_strategy)
    if lr is not None:
        for optimizer in optimizers:
            schedules.set_lr(optimizer, lr * (scheduler.multiplier if scheduler is not None else 1.0))
    return start_lr


def clip_config(**fields: Any) -> ClipConfig:
    """The ``clip:`` block of a ``Clip`` callback's arguments (keel's keys, defaults and checks)."""
    return validate(fields, ClipConfig)


def start_clipper(config: ClipConfig, norms: dict[str, Any], warmup_steps: int | None,
                  scheduler: KeelLRScheduler | None, scheduler_hint: str) -> Clipper:
    """The clipper a run starts with: ``warmup_steps``, else the warmup of the run's ``KeelLRScheduler`` (an error
    with ``start_after_warmup`` and none: ``scheduler_hint`` names what gives one); the norms window ``norms``
    (a ``Clipper.state_dict``) carried over."""
    if warmup_steps is None:
        if config.start_after_warmup and scheduler is None:
            raise KeelError("Clip.start_after_warmup: the run has no KeelLRScheduler to take the warmup from; allowed: "
                            f"Clip(warmup_steps=N, start_after_warmup=True), or {scheduler_hint}")
        warmup_steps = schedules.warmup_steps(scheduler.schedule) if scheduler is not None else 0
    clipper = Clipper(config, warmup_steps=warmup_steps)
    clipper.load_state_dict(norms)
    return clipper
