"""A golden run: a tiny training whose losses are pinned, to catch silent drift in the data, model or recipe.

The numbers hold on the CPU (tiny_config pins device=cpu, on a GPU machine too; CUDA kernels round differently).
The tolerance (1e-4 relative) absorbs float differences between CPU kernels; any change to sampling,
initialisation, the loss, the optimizer's parameter groups, the schedule or clipping moves these numbers
by far more. If a change is meant to alter training, update the numbers in the same commit and say why.
"""

import pytest
import torch

from keel.config import load_config
from keel.train import train

PINNED_TRAIN = {0: 5.550577163696289, 10: 5.0308685302734375, 20: 3.9570889472961426, 39: 3.486013889312744}
PINNED_VAL = [3.9632897675037384, 3.444782391190529]


def test_golden_tiny_run(tmp_path, tiny_overrides):
    torch.set_num_threads(1)
    overrides = tiny_overrides + ["max_steps=40", "eval_interval=20", "checkpoint_interval=40", f"out_dir={tmp_path / 'r'}"]
    result = train(load_config(None, overrides), quiet=True)
    losses = {r["step"]: r["loss"] for r in result["history"] if "grad_norm" in r}
    assert {step: losses[step] for step in PINNED_TRAIN} == pytest.approx(PINNED_TRAIN, rel=1e-4)
    assert [r["val_loss"] for r in result["history"] if "val_loss" in r] == pytest.approx(PINNED_VAL, rel=1e-4)
