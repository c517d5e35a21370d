"""Documents without packing: sequences cut at the context, batches of similar lengths under a token budget,
padding masked out of the loss and the count; deterministic, resumable and rank-aware like every keel sampler."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.config import load_config
from keel.data import BucketSampler, IndexSampler, document_spans, padded_batch, sequential_buckets
from keel.errors import KeelError
from keel.grad import count_tokens
from keel.tasks import from_config
from keel.train import train


@given(st.lists(st.integers(0, 70), min_size=1, max_size=30), st.integers(1, 16), st.sampled_from(["split", "truncate"]))
@settings(max_examples=60, deadline=None)
def test_every_target_of_a_document_once_and_no_sequence_too_long(lengths, block, mode):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    spans = document_spans(offsets, block, mode)
    assert (spans[:, 1] >= 2).all() and (spans[:, 1] <= block + 1).all()
    targets = sorted(p for start, n in spans.tolist() for p in range(start + 1, start + n))
    if mode == "split":  # every position but each document's first is a target exactly once
        assert targets == [p for s, e in zip(offsets[:-1], offsets[1:]) for p in range(s + 1, e)]
    else:
        assert len(spans) == sum(n >= 2 for n in lengths) and len(targets) == len(set(targets))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=200), st.integers(40, 300), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_buckets_stay_in_budget_and_an_epoch_holds_every_sequence_once(lengths, budget, seed):
    sampler = BucketSampler(np.asarray(lengths), budget, seed)
    k = sampler.batches_per_epoch
    seen = []
    for index in range(k):
        ids = sampler.indices(index)
        assert len(ids) * max(lengths[i] for i in ids) <= budget
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(len(lengths)))


def test_batches_come_from_seed_and_index_alone_and_ranks_share_global_batches():
    lengths = np.random.default_rng(0).integers(1, 64, size=500)
    a, b = BucketSampler(lengths, 256, seed=3), BucketSampler(lengths, 256, seed=3)
    late = [b.indices(i).tolist() for i in (977, 12, 400)]  # a fresh sampler, asked out of order
    assert late == [a.indices(i).tolist() for i in (977, 12, 400)]
    assert a.indices(5).tolist() != BucketSampler(lengths, 256, seed=4).indices(5).tolist()
    # rank r of world w takes bucket position i * w + r: the ranks of global batch i together see exactly the
    # buckets of w consecutive micro-batches of one rank
    for world in (2, 3):
        for i in range(4):
            shares = [a.indices(i, rank, world).tolist() for rank in range(world)]
            assert shares == [a.indices(i * world + rank).tolist() for rank in range(world)]


def test_index_sampler_ranks_split_the_global_batch():
    sampler = IndexSampler(37, 4, seed=1)
    for i in range(20):
        together = np.concatenate([sampler.indices(i, r, 3) for r in range(3)])
        single = IndexSampler(37, 12, seed=1).indices(i)
        assert together.tolist() == single.tolist()


def test_pads_are_masked_and_not_counted():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = padded_batch(tokens, np.array([[0, 5], [10, 3]]))
    assert x.tolist() == [[0, 1, 2, 3], [10, 11, 0, 0]]
    assert y.tolist() == [[1, 2, 3, 4], [11, 12, -100, -100]]
    assert count_tokens(y) == 6


def test_evaluation_batches_are_fixed_and_cover_the_first_documents():
    tokens = np.arange(1000) % 250
    spans = document_spans(np.array([0, 100, 130, 400, 1000]), 64)
    batches = list(sequential_buckets(tokens, spans, 128, max_tokens=300))
    again = list(sequential_buckets(tokens, spans, 128, max_tokens=300))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert sum(count_tokens(y) for _, y in batches) >= 300
    assert all(x.numel() <= 128 for x, _ in batches)


def lm_config(tmp_path, tiny_overrides, *extra):
    return load_config(None, tiny_overrides + ["data.source=stdlib", "data.packing=false", "data.eval_tokens=2048",
                                               f"out_dir={tmp_path / 'run'}", *extra])


def test_lm_without_packing_trains_logs_pad_fraction_and_counts_only_real_tokens(tmp_path, tiny_overrides):
    config = lm_config(tmp_path, tiny_overrides, "max_steps=8", "eval_interval=8", "schedule.warmup=2",
                       "data.batch_tokens=512", "data.long_documents=truncate")
    task = from_config(config)
    batch = task.train_batch(3)
    assert batch[0].numel() <= 512 and batch[0].shape == batch[1].shape
    assert task.count(batch) == int((batch[1] != -100).sum())
    result = train(config, quiet=True)
    steps = [r for r in result["history"] if "grad_norm" in r]
    assert all(0.0 <= r["pad_fraction"] < 0.5 for r in steps)
    assert result["tokens"] == sum(task.count(task.train_batch(i)) for i in range(8))  # the clock counts targets


def test_batch_tokens_smaller_than_a_sequence_is_an_error(tmp_path, tiny_overrides, capsys):
    from keel.cli.main import main

    code = main(["train", *tiny_overrides, "data.packing=false", "data.batch_tokens=16", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "data.batch_tokens: 16 is smaller than one sequence (model.block_size 32 tokens); allowed: at least 32" in err
    assert not (tmp_path / "r").exists()


def test_token_files_cannot_be_unpacked(tmp_path):
    from keel.data import load_tokens

    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(KeelError, match="data.packing: false needs documents"):
        load_tokens(str(tmp_path / "t.bin"), 0.1, packing=False)
