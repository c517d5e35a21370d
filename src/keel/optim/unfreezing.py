"""The trainer's adapter for ``optimizer.unfreeze_at``: frozen parameters start training at a step (``unfreeze``).

``optimizer.freeze: [features]`` with ``optimizer.unfreeze_at: 300`` trains a new head on frozen features for 300
steps, then the whole network, in one run: the training-dynamics notes' "train the head first, then fine-tune".
"""

from __future__ import annotations

from keel.errors import KeelError
from keel.optim.param_groups import unfreeze
from keel.techniques import Callback


class UnfreezeCallback(Callback):
    """Sets ``requires_grad`` of the optimizer's frozen groups from the step, before every forward pass and after a
    resume or rollback; logs an ``unfreeze`` event at the step it happens."""

    name = "unfreeze"

    def on_run_start(self, trainer) -> None:
        unfreeze(trainer.optimizer, trainer.state.step)  # a resumed run is frozen exactly as it was at that step

    def on_step_start(self, trainer) -> None:
        count = unfreeze(trainer.optimizer, trainer.state.step)
        if count:
            trainer.log({"step": trainer.state.step, "event": "unfreeze", "parameters": count})
            trainer.say(f"step {trainer.state.step}: optimizer.unfreeze_at reached; {count} frozen parameter tensors "
                        "train from now on")


def unfreeze_callbacks(optimizer, world_size: int = 1) -> list[Callback]:
    """The callback the trainer needs for ``optimizer`` (none when no group waits for an ``unfreeze_at``)."""
    if not any("unfreeze_at" in group for group in optimizer.param_groups):
        return []
    if world_size > 1:
        raise KeelError("optimizer.unfreeze_at: not supported with several processes (data parallelism fixes which "
                        "parameters have gradients when the model is wrapped); allowed: one process, or null")
    return [UnfreezeCallback()]
