"""Text sources as documents: built-in corpora, folders, JSONL and Hugging Face datasets; the byte stream of a
packed byte source is exactly keel's stream before documents existed."""

import json

import numpy as np
import pytest

from keel.data import load_documents, load_tokens, pydoc_topics, split_documents, stdlib_source
from keel.data.corpora import builtin_documents
from keel.errors import KeelError


def test_builtin_corpora_split_into_topics_and_files_and_join_back_exactly():
    topics = builtin_documents("pydoc")
    assert len(topics) > 50 and b"".join(topics)[:1] != b""
    assert b"\n\n".join(topics) == pydoc_topics()
    files = builtin_documents("stdlib")
    assert len(files) > 300
    assert b"\n".join(files) == stdlib_source()
    assert load_documents("stdlib").joined() == stdlib_source()


def test_packed_bytes_stream_is_unchanged_for_every_text_source(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "b.md").write_text("second document " * 20)
    for source in ("pydoc", str(tmp_path), str(tmp_path / "a.txt")):
        splits = load_tokens(source, 0.1)
        joined = load_documents(source).joined()
        assert splits.vocab_size == 256 and splits.train_offsets is None and splits.eod_id is None
        assert np.array_equal(np.concatenate([splits.train, splits.val]), np.frombuffer(joined, np.uint8))


def test_folder_is_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("bbb")
    (tmp_path / "a.txt").write_text("aa")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = load_documents(str(tmp_path))
    assert docs.texts == [b"aa", b"bbb"] and docs.separator == b"\n"


def test_jsonl_documents_with_a_configurable_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * (i + 1), "id": i}) for i in range(5)) + "\n\n")
    docs = load_documents(str(path), text_field="body")
    assert docs.texts == [(f"document {i} " * (i + 1)).encode() for i in range(5)]


@pytest.mark.parametrize("line, expected", [
    ('{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "data.text_field: '{path}' line 2 has no field 'text' (its keys: body)"),
    ('{"text": 3}\n', "line 1: 'text' is a int; allowed: a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(KeelError) as error:
        load_documents(str(path))
    assert expected.format(path=path) in str(error.value) and str(path) in str(error.value)


def test_empty_document_set_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(KeelError, match="empty document set"):
        load_documents(str(tmp_path / "empty.jsonl"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(KeelError, match="empty document set"):
        load_documents(str(tmp_path / "e.txt"))


def test_split_is_contiguous_in_bytes_and_cuts_one_document():
    docs = load_documents("pydoc")
    train, val = split_documents(docs, 0.1)
    total = len(docs.joined())
    assert sum(map(len, train)) + sum(map(len, val)) == sum(map(len, docs.texts))
    assert len(train) + len(val) in (len(docs.texts), len(docs.texts) + 1)
    assert abs(sum(map(len, val)) + len(docs.separator) * (len(val) - 1) - round(total * 0.1)) <= 2
    assert train[:-1] == docs.texts[: len(train) - 1]
    assert val[1:] == docs.texts[len(docs.texts) - len(val) + 1:]


def test_split_never_cuts_a_utf8_character():
    from keel.data.documents import Documents

    docs = Documents(["é" * 50 + "x", "ü" * 50], b"\n", "test")
    docs.texts = [t.encode() for t in docs.texts]
    for fraction in np.linspace(0.05, 0.95, 19):
        train, val = split_documents(docs, float(fraction))
        for text in train + val:
            text.decode("utf-8")  # raises if a character was cut


# ---- Hugging Face datasets (optional): local files the test writes, nothing downloaded ---------------------------


def test_hf_json_text_and_parquet_sources(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rows = [{"content": f"row {i} " * (3 + i)} for i in range(6)]
    for part in (0, 1):
        with open(tmp_path / "data" / f"part{part}.jsonl", "w") as handle:
            for row in rows[part * 3:(part + 1) * 3]:
                handle.write(json.dumps(row) + "\n")
    docs = load_documents("hf:json:data/*.jsonl", text_field="content", cache_dir=tmp_path / "cache")
    assert docs.texts == [r["content"].encode() for r in rows]
    (tmp_path / "plain.txt").write_text("line one\nline two\n")
    assert load_documents("hf:text:plain.txt", cache_dir=tmp_path / "cache").texts == [b"line one", b"line two"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data" / "rows.parquet"))
    docs = load_documents("hf:parquet:data/rows.parquet", text_field="content", cache_dir=tmp_path / "cache")
    assert len(docs.texts) == 6
    with pytest.raises(KeelError, match="data.text_field: 'text' is not a column.*allowed: content"):
        load_documents("hf:parquet:data/rows.parquet", cache_dir=tmp_path / "cache")


def test_hf_source_errors_without_matching_files_or_a_known_format():
    with pytest.raises(KeelError, match="no file matches"):
        load_documents("hf:json:/no/such/dir/*.jsonl")
    with pytest.raises(KeelError, match="is not hf:FORMAT:PATH"):
        load_documents("hf:xml:/tmp")
