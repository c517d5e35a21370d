"""Early stopping: end the run when an evaluation metric has not improved for ``patience`` evaluations.

The unit ``EarlyStopping`` decides from a stream of values; ``EarlyStoppingCallback`` feeds it each evaluation
record, asks the trainer to keep the best evaluation's checkpoint, and when it stops (or the run ends) asks the
trainer to export that checkpoint's weights: of the weight sets it holds (the raw weights, and averages such as the
EMA) the one that scores best by the metric there (``keel.train.export``). The summary reports those weights'
metrics and names the step; the last evaluation's are beside them (``last``).

A value counts as an improvement when it beats the best so far by more than ``min_delta`` (Keras' and
Lightning's convention): ``value < best - min_delta`` in ``min`` mode, ``value > best + min_delta`` in ``max``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import KeelError
from keel.techniques import Callback, register_technique


class EarlyStoppingConfig(BaseModel):
    """Stop when `metric` stops improving (off unless `patience` is set)."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_loss", description="Evaluation record key to watch (val_loss, val_accuracy, ...).")
    mode: Literal["min", "max"] = Field("min", description="'min': lower is better; 'max': higher is better.")
    patience: int | None = Field(
        None, ge=1, description="Evaluations without improvement before the run stops (null: early stopping off)."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class EarlyStopping:
    """Counts evaluations since the best value of a metric; ``update`` returns True once patience runs out."""

    def __init__(self, mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        if self.improves(value):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evaluations = state["best"], state["best_step"], state["bad_evaluations"]


class EarlyStoppingCallback(Callback):
    name = "early_stopping"

    def __init__(self, config: EarlyStoppingConfig):
        self.config = config
        self.unit = EarlyStopping(config.mode, config.patience, config.min_delta)

    def check(self, trainer) -> None:
        """The watched metric is one the evaluations will have: found before the run directory is made."""
        metric = self.config.metric
        keys = evaluation_keys(trainer)
        if metric in keys or any(metric == f"{key}_{callback.name}" for key in keys for callback in trainer.callbacks):
            return  # e.g. val_loss, or val_loss_ema (the EMA's evaluation, added by its callback)
        if metric.startswith("val_") and not any(key.startswith("val_") for key in keys):
            held = ", ".join(sorted(keys)) or "nothing"
            raise KeelError(f"early_stopping.metric: '{metric}' needs validation data, and task "
                            f"{trainer.config.task!r} has none (its evaluations hold {held}); allowed: a task with "
                            "validation data, or a metric it has")
        raise KeelError(f"early_stopping.metric: '{metric}' is not in the evaluation record; allowed: "
                        f"{', '.join(sorted(keys))} (and KEY_ema ... for an averaging technique that evaluates)")

    def on_run_start(self, trainer) -> None:
        trainer.track_best(self.config.metric, self.config.mode, self.config.min_delta)

    def on_eval(self, trainer, metrics: dict[str, Any]) -> None:
        if self.config.metric not in metrics:
            raise KeelError(f"early_stopping.metric: '{self.config.metric}' is not in the evaluation record; "
                            f"allowed: {', '.join(k for k in metrics if k not in ('step', 'tokens', 'kind'))}")
        if self.unit.update(float(metrics[self.config.metric]), trainer.state.step):
            self.should_stop = True
            trainer.say(f"early stopping at step {trainer.state.step}: {self.config.metric} has not improved by more "
                        f"than {self.config.min_delta:g} for {self.config.patience} evaluations (best "
                        f"{self.unit.best:.4f} at step {self.unit.best_step})")

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        if self.unit.best_step is None:
            return
        summary["best_step"] = self.unit.best_step
        summary[f"best_{self.config.metric}"] = self.unit.best
        summary["stopped_early"] = self.should_stop
        # Export the best checkpoint, and there the weight set (raw, or an average it holds) that scores best.
        trainer.export.step, trainer.export.metric, trainer.export.mode = (
            self.unit.best_step, self.config.metric, self.config.mode)

    def state_dict(self) -> dict[str, Any]:
        return {**self.unit.state_dict(), "should_stop": self.should_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unit.load_state_dict(state)
        self.should_stop = bool(state.get("should_stop", False))


def evaluation_keys(trainer) -> set[str]:
    """The keys the task puts into an evaluation record (``val_loss``, ``val_accuracy``, ``train_eval_loss`` ...):
    one batch of each split through ``task.eval_sums``, in eval mode without gradients, every RNG put back."""
    import torch

    from keel.tasks import move_to_device
    from keel.train import devices

    model, keys = trainer.model, set()
    was_training = model.training
    rng = devices.rng_state(trainer.device)
    model.eval()
    try:
        with torch.no_grad(), trainer.precision.autocast():
            for split, prefix in (("val", "val_"), ("train", "train_eval_")):
                batch = next(iter(trainer.task.eval_batches(split, 0, 1)), None)
                if batch is not None:
                    sums = trainer.task.eval_sums(model, move_to_device(batch, trainer.device))
                    keys |= {prefix + key for key in sums}
    finally:
        model.train(was_training)
        devices.set_rng_state(rng, trainer.device)
    return keys


register_technique("early_stopping", EarlyStoppingConfig,
                   lambda block: EarlyStoppingCallback(block) if block.patience is not None else None,
                   order=50)  # after the techniques that add to an evaluation (val_loss_ema), whatever the import order
