"""Short trainings through the normal trainer, for the active procedures of ``keel diagnose --config``.

A probe is a ``Trainer`` run on a modified copy of the user's config, with the user's task wrapped in a
``ProbeTask``: the same model (a copy of one initialisation, so every probe starts from the same weights), the same
data and loss, evaluations cut to a few batches, and optionally one fixed small batch trained on again and again
(the "overfit one batch" check). Because probes go through the trainer, they work on any task.

Training instability inside a probe is data: a ``TrainingUnstableError`` (the non-finite guard gave up) or a
blow-up that ``ProbeWatch`` stops ends the probe and is recorded, never raised.
"""

from __future__ import annotations

import copy
import itertools
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keel import rundir
from keel.diagnose import signals
from keel.schedules import set_lr
from keel.tasks.base import Task, batch_examples
from keel.techniques import Callback


def take_examples(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a batch: every tensor whose leading dimension is the batch's is cut to ``n``."""
    size = batch_examples(batch)

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[:n].clone() if value.dim() and value.shape[0] == size else value
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return cut(batch)


class ProbeTask(Task):
    """``base`` as the trainer sees it in a probe (see the module docstring).

    ``pristine``: the initial model, copied for each probe. ``one_batch``: train on this batch at every step and
    evaluate the training split on it. ``val_batches`` / ``train_eval_batches``: batches per evaluation.
    ``last_loss`` is the per-target loss of the latest training micro-batch, for ``ProbeWatch``.
    """

    def __init__(self, base: Task, pristine: nn.Module, *, one_batch: Any = None, val_batches: int = 2,
                 train_eval_batches: int = 1):
        self.base, self.pristine, self.one_batch = base, pristine, one_batch
        self.val_batches, self.train_eval_batches = val_batches, train_eval_batches
        self.name = base.name
        self.batches_per_epoch = base.batches_per_epoch
        self.token_unit = base.token_unit
        self.batch_counts_vary = base.batch_counts_vary and one_batch is None
        self.num_classes = base.num_classes
        self.last_loss = math.nan

    def bind(self, config) -> ProbeTask:
        return self  # the base task is bound once, to the user's config

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.pristine)

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> Any:
        if self.one_batch is not None:
            return self.one_batch
        return self.base.train_batch(index, rank, world_size)

    def count(self, batch: Any) -> int:
        return self.base.count(batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        value = self.base.loss(model, batch)
        if model.training:
            self.last_loss = float(value.detach()) / max(1, self.base.count(batch))
        return value

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return self.base.eval_sums(model, batch)

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return self.base.logits(model, inputs)

    def examples(self, batch: Any) -> int:
        return self.base.examples(batch)

    def tokens(self, batch: Any) -> int:
        return self.base.tokens(batch)

    def batch_counts(self, index: int, world_size: int = 1) -> tuple[float, float]:
        if self.one_batch is not None:
            return self.examples(self.one_batch) * world_size, self.tokens(self.one_batch) * world_size
        return self.base.batch_counts(index, world_size)

    def epoch(self):
        return self.base.epoch()

    def eval_batches(self, split: str, rank: int = 0, world_size: int = 1):
        if split == "train" and self.one_batch is not None:
            return iter([self.one_batch])
        count = self.val_batches if split == "val" else self.train_eval_batches
        if count <= 0:
            return iter(())
        return itertools.islice(self.base.eval_batches(split, rank, world_size), count)


class Display:
    """The progress display: one line per finished probe, and on a terminal a live line for the running one
    (without a terminal, a line every 30 s of a long probe)."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self._last = 0.0
        self._live = False

    def clock(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(f"[{self.clock()}] {text}", file=self.stream, flush=True)

    def progress(self, name: str, step: int, total: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self._last >= 0.25:
            self._last = now
            self.stream.write(f"\r[{self.clock()}]   {name}: step {step}/{total}, loss {loss:.4f}   ")
            self.stream.flush()
            self._live = True
        elif not self.tty and now - self._last >= 30:
            self._last = now
            print(f"[{self.clock()}]   {name}: step {step}/{total}, loss {loss:.4f}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r" + " " * 100 + "\r")
            self._live = False


class ProbeWatch(Callback):
    """Ends a probe early: after ``step_limit`` updates, past ``time_limit`` seconds, when the loss has blown up
    (its median over 5 steps above ``BLOW_UP_FACTOR`` x the first loss), or when ``done(loss)`` says the probe
    reached its goal. ``reason`` says why it stopped."""

    name = "diagnose_probe"

    def __init__(self, task: ProbeTask, label: str, total: int, display: Display, *, step_limit: int | None = None,
                 time_limit: float | None = None, done: Callable[[float], bool] | None = None):
        self.task, self.label, self.total, self.display = task, label, total, display
        self.step_limit, self.time_limit, self.done = step_limit, time_limit, done
        self.reason: str | None = None
        self.blew_up = False
        self.reached = False
        self._recent: list[float] = []
        self._first: float | None = None
        self._started = time.perf_counter()

    def on_run_start(self, trainer) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, trainer) -> None:
        loss, step = self.task.last_loss, trainer.state.step
        self.display.progress(self.label, step, self.total, loss)
        if self._first is None and math.isfinite(loss):
            self._first = loss
        self._recent = [*self._recent[-4:], loss]
        if self._first is not None and len(self._recent) == 5 and (
                float(np.median(self._recent)) > signals.BLOW_UP_FACTOR * self._first):
            self.reason, self.blew_up, self.should_stop = (
                f"blew up: loss {float(np.median(self._recent)):.4g} at step {step} from {self._first:.4g}", True,
                True)
        elif self.done is not None and math.isfinite(loss) and self.done(loss):
            self.reason, self.reached, self.should_stop = f"reached its goal at step {step}", True, True
        elif self.step_limit is not None and step >= self.step_limit:
            self.reason, self.should_stop = f"step limit {self.step_limit}", True
        elif self.time_limit is not None and time.perf_counter() - self._started > self.time_limit:
            self.reason, self.should_stop = f"time limit {self.time_limit:.0f} s at step {step}", True


class LRRangeCallback(Callback):
    """The LR range test's schedule: ``lr(t) = lr_min * (lr_max / lr_min) ** (t / (steps - 1))``, set at the start of
    each step (Smith 2017, "Cyclical learning rates for training neural networks", section 3.3)."""

    name = "lr_range"

    def __init__(self, lr_min: float, lr_max: float, steps: int):
        self.lr_min, self.lr_max, self.steps = lr_min, lr_max, steps

    def lr(self, step: int) -> float:
        return self.lr_min * (self.lr_max / self.lr_min) ** (step / max(1, self.steps - 1))

    def on_step_start(self, trainer) -> None:
        set_lr(trainer.optimizer, self.lr(trainer.state.step))


@dataclass
class ProbeResult:
    """What one probe did: its step series, evaluations, how it ended and what it cost."""

    name: str
    lr: float | None
    planned_steps: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # why it ended early (TrainingUnstableError's message, a blow-up, a limit)
    unstable_error: bool = False
    blew_up: bool = False
    reached: bool = False
    wall: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.unstable_error or self.blew_up or any(not math.isfinite(v) for v in self.losses)

    @property
    def final_val(self) -> float:
        values = [e["val_loss"] for e in self.evals if "val_loss" in e]
        return float(values[-1]) if values else math.nan

    def step_seconds(self) -> float | None:
        """Median seconds per update, from the ``time`` field of consecutive step records."""
        diffs = np.diff(self.step_times)
        diffs = diffs[diffs > 0]
        return float(np.median(diffs)) if len(diffs) >= 3 else None

    def stability(self, early_steps: int = 10, initial: float | None = None) -> signals.Stability:
        return signals.classify(self.losses, self.steps, initial=initial,
                                stopped=self.stopped if (self.unstable_error or self.blew_up) else None,
                                early_steps=early_steps)

    def summary(self) -> dict[str, Any]:
        """The probe in a few numbers (kept in diagnosis.json), curves thinned to at most 400 points."""
        stride = max(1, len(self.steps) // 400)
        return {"name": self.name, "lr": self.lr, "planned_steps": self.planned_steps, "steps_run": len(self.steps),
                "final_val_loss": self.final_val, "stopped": self.stopped, "diverged": self.diverged,
                "wall_seconds": round(self.wall, 2), "curve_steps": self.steps[::stride],
                "curve_losses": self.losses[::stride], "curve_lrs": self.lrs[::stride],
                "val_steps": [e["step"] for e in self.evals][::stride],
                "val_losses": [e["val_loss"] for e in self.evals][::stride]}


def read_probe(name: str, lr: float | None, planned: int, run_dir: Path) -> ProbeResult:
    from keel.rundir.metrics import read_metrics

    result = ProbeResult(name, lr, planned)
    path = run_dir / rundir.METRICS
    records = read_metrics(path) if path.is_file() else []
    result.records = records
    for r in records:
        if r.get("kind") == "step" and "loss" in r:
            result.steps.append(int(r["step"]))
            result.losses.append(float(r["loss"]))
            result.lrs.append(float(r.get("lr", math.nan)))
            result.norms.append(float(r.get("grad_norm", math.nan)))
            result.clipped.append(bool(r.get("clipped", False)))
            result.step_times.append(float(r.get("time", math.nan)))
        elif r.get("kind") == "eval" and "val_loss" in r:
            result.evals.append(r)
        elif r.get("kind") == "event" and r.get("event") == "skipped" and not math.isfinite(r.get("loss", 0.0)):
            result.steps.append(int(r["step"]))
            result.losses.append(float(r["loss"]))
            result.lrs.append(math.nan)
            result.norms.append(float(r.get("unclipped_norm", math.nan)))
            result.clipped.append(False)
            result.step_times.append(math.nan)
    return result


def tidy_probe_dir(run_dir: Path) -> None:
    """Keep a probe's config, metrics and loss plot (a run directory ``keel report`` reads); drop its weights."""
    shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)
    (run_dir / rundir.MODEL_WEIGHTS).unlink(missing_ok=True)
