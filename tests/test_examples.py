import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"


def test_plain_loop_example_trains_with_keel_units(capsys):
    spec = importlib.util.spec_from_file_location("plain_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    val_loss = module.main(steps=40, block_size=32, batch_size=8)
    out = capsys.readouterr().out
    assert "val_loss_ema" in out and "unigram baseline" in out
    assert val_loss < math.log(256) - 1.0  # far below the uniform 5.55 nats after 40 steps
