import numpy as np
import pytest
import torch

from keel.data import RandomWindowSampler, load_tokens, pydoc_topics, sequential_windows, unigram_cross_entropy
from keel.errors import KeelError


def test_pydoc_corpus_is_deterministic_english_prose():
    first, second = pydoc_topics(), pydoc_topics()
    assert first == second
    assert len(first) > 300_000
    assert b"the" in first


def test_builtin_split_is_contiguous_and_deterministic():
    splits = load_tokens("pydoc", val_fraction=0.1)
    data = np.frombuffer(pydoc_topics(), dtype=np.uint8)
    assert splits.vocab_size == 256 and splits.is_bytes
    assert len(splits.train) + len(splits.val) == len(data)
    assert np.array_equal(np.concatenate([splits.train, splits.val]), data)
    assert abs(len(splits.val) / len(data) - 0.1) < 1e-3


def test_stdlib_corpus_loads():
    splits = load_tokens("stdlib", val_fraction=0.01)
    assert len(splits.train) > 1_000_000
    assert b"def " in bytes(splits.train[:100_000])


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second file " * 100)
    (tmp_path / "skip.bin.bak").write_bytes(b"\x00" * 10)
    single = load_tokens(str(tmp_path / "a.txt"), val_fraction=0.2)
    assert bytes(single.train[:11]) == b"hello world"
    folder = load_tokens(str(tmp_path), val_fraction=0.2)
    assert len(folder.train) + len(folder.val) == 1200 + 1200 + 1  # two files joined by a newline


def test_token_file_memory_mapped(tmp_path):
    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "data.bin")
    splits = load_tokens(str(tmp_path / "data.bin"), val_fraction=0.1)
    assert isinstance(splits.train, np.memmap)
    assert splits.vocab_size == 1000 and not splits.is_bytes
    assert np.array_equal(np.concatenate([splits.train, splits.val]), tokens)


def test_nanogpt_folder_layout(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    splits = load_tokens(str(tmp_path), vocab_size=4000)
    assert len(splits.train) == 3000 and len(splits.val) == 500 and splits.vocab_size == 4000


def test_token_file_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(KeelError, match="even number of bytes"):
        load_tokens(str(tmp_path / "odd.bin"))
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "ok.bin")
    with pytest.raises(KeelError, match="data.vocab_size: 50 is too small"):
        load_tokens(str(tmp_path / "ok.bin"), vocab_size=50)
    with pytest.raises(KeelError, match="does not exist"):
        load_tokens(str(tmp_path / "missing.txt"))


def test_sampler_batch_depends_only_on_seed_and_index():
    tokens = np.arange(10_000, dtype=np.int64) % 256
    a = RandomWindowSampler(tokens, block_size=16, batch_size=4, seed=3)
    b = RandomWindowSampler(tokens, block_size=16, batch_size=4, seed=3)
    x7, y7 = a.batch(7)
    b.batch(0)
    assert torch.equal(b.batch(7)[0], x7)
    assert torch.equal(x7[:, 1:], y7[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(a.batch(8)[0], x7)


def test_sequential_windows_cover_without_overlap():
    tokens = np.arange(1001)
    windows = list(sequential_windows(tokens, block_size=10, batch_size=7))
    inputs = torch.cat([x for x, _ in windows])
    assert inputs.shape == (100, 10)
    assert torch.equal(inputs.flatten(), torch.arange(1000))
    capped = list(sequential_windows(tokens, block_size=10, batch_size=7, max_tokens=50))
    assert sum(len(x) for x, _ in capped) == 5


def test_unigram_cross_entropy_matches_closed_form():
    train = np.array([0, 0, 1, 1])
    val = np.array([0, 1])
    # add-one: p(0) = p(1) = 3/6 over a vocabulary of 2 -> ln 2
    assert unigram_cross_entropy(train, val, 2) == pytest.approx(np.log(2))


@pytest.mark.parametrize("kind", ["pydoc", "file", "folder", "bin", "bin_folder"])
def test_train_token_count_matches_the_loaded_split(tmp_path, kind):
    from keel.data import train_token_count

    (tmp_path / "a.txt").write_text("hello world " * 97)
    (tmp_path / "b.md").write_text("more text " * 31)
    np.arange(999, dtype=np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "nano").mkdir()
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "nano" / "train.bin")
    np.arange(30, dtype=np.uint16).tofile(tmp_path / "nano" / "val.bin")
    source = {"pydoc": "pydoc", "file": str(tmp_path / "a.txt"), "folder": str(tmp_path),
              "bin": str(tmp_path / "t.bin"), "bin_folder": str(tmp_path / "nano")}[kind]
    if kind == "folder":
        (tmp_path / "t.bin").unlink()
    assert train_token_count(source, 0.13) == len(load_tokens(source, 0.13).train)


def test_epoch_units_resolve_in_a_run_config(tmp_path):
    """An epoch of the language model is a pass over its training tokens: '1ep' is the first step at which the
    clock has counted as many tokens as the split holds (32 windows of 128 tokens a step)."""
    from keel import tasks
    from keel.config import load_config
    from keel.train import train
    from keel.train.loop import run_timeline

    config = load_config(None, ["recipe=baseline", "schedule.warmup=1ep", "max_steps=400"])
    timeline = run_timeline(config, tasks.from_config(config))
    train_tokens = len(load_tokens("pydoc").train)
    assert timeline.steps("1ep", "schedule.warmup") == -(-train_tokens // (32 * 128))
    config = load_config(None, ["recipe=baseline", "schedule.warmup=200ep", "max_steps=400",
                                f"out_dir={tmp_path / 'r'}"])
    with pytest.raises(KeelError, match="schedule.warmup: '200ep' .* is at or beyond the run length"):
        train(config, quiet=True)  # resolved when the trainer is built, before the run directory is made
    assert not (tmp_path / "r").exists()
