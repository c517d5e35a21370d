"""keel's techniques as Hugging Face ``TrainerCallback``s (``pip install 'keel[hf]'``), and keel's optimizers and
schedules for ``Trainer(optimizers=...)``.

Each callback is a few lines around the unit keel's own trainer wraps: ``EMA``, ``Polyak``, ``SWA``
(``keel.averaging``), ``CheckpointAverage`` (``keel.averaging.average_checkpoints`` over the Trainer's own
``checkpoint-N/model.safetensors``), ``Clip`` (``keel.grad.Clipper``), ``NonFinite`` (``keel.grad.grads_are_finite``)
and ``UpdateRatio`` (``keel.diagnose.update_ratio``); ``keel_optimizers(model, config)`` returns ``(optimizer,
scheduler)``: keel's optimizer through the registry and a ``KeelLRScheduler`` of keel's schedule::

    optimizer, scheduler = keel_optimizers(model, {"optimizer": {"name": "adamw", "lr": 1e-3},
                                                   "schedule": {"name": "cosine", "warmup": 100}, "max_steps": 1000})
    trainer = Trainer(model, TrainingArguments(..., max_steps=1000, max_grad_norm=0), optimizers=(optimizer,
                      scheduler), callbacks=[EMA(0.999, dynamic_decay=True), Clip(max_norm=1.0)])

Events used: ``on_train_begin`` (the units are built, a resume reloads their state), ``on_step_begin``,
``on_pre_optimizer_step`` (gradients after the Trainer's own clipping, which ``Clip`` needs off:
``max_grad_norm=0``), ``on_step_end`` (after the update and the scheduler; ``state.global_step`` already counts it),
``on_evaluate`` (the averages evaluated with their weights swapped in: ``eval_loss_<name>``), ``on_save`` (each
callback's state beside the checkpoint as ``keel_<name>.safetensors``) and ``on_train_end``.

What the Trainer's events do not allow (docs/integrations.md has the workarounds): no event sees a step's loss, so
there is no ``SpikeRollback`` (the Trainer's ``training_step`` would feed keel's ``LossSpikeDetector``); no event
sees the batch, so there is no ``SeqLenWarmup`` (cut batches with ``keel.data.seq_warmup.reshape_sequences`` in a
``training_step`` override); a ``NonFinite`` skip finds the loss through the gradients alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch

try:
    from transformers import TrainerCallback
    from transformers.utils import SAFE_WEIGHTS_NAME  # the weights file of each checkpoint-N the Trainer writes
except ImportError:  # pragma: no cover - exercised where transformers is missing
    raise ImportError("keel.integrations.hf needs transformers: pip install 'keel[hf]'") from None
if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover
    raise ImportError("keel.integrations.hf needs transformers >= 4.43 (TrainerCallback.on_pre_optimizer_step): "
                      "pip install -U 'keel[hf]'")

from keel.averaging import EMA as EMAUnit
from keel.averaging import SWA as SWAUnit
from keel.averaging import Polyak as PolyakUnit
from keel.averaging import average_checkpoints
from keel.averaging.config import EMAConfig, PolyakConfig, SWAConfig
from keel.config import validate
from keel.diagnose.update_ratio import UpdateRatio as UpdateRatioUnit
from keel.errors import KeelError, TrainingUnstableError
from keel.grad import Clipper, NonFiniteConfig, grads_are_finite
from keel.integrations.callbacks import clip_config, config_block, count, every_steps, last_checkpoint, \
    start_clipper, swa_phase_lr
from keel.integrations.scheduler import KeelLRScheduler, optimizer_and_scheduler
from keel.rundir.layout import AVERAGED_WEIGHTS
from keel.safetensors_io import SafetensorsReader, write_safetensors
from keel.timeunits import Timeline

__all__ = ["EMA", "SWA", "CheckpointAverage", "Clip", "KeelLRScheduler", "NonFinite", "Polyak", "UpdateRatio",
           "applied_steps", "keel_optimizers"]

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def keel_optimizers(model: torch.nn.Module, config: Any, total_steps: int | None = None
                    ) -> tuple[torch.optim.Optimizer, KeelLRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)`` from a keel config (a ``TrainConfig`` or a mapping
    with ``optimizer``, ``schedule`` and ``max_steps``, completed as ``keel train`` completes them): keel's optimizer
    through the registry, with keel's param groups, and a ``KeelLRScheduler`` over ``total_steps`` updates (default
    ``max_steps``; give the same number as ``TrainingArguments.max_steps``)."""
    return optimizer_and_scheduler(model, config, total_steps)


