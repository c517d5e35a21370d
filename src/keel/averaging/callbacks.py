"""Trainer adapters for the averaging units: a few lines each around `EMA`, `Polyak`, `SWA` and snapshots.

Each averaging callback updates its unit after applied optimizer steps (`on_step_end`, never called for skipped
steps), evaluates the averaged weights swapped into the model (`val_loss_<name>`), writes them into every
checkpoint as `<name>.safetensors` and keeps its state (update count, shadow) for an exact resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keel import rundir
from keel.averaging.config import CheckpointAverageConfig, EMAConfig, PolyakConfig, SnapshotConfig, SWAConfig
from keel.averaging.ema import EMA
from keel.averaging.shadow import ShadowWeights, model_tensors
from keel.averaging.swa import SWA, Polyak, swa_learning_rate
from keel.errors import KeelError
from keel.safetensors_io import SafetensorsReader, write_safetensors
from keel.schedules import set_lr
from keel.techniques import Callback, register_technique


def _steps(trainer, value, key: str) -> int:
    """A length in time units: the first step at which the run's clock reaches it (``keel.timeunits``)."""
    return trainer.timeline.steps(value, key)


class AveragingCallback(Callback):
    """Shared adapter: when to update, evaluating swapped in, saving, and resuming the shadow.

    Its average is a weight set of the run (``keel.train.export``): scored as ``val_loss_<name>``, saved as
    ``<name>.safetensors``, and exportable as the run's weights.
    """

    weight_set = True

    def __init__(self, name: str, config: EMAConfig | PolyakConfig | SWAConfig) -> None:
        self.name = name
        self.config = config
        self.unit: ShadowWeights | None = None
        self._pending: dict[str, Any] | None = None
        self.start = 0
        self.every = 1
        self._trainer = None

    def make_unit(self, trainer) -> ShadowWeights:
        raise NotImplementedError

    # ---- run ---------------------------------------------------------------------------------------------------
    def on_run_start(self, trainer) -> None:
        self.start = _steps(trainer, self.config.start, f"{self.name}.start")
        self.every = _steps(trainer, self.config.every, f"{self.name}.every")
        if self.every < 1:
            raise KeelError(f"{self.name}.every: {self.config.every!r} resolves to 0 steps; allowed: >= 1 step")
        self._trainer = trainer
        self.unit = self.make_unit(trainer)
        if self._pending is not None:
            self._restore(trainer, self._pending)
            self._pending = None

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step - 1  # the update just applied (keel's step: 0 for the first update)
        if step >= self.start and (step - self.start) % self.every == 0:
            self.unit.update()

    def on_eval(self, trainer, metrics: dict[str, Any]) -> None:
        if self.config.evaluate and self.unit.num_updates > 0:
            self.prepare(trainer)
            with self.unit.swapped():
                for key, value in trainer.evaluate().items():
                    metrics[f"{key}_{self.name}"] = value

    def prepare(self, trainer) -> None:
        """Make the average ready to use (SWA recomputes BatchNorm statistics here)."""

    def on_checkpoint(self, trainer, ckpt_dir: Path) -> None:
        if self.config.save and self.unit.num_updates > 0:
            self.prepare(trainer)
            self.unit.export(ckpt_dir / rundir.weights_name(self.name), metadata={"step": str(trainer.state.step)})

    # ---- state -------------------------------------------------------------------------------------------------
    def _shadow_file(self) -> str | None:
        """The checkpoint file holding the shadow bit for bit, if this callback writes one."""
        return rundir.weights_name(self.name) if self.config.save else None

    def state_dict(self) -> dict[str, Any]:
        if self.unit is None:
            return dict(self._pending or {})
        if self.unit.num_updates > 0:
            self.prepare(self._trainer)  # what on_checkpoint writes is then exactly the state
        state = self.unit.state_dict()
        file = self._shadow_file()
        if file is not None and self.unit.num_updates > 0:
            return {"num_updates": state["num_updates"], "shadow_file": file}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state  # the unit needs the model: restored in on_run_start

    def _restore(self, trainer, state: dict[str, Any]) -> None:
        if "shadow_file" in state:
            path = trainer.restored_from / state["shadow_file"]
            if not path.is_file():
                raise KeelError(f"{self.name}: resume needs {str(path)!r}, which is missing")
            with SafetensorsReader(path) as reader:
                shadow = {name: reader.read(name) for name in reader.tensors}
            state = {"num_updates": state["num_updates"], "shadow": shadow}
        self.unit.load_state_dict(state)


