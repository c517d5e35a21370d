"""Gradient accumulation: micro-batches weighted by token count give the gradient of one large batch."""

import pytest
import torch
import torch.nn.functional as F

from keel.errors import KeelError
from keel.grad import count_tokens, micro_batch_weights, split_micro_batches


def lm(seed=0, vocab=11, width=8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab)).double()


def batch_with_padding(rows=6, time=7, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, time), generator=g)
    y = torch.randint(0, vocab, (rows, time), generator=g)
    lengths = [7, 2, 5, 1, 6, 3]  # very different numbers of real tokens per row
    for r, n in enumerate(lengths[:rows]):
        y[r, n:] = -100
    return x, y


def loss_fn(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)  # mean over real tokens


@pytest.mark.parametrize("micro", [1, 2, 3, 4, 6])
def test_accumulated_gradient_matches_one_large_batch(micro):
    x, y = batch_with_padding()
    big = lm()
    loss_fn(big, x, y).backward()

    acc = lm()
    parts = split_micro_batches((x, y), micro)
    weights = micro_batch_weights([count_tokens(yi) for _, yi in parts])
    total = 0.0
    for (xi, yi), w in zip(parts, weights):
        loss = loss_fn(acc, xi, yi)
        (loss * w).backward()
        total += float(loss.detach()) * w
    assert abs(total - float(loss_fn(big, x, y).detach())) < 1e-12
    for a, b in zip(acc.parameters(), big.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_plain_mean_of_micro_losses_would_be_wrong():
    """The naive 1/k weighting differs when token counts differ, which is why weights exist."""
    x, y = batch_with_padding()
    parts = split_micro_batches((x, y), 2)
    counts = [count_tokens(yi) for _, yi in parts]
    assert counts[0] != counts[1]
    assert micro_batch_weights(counts) != [0.5, 0.5]
    assert sum(micro_batch_weights(counts)) == pytest.approx(1.0)


def test_split_shapes_and_containers():
    t = torch.arange(10)
    assert [len(p) for p in split_micro_batches(t, 3)] == [4, 3, 3]
    parts = split_micro_batches({"x": t, "y": t * 2}, 2)
    assert torch.equal(parts[1]["y"], torch.arange(5, 10) * 2)
    with pytest.raises(KeelError):
        split_micro_batches(t, 11)
    with pytest.raises(KeelError):
        split_micro_batches(t, 0)
    with pytest.raises(KeelError):
        micro_batch_weights([])


def test_weights_when_no_tokens():
    assert micro_batch_weights([0, 0]) == [0.0, 0.0]
