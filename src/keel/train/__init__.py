"""The trainer: state, events, loop, checkpoints and the run directory."""

from keel.train.callbacks import Callback


def __getattr__(name: str):
    # The loop imports every unit; load it on first use so `keel.train.Callback` stays cheap to import.
    if name in ("Trainer", "TrainState", "train"):
        from keel.train import loop

        return getattr(loop, name)
    raise AttributeError(name)


__all__ = ["Callback", "TrainState", "Trainer", "train"]