class EMACallback(AveragingCallback):
    """`ema` block: exponential moving average; optionally OpenNMT-tf's mode (checkpoints hold the EMA weights)."""

    def __init__(self, config: EMAConfig) -> None:
        super().__init__("ema", config)
        self._announced = False

    def on_run_start(self, trainer) -> None:
        super().on_run_start(trainer)
        if self.config.checkpoint_weights == "ema":
            trainer.export.weights = "ema"  # the run exports what its checkpoints hold
            if not self._announced:
                self._announced = True
                trainer.say("weights: every checkpoint's model.safetensors and the exported model.safetensors hold "
                            "the ema weights (ema.checkpoint_weights: ema); the raw ones stay in raw.safetensors")

    def make_unit(self, trainer) -> EMA:
        return EMA.from_config(trainer.model, self.config, every=self.every, steps=trainer.timeline.steps)

    def _shadow_file(self) -> str | None:
        return rundir.weights_name("ema") if (self.config.save or self.config.checkpoint_weights == "ema") else None

    def on_checkpoint(self, trainer, ckpt_dir: Path) -> None:
        if self.unit.num_updates == 0:
            return
        if self._shadow_file() is not None:
            self.unit.export(ckpt_dir / rundir.weights_name("ema"), metadata={"step": str(trainer.state.step)})
        if self.config.checkpoint_weights == "ema":
            # OpenNMT-tf: the checkpoint's weights are the averaged ones; the raw ones stay beside them for resume.
            raw = {k: v.detach() for k, v in trainer.model.state_dict().items()}
            write_safetensors(ckpt_dir / rundir.RAW_WEIGHTS, raw)
            averaged = self.unit.averaged_state_dict()
            write_safetensors(ckpt_dir / rundir.MODEL_WEIGHTS, averaged, dtypes={k: v.dtype for k, v in raw.items()})

    def _restore(self, trainer, state: dict[str, Any]) -> None:
        super()._restore(trainer, state)
        if self.config.checkpoint_weights == "ema" and state.get("num_updates", 0) > 0:
            path = trainer.restored_from / rundir.RAW_WEIGHTS
            if not path.is_file():
                raise KeelError(f"ema: resume needs the raw weights {str(path)!r}, which are missing")
            targets = model_tensors(trainer.model)
            with SafetensorsReader(path) as reader, torch.no_grad():
                for name in reader.tensors:
                    targets[name].copy_(reader.read(name))


class PolyakCallback(AveragingCallback):
    """`polyak` block: the uniform mean of the weights from `start` on."""

    def __init__(self, config: PolyakConfig) -> None:
        super().__init__("polyak", config)

    def make_unit(self, trainer) -> Polyak:
        return Polyak.from_config(trainer.model, self.config)


class SWACallback(AveragingCallback):
    """`swa` block: SWA's LR phase from `start`, a uniform mean every `every` steps, BatchNorm recomputed."""

    def __init__(self, config: SWAConfig) -> None:
        super().__init__("swa", config)
        self.anneal_steps = 0
        self._prepared_updates: int | None = None

    def make_unit(self, trainer) -> SWA:
        self.anneal_steps = _steps(trainer, self.config.anneal_steps, "swa.anneal_steps")
        return SWA.from_config(trainer.model, self.config)

    def on_step_start(self, trainer) -> None:
        if self.config.lr is None:
            return
        lr = swa_learning_rate(
            trainer.state.step, start=self.start, start_lr=trainer.schedule(self.start), swa_lr=self.config.lr,
            anneal_steps=self.anneal_steps, strategy=self.config.anneal_strategy,
        )
        if lr is not None:  # scaled like the schedule after loss-spike rollbacks
            set_lr(trainer.optimizer, lr * trainer.state.lr_multiplier)

    def prepare(self, trainer) -> None:
        # Recompute BatchNorm statistics once per new average; the same weights and batches give the same result,
        # so a resumed run (which recomputes once more) stays identical to an uninterrupted one.
        if not self.config.bn_update or self._prepared_updates == self.unit.num_updates:
            return
        task = trainer.task
        count = self.config.bn_batches or min(100, task.batches_per_epoch)
        batches = (task.train_batch(i) for i in range(count))
        self.unit.update_batchnorm(batches, forward=lambda model, batch: task.loss(model, trainer.to_device(batch)))
        self._prepared_updates = self.unit.num_updates


