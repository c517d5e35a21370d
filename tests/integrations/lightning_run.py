"""The Lightning side of the tests: the tiny regression as a LightningModule, a recorder of the LR of each update,
and (run as a script) a training that kills itself with SIGKILL at a given step, for the resume test.

    python lightning_run.py OUT_DIR KILL_AT_STEP
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import torch
from integration_helpers import ResumableBatches, keel_config, make_net
from torch import nn

from keel.integrations.lightning import EMA, Clip, applied_steps, keel_optimizers

EPOCH = 4  # batches per epoch
KILL_STEPS = 3 * EPOCH
CHECKPOINT_EVERY = 3  # updates: the kill test's checkpoints fall mid-epoch


class Regression(L.LightningModule):
    """The tiny regression of integration_helpers as a LightningModule; ``poison`` maps a step to a loss factor
    (NaN or a spike) to inject."""

    def __init__(self, net: nn.Module, config, poison: dict[int, float] | None = None):
        super().__init__()
        self.net, self.config, self.poison = net, config, poison or {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        factor = self.poison.get(self.trainer.global_step)
        return loss * factor if factor is not None else loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return keel_optimizers(self, self.config)


class Recorder(L.Callback):
    """keel's step and the base LR of every update, as the update is made."""

    def __init__(self):
        self.lrs, self.steps = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = optimizer.param_groups[0]
        self.lrs.append(group["lr"] / group["lr_scale"])
        self.steps.append(applied_steps(trainer))


class KillAt(L.Callback):
    """SIGKILL this process when ``step`` updates have been applied (no cleanup, no final checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_run_callbacks(out_dir, extra=()):
    """EMA (dynamic decay) and clipping, a checkpoint every CHECKPOINT_EVERY updates (``last.ckpt``)."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), save_last=True,
                                                     every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
    return [EMA(0.9, dynamic_decay=True), Clip(max_norm=1.0), *extra, checkpoint]


def kill_run(out_dir, kill_at=None, ckpt_path=None):
    """Train KILL_STEPS updates (killed at ``kill_at``); return the module and the EMA callback."""
    torch.set_num_threads(1)
    config = keel_config(KILL_STEPS, os.path.join(out_dir, "unused"))
    module = Regression(make_net(), config)
    callbacks = kill_run_callbacks(out_dir, [KillAt(kill_at)] if kill_at is not None else [])
    trainer = L.Trainer(max_steps=KILL_STEPS, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(module, ResumableBatches(EPOCH), ckpt_path=ckpt_path)
    return module, callbacks[0]


if __name__ == "__main__":
    kill_run(sys.argv[1], kill_at=int(sys.argv[2]))
