"""Scoring weight files of keel runs on their validation split: find the run config, rebuild its task, load weights.

``keel average --eval`` and ``keel ensemble`` use this; they know nothing of the model or data: the run's
``config.yaml`` names the task, and the task builds the model and hands out the validation batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from keel.averaging.ensemble import Predictions, predictions
from keel.errors import KeelError
from keel.safetensors_io import SafetensorsReader


def find_run_config(path: str | Path) -> Path | None:
    """The config.yaml of the run a weights file or directory belongs to (searched up to three levels up)."""
    from keel.rundir import RunDir

    path = Path(path).resolve()
    for folder in [path if path.is_dir() else path.parent, *list(path.parents)[:3]]:
        if RunDir(folder).config.is_file():
            return RunDir(folder).config
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (read tensor by tensor, no memory map)."""
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.tensors}


@dataclass
class ValidationScorer:
    """A run config's task, its model (one in memory) and fixed validation batches, to score weight files on."""

    config: object
    device: torch.device

    def __post_init__(self) -> None:
        from keel import tasks
        from keel.precision import Precision

        self.task = tasks.from_config(self.config)
        self.batches = list(self.task.eval_batches("val"))
        if not self.batches:
            raise KeelError(f"task {self.config.task!r}: the validation split is empty; nothing to score on")
        self.precision = Precision(self.config.precision, self.device)
        self._model: torch.nn.Module | None = None

    @classmethod
    def from_config_file(cls, path: str | Path, device: str = "cpu") -> ValidationScorer:
        from keel.config import read_yaml, validate

        from keel.train.loop import resolve_device

        return cls(validate(read_yaml(path)), resolve_device(device))

    def model(self, weights: dict[str, torch.Tensor] | str | Path) -> torch.nn.Module:
        """The run's model with `weights` (a state dict or a safetensors file) loaded."""
        if not isinstance(weights, dict):
            weights = load_weights(weights)
        if self._model is None:
            torch.manual_seed(0)  # the weights are replaced: any initialisation will do, a fixed one is cheaper
            self._model = self.task.build_model().to(self.device)
        try:
            self._model.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise KeelError(f"weights do not fit the run's model: {' '.join(first[:3])}") from None
        return self._model

    def predictions(self, weights: dict[str, torch.Tensor] | str | Path) -> Predictions:
        """log p(target) of every validation target under `weights`, and a classifier's distributions."""
        model = self.model(weights)
        return predictions(model, self.batches, device=self.device, autocast=self.precision.autocast,
                           forward=self.task.logits)

    def log_probs(self, weights: dict[str, torch.Tensor] | str | Path) -> torch.Tensor:
        """log p(target) of every validation target under `weights`."""
        return self.predictions(weights).log_probs

    def loss(self, weights: dict[str, torch.Tensor] | str | Path) -> float:
        """Mean validation cross-entropy (nats per target) of `weights`."""
        return float(-self.log_probs(weights).mean())


def scorer_for(inputs: list[Path], config: str | Path | None, device: str,
               option: str = "--config") -> ValidationScorer:
    """A scorer from `config`, or from the run config.yaml found beside the first input. A run trained through the
    Python API (``task: python``) cannot be rebuilt: a KeelError naming ``option`` says so before anything is built."""
    from keel.config import read_yaml
    from keel.tasks import PYTHON_TASK

    path = Path(config) if config is not None else find_run_config(inputs[0])
    if path is None:
        raise KeelError(
            f"--config: none given and no config.yaml found beside {str(inputs[0])!r}; "
            "allowed: --config RUN_DIR/config.yaml"
        )
    if read_yaml(path).get("task") == PYTHON_TASK:
        raise KeelError(
            f"{option}: the run of {str(path)!r} was trained through the Python API (task: python), so keel cannot "
            "rebuild its model and data to score weights; allowed: without --eval (then load the averaged file into "
            "your model in Python), or --config naming a task keel builds (lm, digits or package.module:factory)"
        )
    return ValidationScorer.from_config_file(path, device=device)