# ---------------------------------------------------------------------------------------------- shared

def applied_steps(state) -> int:
    """keel's step: updates applied so far (``state.global_step`` less those ``NonFinite`` skipped)."""
    return state.global_step - getattr(state, "keel_skipped_updates", 0)


def _skipping(state) -> bool:
    return getattr(state, "keel_skipping", False)


def _keel_scheduler(lr_scheduler) -> KeelLRScheduler | None:
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler it is given
    return inner if isinstance(inner, KeelLRScheduler) else None


def _length(loader) -> int | None:
    try:
        return len(loader) or None
    except (TypeError, AttributeError, NotImplementedError):  # an iterable dataset: no length
        return None


def run_timeline(args, state, train_dataloader) -> Timeline:
    """The run's time as the Trainer counts it: ``state.max_steps`` updates, an epoch of
    ``max(1, ceil(len(train_dataloader) / gradient_accumulation_steps))`` updates (the Trainer's
    ``num_update_steps_per_epoch``: it steps on an epoch's last batch too); no epoch for a loader without a length,
    so a length in epochs is then an error rather than a guess."""
    total = state.max_steps if state.max_steps and state.max_steps > 0 else None
    batches = _length(train_dataloader) if train_dataloader is not None else None
    per_epoch = max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps))) if batches else None
    timeline = Timeline.at_rate(total, steps_per_epoch=per_epoch)
    if per_epoch is None:
        timeline.what = "a train_dataloader without a length"
    return timeline


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {k: _flatten(f"{prefix}/{k}", v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flatten(f"{prefix}/{i}", v, tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value: Any, reader: SafetensorsReader) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return reader.read(value["__tensor__"])
        return {k: _unflatten(v, reader) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, reader) for v in value]
    return value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """A callback's state as one safetensors file: the tensors, and the rest as JSON in the metadata (nothing is
    pickled)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten("state", state, tensors)
    write_safetensors(path, tensors, metadata={"format": "pt", "keel_state": json.dumps(tree)})


def load_state(path: Path) -> dict[str, Any]:
    with SafetensorsReader(path) as reader:
        if "keel_state" not in reader.metadata:
            raise KeelError(f"{str(path)!r}: not a keel callback state (no keel_state metadata)")
        return _unflatten(json.loads(reader.metadata["keel_state"]), reader)


class KeelTrainerCallback(TrainerCallback):
    """What keel's Trainer callbacks share: the name (state file ``keel_<name>.safetensors`` in each checkpoint) and
    saving and reloading that state around the Trainer's own checkpoints."""

    name = "keel"

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _state_path(self, args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}" / f"keel_{self.name}.safetensors"

    def on_save(self, args, state, control, **kwargs) -> None:
        saved = self.state_dict()
        if saved is not None and state.is_world_process_zero:
            save_state(self._state_path(args, state), saved)

    def _resume(self, args, state) -> None:
        """On a resumed run (global_step > 0 at train begin) reload the state saved with that checkpoint."""
        if state.global_step == 0 or self.state_dict() is None:
            return
        path = self._state_path(args, state)
        if not path.is_file():
            raise KeelError(f"{self.name}: resuming at step {state.global_step} needs {str(path)!r}, which is "
                            f"missing; allowed: resume from a checkpoint in output_dir written with this callback")
        self.load_state_dict(load_state(path))


def _last_checkpoint(args) -> str:
    found = sorted((int(m.group(1)), p) for p in Path(args.output_dir).glob("checkpoint-*")
                   if (m := CHECKPOINT.fullmatch(p.name)))
    return last_checkpoint(found[-1][1] if found else None)


# ---------------------------------------------------------------------------------------------- averaging

class _Averaging(KeelTrainerCallback):
    """Updates an average after applied updates; evaluates it swapped in (``eval_loss_<name>``); saves it with each
    checkpoint (``keel_<name>.safetensors``, the checkpoint's ``model.safetensors`` stays the raw weights the
    Trainer resumes from); ``apply_at_end`` copies it into the model when training ends (before ``save_model``)."""

    def __init__(self, name: str, config, apply_at_end: bool):
        self.name, self.config, self.apply_at_end = name, config, apply_at_end
        self.unit = None
        self.start, self.every = 0, 1

    def make_unit(self, timeline: Timeline, model):
        raise NotImplementedError

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        timeline = run_timeline(args, state, train_dataloader)
        self.start = timeline.steps(self.config.start, f"{self.name}.start")
        self.every = every_steps(timeline, self.config.every, f"{self.name}.every")
        self.unit = self.make_unit(timeline, model)
        self._resume(args, state)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if _skipping(state) or self.unit is None:
            return
        step = applied_steps(state) - 1  # the update just applied
        if step >= self.start and (step - self.start) % self.every == 0:
            self.unit.update()

    def prepare(self, model, train_dataloader) -> None:
        """Make the average ready to use (SWA recomputes BatchNorm statistics)."""

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None,
                    train_dataloader=None, **kwargs) -> None:
        if not self.config.evaluate or self.unit is None or self.unit.num_updates == 0 or eval_dataloader is None:
            return
        self.prepare(model, train_dataloader)
        with self.unit.swapped():
            loss = evaluation_loss(model, eval_dataloader)
        key = f"eval_loss_{self.name}"
        if metrics is not None:
            metrics[key] = loss
        state.log_history.append({key: loss, "step": state.global_step})

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        if self.apply_at_end and self.unit is not None and self.unit.num_updates > 0:
            self.prepare(model, train_dataloader)
            self.unit.copy_to(model)

    def state_dict(self) -> dict[str, Any] | None:
        if self.unit is None:
            return {"num_updates": 0}
        return {"num_updates": self.unit.num_updates, "shadow": dict(self.unit.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unit.load_state_dict({"num_updates": state["num_updates"], "shadow": state.get("shadow")})


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, batches) -> float:
    """The mean of the model's ``loss`` over the examples of ``batches`` (each batch's loss weighted by its number of
    examples, as the Trainer's ``eval_loss``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch)
            loss = out["loss"] if isinstance(out, dict) else out.loss
            size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            total += float(loss) * size
            count += size
    finally:
        model.train(was_training)
    return total / max(count, 1)


class EMA(_Averaging):
    """Exponential moving average of the weights (``keel.averaging.EMA``): fixed ``decay``, OpenNMT-tf's
    ``dynamic_decay`` (d_k = min(decay, (1 + k) / (10 + k))), the warmup form or a ``half_life``; updated every
    ``every`` applied updates from ``start`` (keel's ``ema:`` keys and checks)."""

    def __init__(self, decay: float = 0.9999, *, dynamic_decay: bool = False, warmup_gamma: float | None = None,
                 warmup_power: float | None = None, half_life: int | str | None = None, every: int | str = 1,
                 start: int | str = 0, include_buffers: bool = True, device: str | None = None,
                 dtype: str | None = None, evaluate: bool = True, apply_at_end: bool = False, name: str = "ema"):
        config = config_block(EMAConfig, decay=decay, dynamic_decay=dynamic_decay, warmup_gamma=warmup_gamma,
                             warmup_power=warmup_power, half_life=half_life, every=every, start=start,
                             include_buffers=include_buffers, device=device, dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, apply_at_end)

    def make_unit(self, timeline: Timeline, model) -> EMAUnit:
        return EMAUnit.from_config(model, self.config, every=self.every, steps=timeline.steps, name=self.name)


class Polyak(_Averaging):
    """Polyak-Ruppert averaging (``keel.averaging.Polyak``): the uniform mean of the weights from ``start`` on."""

    def __init__(self, start: int | str = "50%", *, every: int | str = 1, include_buffers: bool = True,
                 device: str | None = None, dtype: str | None = None, evaluate: bool = True,
                 apply_at_end: bool = False, name: str = "polyak"):
        config = config_block(PolyakConfig, start=start, every=every, include_buffers=include_buffers, device=device,
                             dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, apply_at_end)

    def make_unit(self, timeline: Timeline, model) -> PolyakUnit:
        return PolyakUnit.from_config(model, self.config)


class SWA(_Averaging):
    """Stochastic Weight Averaging (``keel.averaging.SWA``): from ``start`` the LR moves to ``lr`` over
    ``anneal_steps`` (set in ``on_step_begin``; none when ``lr`` is None), a uniform mean every ``every`` steps,
    BatchNorm statistics recomputed over ``bn_batches`` training batches (``model(**batch)``) before the average is
    evaluated or applied; ``apply_at_end`` (default) leaves the average in the model."""

    def __init__(self, start: int | str = "75%", *, lr: float | None = None, anneal_steps: int | str = 0,
                 anneal_strategy: Literal["cos", "linear"] = "cos", every: int | str = 1,
                 include_buffers: bool = False, bn_update: bool = True, bn_batches: int | None = None,
                 device: str | None = None, dtype: str | None = None, evaluate: bool = True,
                 apply_at_end: bool = True, name: str = "swa"):
        config = config_block(SWAConfig, start=start, lr=lr, anneal_steps=anneal_steps, anneal_strategy=anneal_strategy,
                             every=every, include_buffers=include_buffers, bn_update=bn_update, bn_batches=bn_batches,
                             device=device, dtype=dtype, evaluate=evaluate)
        super().__init__(name, config, apply_at_end)
        self.anneal_steps = 0
        self.start_lr: float | None = None
        self._prepared: int | None = None

    def make_unit(self, timeline: Timeline, model) -> SWAUnit:
        self.anneal_steps = timeline.steps(self.config.anneal_steps, f"{self.name}.anneal_steps")
        return SWAUnit.from_config(model, self.config)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        if self.config.lr is None or self.unit is None or optimizer is None:
            return
        self.start_lr = swa_phase_lr(applied_steps(state), start=self.start, start_lr=self.start_lr,
                                     config=self.config, anneal_steps=self.anneal_steps, optimizers=[optimizer],
                                     scheduler=_keel_scheduler(lr_scheduler))

    def prepare(self, model, train_dataloader) -> None:
        if not self.config.bn_update or self._prepared == self.unit.num_updates or train_dataloader is None:
            return
        count = self.config.bn_batches or 100
        device = next(model.parameters()).device

        def batches():
            for i, batch in enumerate(train_dataloader):
                if i >= count:
                    return
                yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        self.unit.update_batchnorm(batches(), forward=lambda m, batch: m(**batch))
        self._prepared = self.unit.num_updates

    def state_dict(self) -> dict[str, Any] | None:
        return {**super().state_dict(), "start_lr": self.start_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start_lr = state.get("start_lr")


class CheckpointAverage(TrainerCallback):
    """Checkpoint averaging when training ends (Vaswani et al. 2017; ``keel.averaging.average_checkpoints``): the
    mean of the ``model.safetensors`` of the newest ``last`` ``checkpoint-N`` folders the Trainer wrote in
    ``output_dir``, written to ``<output_dir>/averaged.safetensors`` and, with ``load``, put into the model (so a
    following ``trainer.save_model()`` or evaluation uses it)."""

    def __init__(self, last: int = 5, load: bool = True):
        self.last, self.load = count(last, "CheckpointAverage.last"), load
        self.files: list[Path] = []

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        found = sorted((int(m.group(1)), p / SAFE_WEIGHTS_NAME) for p in Path(args.output_dir).glob("checkpoint-*")
                       if (m := CHECKPOINT.fullmatch(p.name)) and (p / SAFE_WEIGHTS_NAME).is_file())
        self.files = [file for _, file in found[-self.last:]]
        if not self.files:
            return
        averaged = average_checkpoints(self.files)
        if state.is_world_process_zero:
            write_safetensors(Path(args.output_dir) / AVERAGED_WEIGHTS, averaged,
                              metadata={"format": "pt", "keel_average": "checkpoints"})
        if self.load:
            device = next(model.parameters()).device
            missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in averaged.items()}, strict=False)
            if unexpected:
                raise KeelError(f"CheckpointAverage: the checkpoints hold {unexpected[0]!r}, which the model lacks")


# ---------------------------------------------------------------------------------------------- gradients

class Clip(KeelTrainerCallback):
    """Gradient clipping by ``keel.grad.Clipper`` in ``on_pre_optimizer_step``: ``mode`` norm | value | agc |
    percentile (the Tuning Playbook's 90th percentile) | none, from the end of the warmup with
    ``start_after_warmup`` (``warmup_steps``, default the ``KeelLRScheduler``'s warmup). Needs the Trainer's own
    clipping off (``TrainingArguments(max_grad_norm=0)``); the Trainer then logs the unclipped ``grad_norm``."""

    name = "clip"

    def __init__(self, mode: str = "norm", *, max_norm: float = 1.0, max_value: float = 1.0,
                 percentile: float = 90.0, window: int = 1000, calibration_steps: int = 100, clipping: float = 0.01,
                 eps: float = 1e-3, start_after_warmup: bool = False, warmup_steps: int | None = None):
        self.config = clip_config(mode=mode, max_norm=max_norm, max_value=max_value, percentile=percentile,
                                  window=window, calibration_steps=calibration_steps, clipping=clipping, eps=eps,
                                  start_after_warmup=start_after_warmup)
        self.warmup_steps = warmup_steps
        self.clipper = Clipper(self.config)
        self.last = None
        self.clipped = 0

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs) -> None:
        if args.max_grad_norm:
            raise KeelError(f"max_grad_norm: {args.max_grad_norm} in TrainingArguments clips before keel's Clip; "
                            "allowed: TrainingArguments(max_grad_norm=0) with Clip")
        self.clipper = start_clipper(self.config, self.clipper.state_dict(), self.warmup_steps,
                                     _keel_scheduler(lr_scheduler), "keel_optimizers")
        self._resume(args, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if _skipping(state):
            return
        self.last = self.clipper(model.parameters(), applied_steps(state))
        self.clipped += int(self.last.clipped)

    def state_dict(self) -> dict[str, Any] | None:
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state)


