"""keel's techniques as PyTorch Lightning callbacks (``pip install 'keel[lightning]'``).

Each callback is a few lines around the unit keel's own trainer wraps, so the numbers are keel's: ``EMA``,
``Polyak`` and ``SWA`` (``keel.averaging``), ``CheckpointAverage`` (``keel.averaging.average_checkpoints``),
``Clip`` and ``GradNorm`` (``keel.grad.Clipper``), ``NonFinite`` (``keel.grad.grads_are_finite``),
``SpikeRollback`` (``keel.grad.LossSpikeDetector``), ``SeqLenWarmup`` (``keel.data.seq_warmup``), ``UpdateRatio``
(``keel.diagnose.update_ratio``); ``keel_scheduler`` and ``keel_optimizers`` give ``configure_optimizers`` keel's
schedules and optimizers (``keel.integrations.scheduler``)::

    def configure_optimizers(self):
        optimizer = keel.optim.create("adamw", self, lr=1e-3)
        return {"optimizer": optimizer, "lr_scheduler": keel_scheduler(
            optimizer, {"name": "cosine", "warmup": 100}, total_steps=self.trainer.estimated_stepping_batches)}

    trainer = L.Trainer(max_steps=1000, callbacks=[EMA(0.999, dynamic_decay=True), Clip(max_norm=1.0)])

The step: keel counts the updates applied (0 before the first). Lightning's ``global_step`` counts optimizer steps
called, so ``applied_steps(trainer)`` is ``global_step`` less the updates keel's ``NonFinite`` and ``SpikeRollback``
skipped or undid. A skipped update drops the gradients before ``optimizer.step()`` (torch's optimizers and keel's
leave a parameter without a gradient untouched), holds the keel schedule where it is, and the averages do not
count it. Lightning events used: ``on_train_start``, ``on_train_batch_start`` (the batch, changed in place),
``on_before_backward`` (the loss), ``on_before_optimizer_step`` (gradients, before Lightning's own clipping),
``on_train_batch_end`` (after the update and the scheduler), ``on_validation_start``/``end``,
``state_dict``/``load_state_dict`` (each callback's state rides in Lightning's checkpoint under ``keel_<name>``, so a
``fit(ckpt_path=...)`` resume is exact) and ``on_save_checkpoint``. Lengths (``start``, ``every``, ``duration``,
``half_life``) take keel's time units: steps, ``"5%"`` of ``trainer.estimated_stepping_batches``, ``"2ep"``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised where Lightning is missing
    raise ImportError("keel.integrations.lightning needs Lightning: pip install 'keel[lightning]'") from None

from keel.averaging import EMA as EMAUnit
from keel.averaging import SWA as SWAUnit
from keel.averaging import Polyak as PolyakUnit
from keel.averaging import average_checkpoints
from keel.averaging.config import EMAConfig, PolyakConfig, SWAConfig
from keel.config import validate
from keel.data.seq_warmup import SeqWarmupConfig, SequenceLengthWarmup, _sequence_length, reshape_sequences, \
    truncate_sequences
from keel.diagnose.update_ratio import UpdateRatio as UpdateRatioUnit
from keel.errors import KeelError, TrainingUnstableError
from keel.grad import Clipper, LossSpikeDetector, NonFiniteConfig, SpikeConfig, all_ranks_agree, grads_are_finite
from keel.integrations.callbacks import clip_config, config_block, count, every_steps, last_checkpoint, \
    start_clipper, swa_phase_lr
from keel.integrations.scheduler import KeelLRScheduler, make_schedule, optimizer_and_scheduler
from keel.rundir.layout import AVERAGED_WEIGHTS
from keel.safetensors_io import write_safetensors
from keel.timeunits import Timeline

__all__ = ["EMA", "SWA", "CheckpointAverage", "Clip", "GradNorm", "KeelLRScheduler", "NonFinite", "Polyak",
           "SeqLenWarmup", "SpikeRollback", "UpdateRatio", "applied_steps", "keel_optimizers", "keel_scheduler"]


# ---------------------------------------------------------------------------------------------- schedules

def keel_scheduler(optimizer: torch.optim.Optimizer, schedule: Any, total_steps: int | float | None = None
                   ) -> dict[str, Any]:
    """Lightning's LR-scheduler config for a keel schedule: ``{"scheduler": KeelLRScheduler, "interval": "step"}``.

    ``schedule`` is a keel schedule object (``keel.schedules.cosine_decay(...)``, any ``step -> lr`` function) or
    the mapping a keel config's ``schedule:`` block holds (``{"name": "cosine", "warmup": 5, "min_lr": 0.0}``; its
    peak LR is the optimizer's). ``total_steps``: the run length in optimizer updates, needed by decays and
    fractions (``self.trainer.estimated_stepping_batches`` in ``configure_optimizers``).
    """
    return {"scheduler": KeelLRScheduler(optimizer, make_schedule(optimizer, schedule, total_steps)),
            "interval": "step"}


def keel_optimizers(model: torch.nn.Module, config: Any, total_steps: int | float | None = None) -> dict[str, Any]:
    """``configure_optimizers``' return value from a keel config (a ``TrainConfig`` or a mapping with ``optimizer``,
    ``schedule`` and ``max_steps``, completed as ``keel train`` completes them): keel's optimizer through the
    registry, with keel's param groups, and ``keel_scheduler`` over ``total_steps`` (default ``max_steps``)."""
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- shared

