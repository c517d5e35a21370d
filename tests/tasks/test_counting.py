"""Tasks count what they train: a user's sequence model counts its target positions as tokens (not its sequences),
and the clock, the step records, the throughput and the start line follow."""

from pathlib import Path

import pytest
import torch
from torch import nn

from keel.config import load_config
from keel.tasks import PlainTask
from keel.train import train

HERE = Path(__file__).parent
LSTM = ["task=char_lstm:make", "threads=1", "device=cpu", "max_steps=3", "eval_interval=3", "checkpoint_interval=3",
        "data.batch_size=32"]


@pytest.fixture(autouse=True)
def user_module_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_a_character_lstm_counts_its_target_positions_as_tokens(tmp_path, capsys):
    result = train(load_config(None, LSTM + [f"out_dir={tmp_path / 'r'}"]))
    steps = [r for r in result["history"] if "grad_norm" in r]
    assert [r["tokens"] for r in steps] == [0, 2048, 4096]  # 32 sequences x 64 targets a step, counted before it
    assert result["tokens"] == 3 * 2048 and result["examples"] == 3 * 32
    out = capsys.readouterr().out
    assert "2,048 targets per step" in out
    assert "6,144 targets" in out  # the closing line


def test_ignored_targets_are_not_counted():
    targets = torch.tensor([[1, 2, -100, 3, -100]] * 8)
    data = torch.utils.data.TensorDataset(torch.zeros(8, 5, dtype=torch.long), targets)
    task = PlainTask(nn.Embedding(4, 4), data)
    batch = data[:8]
    assert task.tokens(batch) == 8 * 3
    ignoring = PlainTask(nn.Embedding(4, 4), data, loss_fn=nn.CrossEntropyLoss(ignore_index=3))
    assert ignoring.tokens(batch) == 8 * 4  # the loss's own ignore_index
    labels = torch.utils.data.TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    assert PlainTask(nn.Linear(2, 2), labels).tokens(labels[:8]) == 8  # a classifier: one target per example
