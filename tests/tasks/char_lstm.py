"""A user's character-level LSTM, named in configs as ``char_lstm:make``: batches of 64-character sequences whose
targets are the next character at every position, and a loss averaged over all of them."""

import torch
from torch import nn

from keel.tasks import PlainTask

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
LENGTH = 64


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 128, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def sequences(offset: int, n: int) -> torch.utils.data.TensorDataset:
    codes = torch.tensor([ord(c) for c in TEXT], dtype=torch.long)
    starts = [(offset + 7 * i) % (len(codes) - LENGTH - 1) for i in range(n)]
    windows = torch.stack([codes[s:s + LENGTH + 1] for s in starts])
    return torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])


def sequence_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make(n: int = 256):
    return PlainTask(model=CharLSTM, train_data=sequences(0, n), val_data=sequences(3, 32), loss_fn=sequence_loss)