class KeelCallback(Callback):
    """What keel's Lightning callbacks share: a name (its state's key in the checkpoint is ``keel_<name>``), the
    updates it skipped or undid (``steps_not_applied``) and whether it skips the update being made (``skipping``)."""

    name = "keel"
    steps_not_applied = 0
    skipping = False
    _skipped_at: int | None = None  # Lightning's global_step of the update this callback is skipping

    @property
    def state_key(self) -> str:
        return f"keel_{self.name}"

    def snapshot_state(self) -> Any:
        """A copy of the state a loss-spike rollback puts back (None: nothing to put back)."""
        return None

    def restore_snapshot(self, state: Any) -> None: ...


def applied_steps(trainer: pl.Trainer) -> int:
    """keel's step: optimizer updates applied so far (``global_step`` less those keel's callbacks skipped or undid;
    an update being skipped counts as not applied at once, before Lightning counts its step)."""
    step = trainer.global_step
    for callback in trainer.callbacks:
        step -= getattr(callback, "steps_not_applied", 0)
        if getattr(callback, "skipping", False) and getattr(callback, "_skipped_at", None) == trainer.global_step:
            step += 1  # Lightning has not counted this step yet
    return step


def update_skipped(trainer: pl.Trainer) -> bool:
    """Whether a keel callback skips the update of the current step."""
    return any(getattr(cb, "skipping", False) for cb in trainer.callbacks)


def _keel_schedulers(trainer: pl.Trainer) -> list[KeelLRScheduler]:
    return [c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, KeelLRScheduler)]


def run_timeline(trainer: pl.Trainer) -> Timeline:
    """This Lightning run's time: ``estimated_stepping_batches`` updates, an epoch of
    ``ceil(num_training_batches / accumulate_grad_batches)`` updates (Lightning also steps on an epoch's last batch,
    as its ``estimated_stepping_batches`` counts); no epoch for a loader without a length."""
    total = trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else None
    timeline = Timeline.at_rate(int(total) if math.isfinite(total) else None, steps_per_epoch=per_epoch)
    if per_epoch is None:
        timeline.what = "a train dataloader without a length"
    return timeline


def _steps(trainer: pl.Trainer, value: int | str, key: str) -> int:
    """A length in keel's time units, in optimizer steps of this Lightning run."""
    return run_timeline(trainer).steps(value, key)


