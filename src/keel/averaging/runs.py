"""Scoring weight files of keel runs on their validation split: find the run config, build the model, load weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from keel.averaging.ensemble import target_log_probs
from keel.averaging.safetensors_io import SafetensorsReader
from keel.errors import KeelError


def find_run_config(path: str | Path) -> Path | None:
    """The config.yaml of the run a weights file or directory belongs to (searched up to three levels up)."""
    path = Path(path).resolve()
    for folder in [path if path.is_dir() else path.parent, *list(path.parents)[:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (read tensor by tensor, no memory map)."""
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.tensors}


@dataclass
class ValidationScorer:
    """A run config's model and fixed validation windows, to score weight files on (one model in memory)."""

    config: object
    device: torch.device

    def __post_init__(self) -> None:
        from keel.data import load_tokens, sequential_windows
        from keel.precision import Precision

        c = self.config
        self.data = load_tokens(c.data.source, c.data.val_fraction, c.data.vocab_size)
        self.batches = list(
            sequential_windows(self.data.val, c.model.block_size, c.data.batch_size, c.data.eval_tokens)
        )
        self.precision = Precision(c.precision, self.device)

    @classmethod
    def from_config_file(cls, path: str | Path, device: str = "cpu") -> ValidationScorer:
        from keel.config import read_yaml, validate

        return cls(validate(read_yaml(path)), torch.device(device))

    def model(self, weights: dict[str, torch.Tensor] | str | Path) -> torch.nn.Module:
        """The run's model with `weights` (a state dict or a safetensors file) loaded."""
        from keel.models import GPT, GPTConfig

        if not isinstance(weights, dict):
            weights = load_weights(weights)
        model = GPT(GPTConfig(vocab_size=self.data.vocab_size, **self.config.model.model_dump()))
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise KeelError(f"weights do not fit the run's model: {' '.join(first[:3])}") from None
        return model.to(self.device)

    def log_probs(self, weights: dict[str, torch.Tensor] | str | Path) -> torch.Tensor:
        return target_log_probs(self.model(weights), self.batches, device=self.device, autocast=self.precision.autocast)

    def loss(self, weights: dict[str, torch.Tensor] | str | Path) -> float:
        """Mean validation cross-entropy (nats per token) of `weights`."""
        return float(-self.log_probs(weights).mean())


def scorer_for(inputs: list[Path], config: str | Path | None, device: str) -> ValidationScorer:
    """A scorer from `config`, or from the run config.yaml found beside the first input."""
    path = Path(config) if config is not None else find_run_config(inputs[0])
    if path is None:
        raise KeelError(
            f"--config: none given and no config.yaml found beside {str(inputs[0])!r}; "
            "allowed: --config RUN_DIR/config.yaml"
        )
    return ValidationScorer.from_config_file(path, device=device)