class NonFinite(KeelTrainerCallback):
    """A NaN/inf gradient skips the update (keel's non-finite guard; a NaN/inf loss makes NaN/inf gradients): the
    gradients are dropped before ``optimizer.step()``, so weights, optimizer state, the ``KeelLRScheduler``'s position
    and keel's averages stay as they were. Each skip goes into the log history (``skipped``);
    ``max_consecutive_skips`` in a row stop training with ``TrainingUnstableError``. Not with ``fp16=True``: the
    loss scaler skips overflowing steps itself."""

    name = "nonfinite"

    def __init__(self, max_consecutive_skips: int = 10):
        self.config = validate({"max_consecutive_skips": max_consecutive_skips}, NonFiniteConfig)
        self.skipped = 0
        self.streak = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if getattr(args, "fp16", False):
            raise KeelError("NonFinite: TrainingArguments(fp16=True) skips overflowing steps with its loss scaler; "
                            "allowed: NonFinite with fp32 or bf16")
        self._resume(args, state)
        state.keel_skipped_updates, state.keel_skipping = self.skipped, False

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        state.keel_skipping = False

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs) -> None:
        if grads_are_finite(model.parameters()):
            self.streak = 0
            return
        for param in model.parameters():
            param.grad = None
        keel = _keel_scheduler(lr_scheduler)
        if keel is not None:
            keel.hold()
        self.skipped += 1
        self.streak += 1
        state.keel_skipping, state.keel_skipped_updates = True, self.skipped

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if not _skipping(state):
            return
        state.log_history.append({"skipped": self.skipped, "step": state.global_step})
        if self.streak >= self.config.max_consecutive_skips:
            raise TrainingUnstableError(
                f"training stopped at step {applied_steps(state)}: {self.streak} consecutive updates skipped for "
                f"non-finite gradients (NonFinite.max_consecutive_skips: {self.config.max_consecutive_skips}); "
                f"{_last_checkpoint(args)}")

    def state_dict(self) -> dict[str, Any] | None:
        return {"skipped": self.skipped, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.streak = int(state["skipped"]), int(state["streak"])


# ---------------------------------------------------------------------------------------------- diagnostics

class UpdateRatio(TrainerCallback):
    """Update-to-weight ratios ``||ΔW|| / ||W||`` of every weight matrix (``keel.diagnose.update_ratio``) on every
    ``every``-th applied update, appended to the log history as ``{"update_ratio": {name: ratio}, "step": N}``
    (in ``trainer_state.json``, where ``keel diagnose`` reads them)."""

    def __init__(self, every: int = 1):
        self.every = count(every, "UpdateRatio.every")
        self.unit = UpdateRatioUnit()
        self.last: dict[str, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if applied_steps(state) % self.every == 0:
            self.unit.snapshot(model.named_parameters())

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if not self.unit.armed:
            return
        if _skipping(state):
            self.unit = UpdateRatioUnit()
            return
        self.last = self.unit.ratios(model.named_parameters())
        if self.last:
            state.log_history.append({"update_ratio": self.last, "step": state.global_step})
