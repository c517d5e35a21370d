"""Tokenizers: bytes (with and without an end-of-document id), a byte-level BPE trained once and cached, a
tokenizer.json loaded from a path; the run keeps the tokenizer and prints decoded samples."""

import json

import numpy as np
import pytest

from keel.config import load_config
from keel.data.corpora import builtin_documents
from keel.data import ByteTokenizer, load_tokenizer_file, load_tokens, pydoc_topics, train_bpe
from keel.errors import KeelError

tokenizers = pytest.importorskip("tokenizers")


def test_bytes_with_an_end_of_document_id():
    tok = ByteTokenizer(eod=True)
    assert tok.vocab_size == 257 and tok.eod_id == 256
    ids = tok.encode_batch(["héllo".encode()])[0]
    assert ids.dtype == np.uint16 and tok.decode(list(ids) + [256] + [104]) == "héllo<|endoftext|>h"


def test_bytes_without_packing_end_each_document(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"doc{i} " * 30)
    splits = load_tokens(str(tmp_path), 0.25, packing=False)
    assert splits.vocab_size == 257 and splits.eod_id == 256
    for tokens, offsets in ((splits.train, splits.train_offsets), (splits.val, splits.val_offsets)):
        ends = np.asarray(tokens)[np.asarray(offsets[1:]) - 1]
        assert (ends == 256).all() and (np.asarray(tokens) == 256).sum() == len(offsets) - 1


def test_bpe_is_trained_once_on_the_training_split_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_tokens("pydoc", 0.1, tokenizer={"bpe": 300}, cache_dir=cache)
    assert first.vocab_size == 300 and first.eod_id == 0 and not first.is_bytes
    decoded = first.tokenizer.decode([int(i) for i in first.train[:50]])
    assert len(decoded) > 60 and pydoc_topics().decode().startswith(decoded)
    saved = list(cache.glob("*/bpe300/tokenizer.json"))
    assert len(saved) == 1 and {p.name for p in saved[0].parent.iterdir()} >= {"train.npy", "val.npy"}

    import keel.data.tokenizer as module

    monkeypatch.setattr(module, "train_bpe", lambda *a, **k: pytest.fail("the cached tokenizer was not reused"))
    second = load_tokens("pydoc", 0.1, tokenizer={"bpe": 300}, cache_dir=cache)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.tokenizer.sha256 == first.tokenizer.sha256


def test_bpe_training_is_deterministic_and_round_trips():
    texts = [b"def f(x):\n    return x + 1\n" * 20, "naïve café ünïcode".encode() * 10]
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert a.json_text == b.json_text
    for text in texts:
        ids = a.encode_batch([text])[0]
        assert a.decode(ids) == text.decode() and len(ids) < len(text)


def test_tokenizer_file_loads_and_a_broken_one_is_one_error(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(train_bpe([b"hello world " * 50], 280).json_text)
    tok = load_tokenizer_file(path)
    assert tok.eod_id == 0 and tok.decode(tok.encode_text("hello world")) == "hello world"
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(KeelError, match="does not load as a tokenizers JSON file"):
        load_tokenizer_file(tmp_path / "bad.json")


def test_vocabulary_too_small_for_the_data(tmp_path):
    with pytest.raises(KeelError, match="data.tokenizer.bpe: 200 is too small a vocabulary"):
        load_config(None, ["data.tokenizer={bpe: 200}"])
    with pytest.raises(KeelError, match="data.vocab_size: 280 is too small for the tokenizer's 300 ids"):
        load_tokens("pydoc", 0.1, 280, tokenizer={"bpe": 300}, cache_dir=tmp_path)


def test_bpe_run_keeps_its_tokenizer_and_prints_decoded_samples(tmp_path, tiny_overrides, capsys):
    from keel.train import train

    overrides = tiny_overrides + ["max_steps=6", "eval_interval=6", "schedule.warmup=2", "data.tokenizer={bpe: 300}",
                                  "sample.tokens=12",
                                  f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'run'}"]
    train(load_config(None, overrides))
    out = capsys.readouterr().out
    kept = load_tokenizer_file(tmp_path / "run" / "tokenizer.json")
    cached = next((tmp_path / "cache").glob("*/bpe300/tokenizer.json"))
    assert json.loads(kept.json_text) == json.loads(cached.read_text())
    sample = next(line for line in out.splitlines() if "sample:" in line)
    assert sample.strip().startswith("sample: 'The ") and not any(c.isdigit() for c in sample.split("'")[1][:4])
    # the recorded tokenizer file drives a second run
    again = overrides[:-1] + [f"data.tokenizer={tmp_path / 'run' / 'tokenizer.json'}", f"out_dir={tmp_path / 'run2'}"]
    train(load_config(None, again), quiet=True)


def test_eod_on_packed_bytes_replaces_the_separator():
    splits = load_tokens("pydoc", 0.1, eod=True)
    assert splits.vocab_size == 257 and splits.eod_id == 256 and splits.train_offsets is None
    train = np.asarray(splits.train)
    first_topic = builtin_documents("pydoc")[0]
    assert bytes(train[: len(first_topic)].astype(np.uint8)) == first_topic and train[len(first_topic)] == 256