def _drop_gradients(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, callback: KeelCallback) -> None:
    """Skip the update being made: no gradient (the optimizer leaves such parameters and their state alone), the
    schedule held, the step not counted."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    for scheduler in _keel_schedulers(trainer):
        scheduler.hold()
    callback.skipping, callback._skipped_at = True, trainer.global_step
    callback.steps_not_applied += 1


def _last_checkpoint(trainer: pl.Trainer) -> str:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") if callback else ""
    return last_checkpoint(path)


def _clone(state: Any) -> Any:
    return copy.deepcopy(state)


class _Stepped:
    """Tells at ``on_train_batch_end`` whether an optimizer step was made since the last call (not while
    Lightning accumulates gradients)."""

    def __init__(self) -> None:
        self.seen: int | None = None

    def __call__(self, trainer: pl.Trainer) -> bool:
        stepped = self.seen is not None and trainer.global_step != self.seen
        self.seen = trainer.global_step
        return stepped


# ---------------------------------------------------------------------------------------------- averaging

class _Averaging(KeelCallback):
    """Updates an average after applied updates; validation runs with the average swapped in and the raw weights
    back after; ``checkpoint_weights="averaged"`` saves the average as the checkpoint's ``state_dict`` (the raw
    weights ride in the callback's state, so resuming continues from them)."""

    def __init__(self, name: str, config, checkpoint_weights: str, apply_at_end: bool):
        if checkpoint_weights not in ("averaged", "raw"):
            raise KeelError(f"{name}.checkpoint_weights: {checkpoint_weights!r}; allowed: averaged, raw")
        self.name, self.config = name, config
        self.checkpoint_weights, self.apply_at_end = checkpoint_weights, apply_at_end
        self.unit = None
        self.start, self.every = 0, 1
        self._pending: dict[str, Any] | None = None
        self._module: pl.LightningModule | None = None
        self._swapped = False
        self._stepped = _Stepped()

    def make_unit(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        raise NotImplementedError

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        raw = (self._pending or {}).pop("raw", None)
        if raw is not None:  # the checkpoint's state_dict holds the average: training goes on from the raw weights
            pl_module.load_state_dict(raw)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        timeline = run_timeline(trainer)
        self.start = timeline.steps(self.config.start, f"{self.name}.start")
        self.every = every_steps(timeline, self.config.every, f"{self.name}.every")
        self.unit = self.make_unit(trainer, pl_module)
        if self._pending is not None:
            self.unit.load_state_dict({"num_updates": self._pending["num_updates"],
                                       "shadow": self._pending.get("shadow")})
            self._pending = None
        self._stepped.seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped(trainer) or update_skipped(trainer):
            return
        step = applied_steps(trainer) - 1  # the update just applied
        if step >= self.start and (step - self.start) % self.every == 0:
            self.unit.update()

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the average ready to use (SWA recomputes BatchNorm statistics)."""

    def _ready(self) -> bool:
        return self.unit is not None and self.unit.num_updates > 0

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.config.evaluate and self._ready() and not trainer.sanity_checking and not self._swapped:
            self.prepare(trainer, pl_module)
            self.unit.swap()
            self._swapped = True

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_back()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap_back()

    def _swap_back(self) -> None:
        if self._swapped:
            self.unit.swap()
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.apply_at_end and self._ready():
            self.prepare(trainer, pl_module)
            self.unit.copy_to(pl_module)

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        if not self._ready():
            return dict(self._pending or {"num_updates": 0})
        swapped = self._swapped
        self._swap_back()
        state = {"num_updates": self.unit.num_updates, "shadow": {k: v.clone() for k, v in self.unit.shadow.items()}}
        if self.checkpoint_weights == "averaged":
            state["raw"] = {k: v.detach().clone() for k, v in self._module.state_dict().items()}
        if swapped:
            self.unit.swap()
            self._swapped = True
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)  # the unit needs the model: restored when training starts

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_weights != "averaged" or not self._ready():
            return
        swapped = self._swapped
        if not swapped:
            self.prepare(trainer, pl_module)
            self.unit.swap()
        try:
            checkpoint["state_dict"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        finally:
            if not swapped:
                self.unit.swap()

    def snapshot_state(self) -> Any:
        return None if not self._ready() else {"num_updates": self.unit.num_updates,
                                               "shadow": {k: v.clone() for k, v in self.unit.shadow.items()}}

    def restore_snapshot(self, state: Any) -> None:
        if self.unit is not None:
            self.unit.load_state_dict(state if state is not None else {"num_updates": 0, "shadow": None})


class EMA(_Averaging):
    """Exponential moving average of the weights (``keel.averaging.EMA``): fixed ``decay``, OpenNMT-tf's
    ``dynamic_decay`` (d_k = min(decay, (1 + k) / (10 + k))), the warmup form or a ``half_life``; updated every
    ``every`` applied updates from ``start``. Validation runs with the EMA weights swapped in; checkpoints hold them
    as their ``state_dict`` (``checkpoint_weights="averaged"``, OpenNMT-tf's choice) with the raw ones in the
    callback's state for resuming. Keys and checks are those of keel's ``ema:`` block."""

    def __init__(self, decay: float = 0.9999, *, dynamic_decay: bool = False, warmup_gamma: float | None = None,
                 warmup_power: float | None = None, half_life: int | str | None = None, every: int | str = 1,
                 start: int | str = 0, include_buffers: bool = True, device: str | None = None,
                 dtype: str | None = None, evaluate: bool = True,
                 checkpoint_weights: Literal["averaged", "raw"] = "averaged", apply_at_end: bool = False,
                 name: str = "ema"):
        config = config_block(EMAConfig, decay=decay, dynamic_decay=dynamic_decay, warmup_gamma=warmup_gamma,
                             warmup_power=warmup_power, half_life=half_life, every=every, start=start,
                             include_buffers=include_buffers, device=device, dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, checkpoint_weights, apply_at_end)

    def make_unit(self, trainer, pl_module) -> EMAUnit:
        return EMAUnit.from_config(pl_module, self.config, every=self.every, steps=functools.partial(_steps, trainer),
                                   name=self.name)


class Polyak(_Averaging):
    """Polyak-Ruppert averaging (``keel.averaging.Polyak``): the uniform mean of the weights from ``start`` on."""

    def __init__(self, start: int | str = "50%", *, every: int | str = 1, include_buffers: bool = True,
                 device: str | None = None, dtype: str | None = None, evaluate: bool = True,
                 checkpoint_weights: Literal["averaged", "raw"] = "raw", apply_at_end: bool = False,
                 name: str = "polyak"):
        config = config_block(PolyakConfig, start=start, every=every, include_buffers=include_buffers,
                             device=device, dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, checkpoint_weights, apply_at_end)

    def make_unit(self, trainer, pl_module) -> PolyakUnit:
        return PolyakUnit.from_config(pl_module, self.config)


class SWA(_Averaging):
    """Stochastic Weight Averaging (``keel.averaging.SWA``, Izmailov et al. 2018): from ``start`` the LR moves to
    ``lr`` over ``anneal_steps`` (``swa_learning_rate``; none when ``lr`` is None), a uniform mean every ``every``
    steps, BatchNorm statistics recomputed over ``bn_batches`` training batches before the average is evaluated or
    applied (``bn_forward(module, batch)``, default ``module(batch[0])``)."""

    def __init__(self, start: int | str = "75%", *, lr: float | None = None, anneal_steps: int | str = 0,
                 anneal_strategy: Literal["cos", "linear"] = "cos", every: int | str = 1,
                 include_buffers: bool = False, bn_update: bool = True, bn_batches: int | None = None,
                 bn_forward: Callable[[torch.nn.Module, Any], Any] | None = None, device: str | None = None,
                 dtype: str | None = None, evaluate: bool = True,
                 checkpoint_weights: Literal["averaged", "raw"] = "raw", apply_at_end: bool = True,
                 name: str = "swa"):
        config = config_block(SWAConfig, start=start, lr=lr, anneal_steps=anneal_steps,
                             anneal_strategy=anneal_strategy, every=every, include_buffers=include_buffers,
                             bn_update=bn_update, bn_batches=bn_batches, device=device, dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, checkpoint_weights, apply_at_end)
        self.bn_forward = bn_forward
        self.anneal_steps = 0
        self.start_lr: float | None = None
        self._prepared: int | None = None

    def make_unit(self, trainer, pl_module) -> SWAUnit:
        self.anneal_steps = _steps(trainer, self.config.anneal_steps, f"{self.name}.anneal_steps")
        return SWAUnit.from_config(pl_module, self.config)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.config.lr is None or self.unit is None:
            return
        keel = _keel_schedulers(trainer)
        self.start_lr = swa_phase_lr(applied_steps(trainer), start=self.start, start_lr=self.start_lr,
                                     config=self.config, anneal_steps=self.anneal_steps,
                                     optimizers=trainer.optimizers, scheduler=keel[0] if keel else None)

    def prepare(self, trainer, pl_module) -> None:
        if not self.config.bn_update or self._prepared == self.unit.num_updates:
            return
        loader = trainer.train_dataloader
        if loader is None:
            return
        count = self.config.bn_batches or min(100, int(trainer.num_training_batches)
                                              if math.isfinite(trainer.num_training_batches) else 100)

        def batches():
            for i, batch in enumerate(loader):
                if i >= count:
                    return
                yield pl_module.transfer_batch_to_device(batch, pl_module.device, 0)

        self.unit.update_batchnorm(batches(), forward=self.bn_forward)
        self._prepared = self.unit.num_updates

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "start_lr": self.start_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start_lr = state.get("start_lr")


class CheckpointAverage(KeelCallback):
    """Checkpoint averaging at fit end (Vaswani et al. 2017; ``keel.averaging.average_checkpoints``): the raw weights
    are written every ``every`` applied updates as ``step_XXXXXXXX.safetensors`` in ``dirpath`` (default
    ``<default_root_dir>/keel_checkpoint_average``), the newest ``last`` kept; when training ends their mean is
    written to ``<dirpath>/averaged.safetensors`` and, with ``load``, put into the module."""

    name = "checkpoint_average"

    def __init__(self, every: int | str, last: int = 5, dirpath: str | Path | None = None, load: bool = True):
        self.every_spec, self.last = every, count(last, "CheckpointAverage.last")
        self.dirpath, self.load = dirpath, load
        self.every = 1
        self.files: list[str] = []
        self.averaged: Path | None = None
        self._stepped = _Stepped()

    def on_train_start(self, trainer, pl_module) -> None:
        self.every = every_steps(run_timeline(trainer), self.every_spec, "CheckpointAverage.every")
        self.folder = Path(self.dirpath or Path(trainer.default_root_dir) / "keel_checkpoint_average")
        self.files = [f for f in self.files if Path(f).is_file()]
        self._stepped.seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped(trainer) or update_skipped(trainer):
            return
        step = applied_steps(trainer)
        if step % self.every:
            return
        path = self.folder / f"step_{step:08d}.safetensors"
        files = [*[f for f in self.files if f != str(path)], str(path)]
        if trainer.is_global_zero:  # one writer; every rank keeps the list (the same weights on every rank)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, {k: v.detach() for k, v in pl_module.state_dict().items()},
                              metadata={"format": "pt", "step": str(step)})
            for old in files[: -self.last]:
                Path(old).unlink(missing_ok=True)
        self.files = files[-self.last:]

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.files:
            return
        trainer.strategy.barrier()  # the newest snapshot is written before any rank reads it
        averaged = average_checkpoints(self.files)
        if trainer.is_global_zero:
            self.averaged = self.folder / AVERAGED_WEIGHTS
            write_safetensors(self.averaged, averaged, metadata={"format": "pt", "keel_average": "checkpoints"})
        if self.load:
            pl_module.load_state_dict({k: v.to(pl_module.device) for k, v in averaged.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"files": list(self.files)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.files = [str(f) for f in state.get("files", [])]


# ---------------------------------------------------------------------------------------------- gradients

class Clip(KeelCallback):
    """Gradient clipping by ``keel.grad.Clipper``: ``mode`` norm | value | agc | percentile (the Tuning Playbook's
    90th percentile of the last ``window`` norms, after ``calibration_steps``) | none, from the end of the warmup
    with ``start_after_warmup`` (``warmup_steps``, default: the warmup of the run's ``keel_scheduler``). Logs the
    unclipped global norm as ``grad_norm`` and ``clipped`` every update. Runs in ``on_before_optimizer_step``, before
    Lightning's own clipping, which it refuses (leave ``gradient_clip_val`` unset; ``GradNorm``, which clips
    nothing, works beside it)."""

    name = "clip"

    def __init__(self, mode: str = "norm", *, max_norm: float = 1.0, max_value: float = 1.0,
                 percentile: float = 90.0, window: int = 1000, calibration_steps: int = 100, clipping: float = 0.01,
                 eps: float = 1e-3, start_after_warmup: bool = False, warmup_steps: int | None = None,
                 log: bool = True):
        self.config = clip_config(mode=mode, max_norm=max_norm, max_value=max_value, percentile=percentile,
                                  window=window, calibration_steps=calibration_steps, clipping=clipping, eps=eps,
                                  start_after_warmup=start_after_warmup)
        self.warmup_steps, self.log = warmup_steps, log
        self.clipper = Clipper(self.config)
        self._pending: dict[str, Any] | None = None
        self.last = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.gradient_clip_val and self.config.mode != "none":
            raise KeelError(f"gradient_clip_val: {trainer.gradient_clip_val} in the Lightning Trainer clips after "
                            "keel's Clip; allowed: Trainer(gradient_clip_val=None) with Clip")
        keel = _keel_schedulers(trainer)
        self.clipper = start_clipper(self.config, self._pending or self.clipper.state_dict(), self.warmup_steps,
                                     keel[0] if keel else None, "keel_scheduler")
        self._pending = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if update_skipped(trainer):
            return
        self.last = result = self.clipper(pl_module.parameters(), applied_steps(trainer))
        if self.log:
            pl_module.log("grad_norm", result.norm, on_step=True, on_epoch=False)
            pl_module.log("clipped", float(result.clipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)

    def snapshot_state(self) -> Any:
        return self.clipper.state_dict()

    def restore_snapshot(self, state: Any) -> None:
        self.clipper.load_state_dict(state)


class GradNorm(Clip):
    """Logs the unclipped global gradient norm (``grad_norm``) of every update and clips nothing (``Clip`` with
    ``mode="none"``): what ``keel diagnose`` reads for the Playbook's clip threshold."""

    name = "grad_norm"

    def __init__(self, log: bool = True):
        super().__init__("none", log=log)


class NonFinite(KeelCallback):
    """A NaN/inf loss or gradient skips the update (keel's non-finite guard): the gradients are dropped before
    ``optimizer.step()``, so weights, optimizer state, the keel schedule and the averages stay as they were; the count
    is logged as ``skipped``. ``max_consecutive_skips`` in a row stop the run with ``TrainingUnstableError`` naming the
    last checkpoint. Every data-parallel rank takes the same decision. With fp16 loss scaling a finite loss whose
    gradients overflow is left to the scaler (it skips the step and lowers the scale)."""

    name = "nonfinite"

    def __init__(self, max_consecutive_skips: int = 10):
        self.config = validate({"max_consecutive_skips": max_consecutive_skips}, NonFiniteConfig)
        self.skipped = 0
        self.streak = 0
        self._loss_finite = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.skipping = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss_finite, self._loss_finite = self._loss_finite, True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = all_ranks_agree(loss_finite and grads_are_finite(params, sync=False))
        if not finite and loss_finite and getattr(trainer.precision_plugin, "scaler", None) is not None:
            finite = True  # an fp16 overflow: the loss scaler skips this step itself and lowers the scale
        if finite:
            self.streak = 0
        else:
            _drop_gradients(trainer, optimizer, self)
            self.skipped += 1
            self.streak += 1
        pl_module.log("skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.streak >= self.config.max_consecutive_skips:
            raise TrainingUnstableError(
                f"training stopped at step {applied_steps(trainer)}: {self.streak} consecutive updates skipped for "
                f"non-finite loss or gradients (NonFinite.max_consecutive_skips: "
                f"{self.config.max_consecutive_skips}); {_last_checkpoint(trainer)}")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "streak": self.streak, "steps_not_applied": self.steps_not_applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.streak = int(state.get("skipped", 0)), int(state.get("streak", 0))
        self.steps_not_applied = int(state.get("steps_not_applied", 0))


class SpikeRollback(KeelCallback):
    """Loss-spike rollback in PaLM's manner over ``keel.grad.LossSpikeDetector`` (median + MAD of the last
    ``window`` losses; keel's ``spike:`` keys): a spiking loss skips its update and puts back the weights, the
    optimizer state, the keel schedule's position and keel's callbacks' states (EMA, clipping window) of the newest
    snapshot, taken every ``every`` applied updates and kept in memory (one copy of the model and the optimizer
    state). The data moves on, so the batches since the snapshot are skipped, as in PaLM (``skip_batches`` more are
    skipped after it); the LR is multiplied by ``lr_factor`` after each rollback; ``max_rollbacks`` stop the run
    with ``TrainingUnstableError``. Logged: ``rollbacks``."""

    name = "spike"

    def __init__(self, *, window: int = 100, factor: float = 6.0, min_history: int = 20, min_rise: float = 0.05,
                 every: int | str = 50, skip_batches: int = 0, lr_factor: float = 1.0, max_rollbacks: int = 5):
        self.config = validate({"enabled": True, "window": window, "factor": factor, "min_history": min_history,
                                "min_rise": min_rise, "skip_batches": skip_batches, "lr_factor": lr_factor,
                                "max_rollbacks": max_rollbacks}, SpikeConfig)
        c = self.config
        self.detector = LossSpikeDetector(c.window, c.factor, c.min_history, c.min_rise)
        self.every_spec, self.every = every, 1
        self.rollbacks = 0
        self.events: list[dict[str, Any]] = []
        self._loss = 0.0
        self._to_skip = 0
        self._snapshot: dict[str, Any] | None = None
        self._due = False
        self._stepped = _Stepped()

    def on_train_start(self, trainer, pl_module) -> None:
        self.every = every_steps(run_timeline(trainer), self.every_spec, "SpikeRollback.every")
        self._stepped.seen = trainer.global_step
        self._take_snapshot(trainer, pl_module)  # a spike can always roll back, even before the first snapshot

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.skipping = False
        if self._due:  # here, not at the end of the step before: every callback has finished that step
            self._due = False
            self._take_snapshot(trainer, pl_module)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss += float(loss.detach())  # the micro-batches' normalised losses add up to the step's loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss, self._loss = self._loss, 0.0
        if update_skipped(trainer) or not math.isfinite(loss):
            return  # the non-finite guard's case
        if self._to_skip > 0:
            self._to_skip -= 1
            _drop_gradients(trainer, optimizer, self)
            return
        if all_ranks_agree(not self.detector.is_spike(loss)):
            self.detector.update(loss)
            return
        self._roll_back(trainer, pl_module, optimizer, loss)

    def _roll_back(self, trainer, pl_module, optimizer, loss: float) -> None:
        threshold, step = self.detector.threshold(), applied_steps(trainer)
        if self.rollbacks >= self.config.max_rollbacks:
            raise TrainingUnstableError(
                f"training stopped at step {step}: loss {loss:.4f} spiked above {threshold:.4f} and cannot roll back "
                f"(SpikeRollback.max_rollbacks: {self.config.max_rollbacks} reached); {_last_checkpoint(trainer)}")
        snapshot = self._snapshot
        _drop_gradients(trainer, optimizer, self)
        pl_module.load_state_dict(snapshot["model"])
        for opt, state in zip(trainer.optimizers, snapshot["optimizers"]):
            opt.load_state_dict(_clone(state))
        for callback in trainer.callbacks:
            if isinstance(callback, KeelCallback) and callback is not self and callback.state_key in snapshot["cbs"]:
                callback.restore_snapshot(_clone(snapshot["cbs"][callback.state_key]))
        self.detector.load_state_dict(snapshot["detector"])
        self.steps_not_applied += step - snapshot["step"]  # with the spiking update (counted above): undone
        self.rollbacks += 1
        for scheduler in _keel_schedulers(trainer):
            scheduler.multiplier *= self.config.lr_factor
            scheduler.rewind(snapshot["step"])
            scheduler.hold()
        self._to_skip = self.config.skip_batches
        self.events.append({"step": step, "spike_loss": loss, "threshold": threshold, "to_step": snapshot["step"]})
        pl_module.log("rollbacks", float(self.rollbacks), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stepped(trainer) and not update_skipped(trainer) and applied_steps(trainer) % self.every == 0:
            self._due = True

    def _take_snapshot(self, trainer, pl_module) -> None:
        self._snapshot = {
            "step": applied_steps(trainer),
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizers": [_clone(opt.state_dict()) for opt in trainer.optimizers],
            "cbs": {cb.state_key: cb.snapshot_state() for cb in trainer.callbacks
                    if isinstance(cb, KeelCallback) and cb is not self},
            "detector": self.detector.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.detector.state_dict(), "rollbacks": self.rollbacks, "steps_not_applied": self.steps_not_applied,
                "to_skip": self._to_skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.steps_not_applied = int(state.get("steps_not_applied", 0))
        self._to_skip = int(state.get("to_skip", 0))


# ---------------------------------------------------------------------------------------------- data, diagnostics

class SeqLenWarmup(KeelCallback):
    """Sequence-length warmup (Li et al. 2022; ``keel.data.seq_warmup``): each training batch is cut to the length
    of the step, from ``start`` to the full length (``full``, default: the batch's own) over ``duration``; with
    ``keep_tokens_per_step`` rows are cut into chunks so every target is trained exactly once (the overlap of the last
    chunk masked with -100: the loss must ignore -100, as cross-entropy does by default), else truncated. Batches are
    changed in place (lists and dicts: torch's default collate gives those); for a tuple batch call
    ``cut(batch, step)`` from ``LightningModule.on_after_batch_transfer``. Logs ``seq_len``."""

    name = "seq_warmup"

    def __init__(self, start: int = 64, duration: int | str = "30%", *, full: int | None = None,
                 keep_tokens_per_step: bool = True, pacing: Literal["linear", "stepped"] = "linear", stages: int = 4,
                 log: bool = True):
        self.config = validate({"enabled": True, "start": start, "duration": duration,
                                "keep_tokens_per_step": keep_tokens_per_step, "pacing": pacing, "stages": stages},
                               SeqWarmupConfig)
        self.full, self.log = full, log
        self.duration: int | None = None
        self.unit: SequenceLengthWarmup | None = None
        self._saved: dict[str, Any] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        duration = _steps(trainer, self.config.duration, "SeqLenWarmup.duration")
        self.duration = self._saved["duration"] if self._saved else duration  # kept across a resume

    def cut(self, batch: Any, step: int) -> Any:
        """``batch`` cut to the length of ``step`` (a new batch; the unit is built from the first batch seen)."""
        if self.unit is None:
            full = self.full or (self._saved or {}).get("full") or _sequence_length(batch)
            if full is None:
                raise KeelError("SeqLenWarmup: the batch has no sequence dimension (no tensor of 2 or more dims); "
                                "allowed: batches of token sequences, (batch, length, ...)")
            self.unit = SequenceLengthWarmup(min(self.config.start, full), full,
                                             self.duration if self.duration is not None else 0,
                                             self.config.pacing, self.config.stages)
        length = self.unit(step)
        return reshape_sequences(batch, length) if self.config.keep_tokens_per_step \
            else truncate_sequences(batch, length)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = applied_steps(trainer)
        cut = self.cut(batch, step)
        if cut is not batch:
            if isinstance(batch, dict):
                batch.clear()
                batch.update(cut)
            elif isinstance(batch, list):
                batch[:] = cut
            else:
                raise KeelError(f"SeqLenWarmup: a {type(batch).__name__} batch cannot be changed from a callback; "
                                "allowed: list or dict batches, or call SeqLenWarmup.cut(batch, step) in "
                                "LightningModule.on_after_batch_transfer")
        if self.log:
            pl_module.log("seq_len", float(self.unit(step)), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        unit = self.unit
        return {} if unit is None else {"start": unit.start, "full": unit.full, "duration": unit.duration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state) if state else None


class UpdateRatio(KeelCallback):
    """Update-to-weight ratios ``||ΔW|| / ||W||`` of every weight matrix (``keel.diagnose.update_ratio``), measured
    on every ``every``-th applied update and logged as ``update_ratio/<name>`` (healthy around 1e-3); ``keel
    diagnose`` reads them from the run's log."""

    name = "update_ratio"

    def __init__(self, every: int = 1):
        self.every = count(every, "UpdateRatio.every")
        self.unit = UpdateRatioUnit()
        self.last: dict[str, float] = {}
        self._step: int | None = None
        self._stepped = _Stepped()

    def on_train_start(self, trainer, pl_module) -> None:
        self._stepped.seen = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = applied_steps(trainer)
        self._step = step if step % self.every == 0 else None
        if self._step is not None:
            self.unit.snapshot(pl_module.named_parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped(trainer) or self._step is None:
            return
        self._step = None
        if update_skipped(trainer):
            self.unit = UpdateRatioUnit()  # nothing was updated: drop the snapshot
            return
        self.last = self.unit.ratios(pl_module.named_parameters())
        if self.last:
            pl_module.log_dict({f"update_ratio/{k}": v for k, v in self.last.items()}, on_step=True, on_epoch=False)

    def restore_snapshot(self, state: Any) -> None:
        self.unit, self._step = UpdateRatioUnit(), None  # a rollback reloads the weights: a snapshot is stale