class SnapshotCallback(Callback):
    """`snapshot` block: the weights at the end of each cosine-restart cycle, in RUN_DIR/snapshots/.

    Snapshot ensembles, Huang et al. 2017.
    """

    name = "snapshot"

    def __init__(self, config: SnapshotConfig) -> None:
        self.config = config
        self.ends: set[int] = set()

    def on_run_start(self, trainer) -> None:
        total = trainer.timeline.total_steps
        if self.config.cycle is not None:
            offset, period = 0, _steps(trainer, self.config.cycle, "snapshot.cycle")
            mult = self.config.cycle_mult
        else:
            offset, period, mult = _restart_cycle(trainer.schedule)
        if period < 1:
            raise KeelError("snapshot.cycle: resolves to 0 steps; allowed: a cycle of at least 1 step")
        self.ends = set(cycle_ends(offset, period, mult, total))

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step
        if step not in self.ends or trainer.rank != 0:  # several ranks: rank 0 alone writes
            return
        folder = rundir.RunDir(trainer.run_dir).snapshots
        folder.mkdir(exist_ok=True)
        index = sorted(self.ends).index(step)
        tensors = {k: v.detach() for k, v in trainer.model.state_dict().items()}
        write_safetensors(folder / rundir.snapshot_name(step), tensors,
                          metadata={"format": "pt", "keel_snapshot": str(index), "step": str(step)})
        if self.config.keep is not None:
            existing = rundir.list_snapshots(folder)
            for old in existing[: max(0, len(existing) - self.config.keep)]:
                old.unlink()


class CheckpointAverageCallback(Callback):
    """`average` block: when training ends, the mean of the last N checkpoints (OpenNMT-tf's
    `average_last_checkpoints`; Vaswani et al. 2017) written as RUN_DIR/averaged.safetensors, evaluated on the
    validation split and reported (the summary's `average`). The run keeps at least N checkpoints for it."""

    name = "average"

    def __init__(self, config: CheckpointAverageConfig) -> None:
        self.config = config

    def on_run_start(self, trainer) -> None:
        trainer.keep_at_least(self.config.last)

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        from keel.averaging.checkpoints import average_checkpoints_to_file, resolve_checkpoints

        run = rundir.RunDir(trainer.run_dir)
        root, out, wanted = run.checkpoints, run.averaged_weights, self.config.last

        def average() -> list[int] | str:  # on rank 0: the steps averaged, or why nothing was
            count = min(wanted, len(rundir.list_checkpoints(root)))
            if count < 2:
                return "the run holds fewer than 2 checkpoints"
            try:
                files = resolve_checkpoints([root], last=count, weights=self.config.weights)
            except KeelError as error:  # e.g. average.weights: ema where the EMA started after some checkpoints
                return str(error)
            average_checkpoints_to_file(files, out)
            return [rundir.checkpoint_step(f.parent.name) for f in files]

        steps = trainer.dist.from_main(average)
        if isinstance(steps, str):  # the training itself went well: say why there is no average, do not fail
            trainer.say(f"average.last: {wanted}: nothing averaged ({steps})")
            return
        kept = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        with SafetensorsReader(out) as reader:
            trainer.dist.load_model_state_dict(trainer.model, {n: reader.read(n) for n in reader.tensors})
        metrics = trainer.evaluate()
        trainer.dist.load_model_state_dict(trainer.model, kept)
        summary["average"] = {"last": len(steps), "steps": steps, "weights": self.config.weights,
                              "file": out.name, **metrics}
        fewer = f" (of {wanted} asked for)" if len(steps) < wanted else ""
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        trainer.say(f"average of the last {len(steps)} checkpoints{fewer} (steps {', '.join(map(str, steps))}; "
                    f"{self.config.weights} weights): {shown} -> {out}")


def cycle_ends(offset: int, period: int, mult: float, total_steps: int) -> list[int]:
    """Steps (updates applied) at which the cycles of a restart schedule end, up to `total_steps`.

    Cycle i lasts period * mult**i steps and starts where the previous one ended; the first starts at `offset`.
    """
    ends, position, i = [], float(offset), 0
    while True:
        position += period * mult**i
        end = int(round(position))
        if end > total_steps:
            return ends
        ends.append(end)
        i += 1


def _restart_cycle(schedule) -> tuple[int, int, float]:
    """(offset, period, period_mult) of a cosine-restart schedule, looking through warmup wrappers."""
    offset = 0
    while getattr(schedule, "name", None) == "warmup":
        offset += int(schedule.params["steps"])
        schedule = schedule.params["schedule"]
    if getattr(schedule, "name", None) != "cosine_restarts":
        raise KeelError(
            f"snapshot.cycle: null needs a cosine_restarts schedule, but the schedule is {schedule!r}; "
            "allowed: schedule.name=cosine_restarts, or set snapshot.cycle"
        )
    return offset, int(schedule.params["period"]), float(schedule.params["period_mult"])


def _enabled(cls):
    return lambda block: cls(block) if block.enabled else None


register_technique("ema", EMAConfig, _enabled(EMACallback))
register_technique("polyak", PolyakConfig, _enabled(PolyakCallback))
register_technique("swa", SWAConfig, _enabled(SWACallback))
register_technique("snapshot", SnapshotConfig, _enabled(SnapshotCallback))
register_technique("average", CheckpointAverageConfig,
                   lambda block: CheckpointAverageCallback(block) if block.last is not None else None)
