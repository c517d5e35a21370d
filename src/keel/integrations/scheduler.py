"""A keel schedule as a torch LR scheduler, and an optimizer with its schedule from a keel config.

Both trainer adapters (``keel.integrations.lightning``, ``keel.integrations.hf``) hand the host trainer a
``KeelLRScheduler``: a ``torch.optim.lr_scheduler.LRScheduler`` whose ``step()`` the host calls once per optimizer
update. After ``s`` applied updates every param group's LR is ``schedule(s) * multiplier * lr_scale`` (keel's step:
``schedule(0)`` drives the first update; ``lr_scale`` as in ``keel.schedules.set_lr``), so the LR of each update is
the one ``keel train`` applies. keel's callbacks that skip an update (non-finite gradients, a loss spike) call
``hold()``, so the schedule keeps its position as in keel's trainer, and a spike rollback ``rewind``s it.

The scheduler also carries out ``optimizer.unfreeze_at`` (``keel.optim.unfreeze``): whenever its position is set
(built, stepped, rewound, loaded on resume) the optimizer's frozen groups train from their step on, so, as in keel's
trainer, the update at step ``unfreeze_at`` is the first that trains them and a resumed run is frozen exactly as the
uninterrupted one was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from keel import optim, schedules
from keel.errors import KeelError
from keel.timeunits import Timeline

__all__ = ["KeelLRScheduler", "base_lr", "make_schedule", "optimizer_and_scheduler", "training_config"]


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's base LR: a group's ``lr / lr_scale`` for keel's param groups, else the largest group LR
    (``initial_lr`` where a scheduler already set one)."""
    for group in optimizer.param_groups:
        if group.get("lr_scale"):
            return float(group.get("initial_lr", group["lr"])) / float(group["lr_scale"])
    return max(float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups)


def _total(total_steps: Any, key: str) -> int | None:
    if total_steps is None:
        return None
    if isinstance(total_steps, float) and math.isfinite(total_steps) and total_steps.is_integer():
        total_steps = int(total_steps)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise KeelError(f"{key}: {total_steps!r} is not a run length; allowed: a whole number of optimizer steps "
                        ">= 1 (e.g. Lightning's trainer.estimated_stepping_batches, or TrainingArguments.max_steps)")
    return total_steps


def make_schedule(optimizer: torch.optim.Optimizer, schedule: Any, total_steps: int | None = None,
                  steps_per_epoch: int | None = None) -> Callable[[int], float]:
    """A keel schedule from a schedule object (any ``step -> lr`` function, e.g. ``keel.schedules.cosine_decay``)
    or a keel config's ``schedule:`` mapping (``{"name": "cosine", "warmup": 5, "min_lr": 0.0}``), whose peak LR is
    the optimizer's base LR unless it sets ``lr``. ``total_steps`` is the run length in optimizer updates."""
    total = _total(total_steps, "total_steps")
    if isinstance(schedule, (Mapping, str)):
        return schedules.from_config(schedule, base_lr=base_lr(optimizer), key="schedule",
                                     timeline=Timeline.at_rate(total, steps_per_epoch=steps_per_epoch))
    if not callable(schedule):
        raise KeelError(f"schedule: {schedule!r} is not a schedule; allowed: a keel schedule (a function step -> lr) "
                        "or a schedule mapping such as {'name': 'cosine', 'warmup': 5}")
    return schedule


