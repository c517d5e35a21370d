"""Trainer events. A technique enters the trainer as a thin ``Callback`` around its unit.

Events, in the order one step meets them: ``on_run_start``; per step ``on_step_start``, ``on_after_backward``,
``on_step_end`` (only after an applied update: ``trainer.state.step`` already counts it); ``on_eval`` (may add
keys such as ``val_loss_ema`` to the eval record); ``on_checkpoint`` (may write files into the checkpoint
directory before it is committed); ``on_run_end``. A callback signals with ``should_stop``; the trainer acts.
Its ``state_dict`` (tensors and plain containers) is saved in every checkpoint under ``name`` and handed back
to ``load_state_dict`` on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.train.loop import Trainer


class Callback:
    name: str = "callback"
    should_stop: bool = False

    def on_run_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer) -> None: ...

    def on_after_backward(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, ckpt_dir: Path) -> None: ...

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
