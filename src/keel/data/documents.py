"""Text sources as sequences of documents, and their contiguous train/validation split.

A source is read as a list of documents (UTF-8 bytes each) plus the separator that joined them in keel's byte
stream before documents existed, so the packed byte stream of a source stays what it always was:

- ``pydoc``: one document per reference topic (sorted by key), joined by a blank line;
- ``stdlib``: one document per standard-library file (sorted by path), joined by a newline;
- a folder: one document per text file (sorted by path), joined by a newline; a text file: one document;
- a ``.jsonl`` file: one document per line, the string under ``data.text_field``;
- ``hf:FORMAT:PATH``: local files read by Hugging Face ``datasets.load_dataset(FORMAT, data_files=PATH)``
  (``json``, ``csv``, ``parquet``, ``text``, ``arrow``; PATH may be a glob), one document per row's
  ``data.text_field``. Needs the ``datasets`` package; nothing is downloaded.

``split_documents`` cuts the joined stream at ``1 - val_fraction`` of its bytes, as the byte stream always was
cut; the document the cut falls in is split into a training head and a validation tail.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from keel.data.corpora import BUILTIN_CORPORA, SEPARATORS, builtin_documents
from keel.errors import KeelError

HF_PREFIX = "hf:"
HF_FORMATS = ("json", "csv", "parquet", "text", "arrow")
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml")


@dataclass
class Documents:
    """Documents of a source (UTF-8 bytes each), the separator of its byte stream, and a description."""

    texts: list[bytes]
    separator: bytes
    description: str

    def joined(self) -> bytes:
        """The source's byte stream: the documents joined by the separator (keel's stream before documents)."""
        return self.separator.join(self.texts)

    def fingerprint(self) -> str:
        """SHA-256 of the documents and their boundaries: a cache key that changes when any text changes."""
        digest = hashlib.sha256()
        digest.update(self.separator)
        for text in self.texts:
            digest.update(len(text).to_bytes(8, "little"))
            digest.update(text)
        return digest.hexdigest()


def is_hf_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def parse_hf_source(source: str) -> tuple[str, str]:
    """``hf:FORMAT:PATH`` -> ``(FORMAT, PATH)``, checked: a known format and a path or glob that matches files."""
    body = source[len(HF_PREFIX):]
    fmt, sep, path = body.partition(":")
    if not sep or not path or fmt not in HF_FORMATS:
        raise KeelError(f"data.source: {source!r} is not hf:FORMAT:PATH; allowed formats: {', '.join(HF_FORMATS)}, "
                        "e.g. hf:json:data/*.jsonl or hf:parquet:data/train.parquet")
    if not hf_files(path):
        raise KeelError(f"data.source: {source!r}: no file matches '{path}'; allowed: a local file or glob "
                        "(nothing is downloaded)")
    return fmt, path


def hf_files(path: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p))


def text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def load_documents(source: str, text_field: str = "text", cache_dir: str | Path | None = None) -> Documents:
    """The documents of ``source`` (a built-in corpus, a text file, a folder, a ``.jsonl`` file or ``hf:...``)."""
    if source in BUILTIN_CORPORA:
        texts = builtin_documents(source)
        docs = Documents(texts, SEPARATORS[source], f"built-in corpus '{source}'")
    elif is_hf_source(source):
        docs = Documents(_read_hf(source, text_field, cache_dir), b"\n", f"Hugging Face dataset '{source}'")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise KeelError(f"data.source: '{source}' does not exist; allowed: {', '.join(BUILTIN_CORPORA)}, a text "
                            "file, a folder of text files, a .jsonl file, hf:FORMAT:PATH, a .bin uint16 token file, "
                            "or a folder with train.bin and val.bin")
        if path.is_dir():
            files = text_files(path)
            if not files:
                raise KeelError(f"data.source: folder '{source}' holds no text files; allowed suffixes: "
                                f"{', '.join(TEXT_SUFFIXES)}")
            docs = Documents([p.read_bytes() for p in files], b"\n", f"folder '{source}'")
        elif path.suffix.lower() in JSONL_SUFFIXES:
            docs = Documents(read_jsonl(path, text_field), b"\n", f"JSONL '{source}' (field '{text_field}')")
        else:
            docs = Documents([path.read_bytes()], b"\n", f"text '{source}'")
    if not any(docs.texts):
        raise KeelError(f"data.source: '{source}' holds no text (an empty document set); allowed: a source with at "
                        "least one non-empty document")
    docs.description += f" ({len(docs.texts):,} documents, {sum(map(len, docs.texts)):,} bytes)"
    return docs


def read_jsonl(path: Path, text_field: str) -> list[bytes]:
    """The ``text_field`` string of every line of a JSON Lines file (blank lines skipped), as UTF-8."""
    texts = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise KeelError(f"data.source: '{path}' line {number} is not JSON ({error}); allowed: one JSON "
                                f"object per line with a string field '{text_field}'") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = f" (its keys: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
                raise KeelError(f"data.text_field: '{path}' line {number} has no field '{text_field}'{keys}; "
                                f"allowed: a field every line holds")
            value = record[text_field]
            if not isinstance(value, str):
                raise KeelError(f"data.text_field: '{path}' line {number}: '{text_field}' is a "
                                f"{type(value).__name__}; allowed: a string")
            texts.append(value.encode("utf-8"))
    return texts


def _read_hf(source: str, text_field: str, cache_dir: str | Path | None) -> list[bytes]:
    fmt, path = parse_hf_source(source)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise KeelError("data.source: hf:... needs the datasets package; install the extra: pip install "
                        "'keel[datasets]' (allowed without it: a .jsonl file, a folder or a text file)") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    from keel.data.tokenizer import default_cache_dir

    hf_cache = str(Path(cache_dir or default_cache_dir()).expanduser() / "hf_datasets")
    try:
        dataset = datasets.load_dataset(fmt, data_files=hf_files(path), split="train", cache_dir=hf_cache)
    except Exception as error:  # datasets raises many types for unreadable files
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KeelError(f"data.source: {source!r} does not load as {fmt} ({type(error).__name__}: {first}); "
                        f"allowed: local {fmt} files") from None
    if text_field not in dataset.column_names:
        raise KeelError(f"data.text_field: '{text_field}' is not a column of {source!r}; allowed: "
                        f"{', '.join(dataset.column_names)}")
    texts = []
    for row, value in enumerate(dataset[text_field]):
        if not isinstance(value, str):
            raise KeelError(f"data.text_field: row {row} of {source!r}: '{text_field}' is a "
                            f"{type(value).__name__}; allowed: a string")
        texts.append(value.encode("utf-8"))
    return texts


def split_documents(docs: Documents, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """Train and validation documents: the joined stream cut at ``1 - val_fraction`` of its bytes, as the
    byte stream always was; the document the cut falls in gives its head to training and its tail to
    validation (a cut inside a separator splits nothing)."""
    total = len(docs.joined())
    cut = total - int(round(total * val_fraction))
    train: list[bytes] = []
    val: list[bytes] = []
    start = 0
    for text in docs.texts:
        end = start + len(text)
        if end <= cut:
            train.append(text)
        elif start >= cut:
            val.append(text)
        else:
            at = cut - start
            while at > 0 and text[at] & 0xC0 == 0x80:  # not inside a UTF-8 character
                at -= 1
            train.append(text[:at])
            val.append(text[at:])
        start = end + len(docs.separator)
    train, val = [t for t in train if t], [t for t in val if t]
    if not train or not val:
        raise KeelError(f"data.val_fraction: {val_fraction} leaves {'no training' if not train else 'no validation'} "
                        f"text in {docs.description}; allowed: a fraction that leaves text on both sides")
    return train, val