class KeelLRScheduler(LRScheduler):
    """Drives the optimizer's LR from a keel schedule: ``lr = schedule(step) * multiplier`` for the update that
    ``step`` updates were applied before (see the module docstring).

    ``hold()``: the next ``step()`` leaves the position where it is (the update was skipped). ``rewind(step)``: go
    back to ``step`` (a loss-spike rollback). ``multiplier`` scales every LR (``spike lr_factor``). The state
    (``state_dict``) is the position, the multiplier and a plateau schedule's state: plain numbers, so a host
    checkpoint restores it exactly and loads with ``torch.load(weights_only=True)``. Param groups with an
    ``unfreeze_at`` step (``optimizer.unfreeze_at``) train from that step on: ``requires_grad`` follows the
    position (not with several processes, as in keel's trainer).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]):
        if not callable(schedule):
            raise KeelError(f"schedule: {schedule!r} is not a function step -> learning rate")
        self.schedule = schedule
        self.multiplier = 1.0
        self._held = False
        self._unfreezes = any(group.get("unfreeze_at") is not None for group in optimizer.param_groups)
        super().__init__(optimizer)  # sets initial_lr on the groups, then step(): the LR of step 0

    @property
    def position(self) -> int:
        """keel's step: updates applied before the next one (the step the current LR belongs to)."""
        return self.last_epoch

    def lr_at(self, step: int) -> float:
        """The base LR this scheduler gives the update at ``step`` (multiplier included)."""
        return self.schedule(step) * self.multiplier

    def step(self, epoch: int | None = None) -> None:  # noqa: D102 (torch's API)
        if epoch is not None:
            raise KeelError(f"KeelLRScheduler.step: epoch={epoch!r}; allowed: step() with no argument (the "
                            "scheduler counts the updates itself)")
        if self._held:
            self._held = False
        else:
            self.last_epoch += 1
        self._apply()

    def hold(self) -> None:
        """The update being made is skipped: the next ``step()`` keeps the position (and the LR)."""
        self._held = True

    def rewind(self, step: int) -> None:
        """Go back to ``step`` (a rollback restored the weights of that step); the LR is set at once."""
        self.last_epoch, self._held = int(step), False
        self._apply()

    def observe(self, metric: float) -> None:
        """Feed an evaluation metric to a metric-driven schedule (``reduce_on_plateau``); nothing for the others."""
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(metric)
            self._apply()

    def _apply(self) -> None:
        """The LR, and which groups train (``unfreeze_at``), of the update at the current position."""
        step = max(self.last_epoch, 0)
        schedules.set_lr(self.optimizer, self.lr_at(step))
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]
        if self._unfreezes:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise KeelError("optimizer.unfreeze_at: not supported with several processes (data parallelism fixes "
                                "which parameters have gradients when the model is wrapped); allowed: one process, "
                                "or null")
            optim.unfreeze(self.optimizer, step)

    def get_lr(self) -> list[float]:  # noqa: D102 (torch's API)
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = {"last_epoch": self.last_epoch, "multiplier": self.multiplier, "held": self._held}
        if hasattr(self.schedule, "state_dict"):
            state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.multiplier = float(state.get("multiplier", 1.0))
        self._held = bool(state.get("held", False))
        if state.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state["schedule"])
        self._apply()


def training_config(config: Any):
    """A ``keel.config.TrainConfig`` from itself or from a mapping written like a keel config file (only the keys
    it gives matter here; the rest take keel train's defaults with recipe baseline, so ``{"optimizer": {"name":
    "adamw", "lr": 1e-3}}`` gets keel's betas and weight decay exactly as ``keel train`` would)."""
    from keel.config import TrainConfig, validate

    if isinstance(config, TrainConfig):
        return config
    if not isinstance(config, Mapping):
        raise KeelError(f"config: a {type(config).__name__}; allowed: a keel TrainConfig or a mapping with keel's "
                        "keys (optimizer, schedule, max_steps)")
    raw = dict(config)
    raw.setdefault("recipe", "baseline")
    raw.setdefault("task", "digits")  # no language-model data is needed to read an optimizer and a schedule
    return validate(raw)


def optimizer_and_scheduler(model: torch.nn.Module, config: Any, total_steps: int | None = None,
                            steps_per_epoch: int | None = None) -> tuple[torch.optim.Optimizer, KeelLRScheduler]:
    """keel's optimizer (``config.optimizer``, through the registry, with keel's param groups) for ``model`` and a
    ``KeelLRScheduler`` of ``config.schedule`` over ``total_steps`` updates (default: the config's
    ``max_steps``, which a mapping must then give)."""
    from_mapping = isinstance(config, Mapping)
    given_steps = from_mapping and "max_steps" in config
    config = training_config(config)
    if total_steps is None and (given_steps or not from_mapping):
        total_steps = config.max_steps
    total = _total(total_steps, "total_steps")
    if total is None:
        raise KeelError("total_steps: not given and the config has no max_steps; allowed: total_steps=N (the run "
                        "length in optimizer updates) or max_steps in the config")
    timeline = Timeline.at_rate(total, steps_per_epoch=steps_per_epoch)  # the host trainer's steps and epochs
    optimizer = optim.from_config(config.optimizer, model, timeline=timeline)
    schedule = make_schedule(optimizer, config.schedule, total, steps_per_epoch)
    return optimizer, KeelLRScheduler(optimizer, schedule)
