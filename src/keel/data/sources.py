"""Token sources: built-in corpora, the user's text (files, folders, JSONL, Hugging Face datasets) and
nanoGPT-style uint16 token files.

Text is a sequence of documents (``keel.data.documents``) encoded by a tokenizer (``keel.data.tokenizer``):
bytes by default (vocabulary 256, no training), or a byte-level BPE or a ``tokenizer.json``. With packing (the
default) the documents of each split form one token stream that training windows are cut from; without it each
split keeps its documents apart (``offsets``), for one document per sequence. An end-of-document token ends each
document where the vocabulary has one: always with a BPE (``<|endoftext|>``), for bytes only when asked for
(``data.eod``) or without packing (vocabulary 257, id 256). Packed bytes without it are exactly keel's byte
stream before documents existed: the documents joined by the source's separator (a newline; a blank line
between pydoc topics).

A token file is a flat array of little-endian ``uint16`` token ids (the nanoGPT ``.bin`` layout),
memory-mapped so it never has to fit in RAM. Tokenizers other than bytes and the data they tokenize are cached
under ``data.cache_dir`` (default ``~/.cache/keel``), keyed by the source's content and the settings.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keel.data.corpora import BUILTIN_CORPORA, load_builtin
from keel.data.documents import (hf_files, is_hf_source, load_documents,
                                 parse_hf_source, split_documents, text_files)
from keel.data.tokenizer import ByteTokenizer, build_tokenizer, default_cache_dir, tokenizer_label
from keel.errors import KeelError

CACHE_FORMAT = 1  # bump when the cached layout or the tokenization changes


@dataclass
class TokenSplits:
    """Train and validation token arrays (1-D, integer) and the vocabulary size.

    ``train_offsets`` / ``val_offsets`` (``None`` when packed): document ``i`` of a split is
    ``tokens[offsets[i]:offsets[i + 1]]``, its end-of-document token included. ``tokenizer`` decodes ids
    (``None`` for a token file without one); ``eod_id`` is the end-of-document id, if any.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    is_bytes: bool
    description: str
    tokenizer: Any = None
    eod_id: int | None = None
    train_offsets: np.ndarray | None = None
    val_offsets: np.ndarray | None = None


def _val_size(n_tokens: int, val_fraction: float) -> int:
    return int(round(n_tokens * val_fraction))


def _split(tokens: np.ndarray, val_fraction: float, key: str) -> tuple[np.ndarray, np.ndarray]:
    n_val = _val_size(len(tokens), val_fraction)
    if n_val < 2 or len(tokens) - n_val < 2:
        raise KeelError(
            f"{key}: {len(tokens)} tokens are too few to split with val_fraction={val_fraction}; "
            "allowed: a source with enough tokens for both splits"
        )
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _memmap_tokens(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise KeelError(
            f"data.source: token file '{path}' has {size} bytes; allowed: a non-empty flat array of uint16 "
            "token ids (an even number of bytes)"
        )
    return np.memmap(path, dtype=np.uint16, mode="r")


def is_token_file_source(source: str) -> bool:
    if source in BUILTIN_CORPORA or is_hf_source(source):
        return False
    path = Path(source).expanduser()
    return (path.is_dir() and (path / "train.bin").is_file()) or (path.is_file() and path.suffix == ".bin")


def load_tokens(source: str, val_fraction: float = 0.1, vocab_size: int | None = None, *,
                tokenizer: Any = "bytes", text_field: str = "text", packing: bool = True, eod: bool | None = None,
                cache_dir: str | Path | None = None) -> TokenSplits:
    """Load ``source`` and split it into train and validation tokens.

    ``source`` is a built-in corpus name (``pydoc``, ``stdlib``), a text file, a folder of text files (read in
    sorted order), a ``.jsonl`` file, ``hf:FORMAT:PATH``, a ``.bin`` token file (split at ``1 - val_fraction``),
    or a folder holding ``train.bin`` and ``val.bin`` (nanoGPT's layout, used as given). Text splits are
    contiguous: the last ``val_fraction`` of the bytes is the validation split, so the split is deterministic.
    ``tokenizer``, ``packing`` and ``eod`` are ``data.tokenizer``, ``data.packing`` and ``data.eod``.
    """
    if is_token_file_source(source):
        return _load_token_files(source, val_fraction, vocab_size, tokenizer, packing)
    docs = load_documents(source, text_field, cache_dir)
    use_eod = (tokenizer != "bytes" or not packing) if eod is None else eod
    if tokenizer == "bytes" and packing and not use_eod:  # keel's byte stream, exactly as before documents
        data = np.frombuffer(docs.joined(), dtype=np.uint8)
        train, val = _split(data, val_fraction, "data.source")
        kind = "built-in corpus" if source in BUILTIN_CORPORA else "text"
        return TokenSplits(train, val, 256, True, f"{kind} '{source}' ({len(data):,} bytes)", ByteTokenizer())
    train_docs, val_docs = split_documents(docs, val_fraction)
    cache = None
    if tokenizer != "bytes":
        key = hashlib.sha256(f"{CACHE_FORMAT}|{docs.fingerprint()}|{val_fraction!r}".encode()).hexdigest()[:16]
        cache = Path(cache_dir or default_cache_dir()).expanduser() / f"{_slug(source)}-{key}" / tokenizer_label(
            tokenizer)
    encoder = build_tokenizer(tokenizer, train_docs, cache, eod=use_eod)
    if use_eod and encoder.eod_id is None:
        raise KeelError(f"data.eod: true, but {encoder.description} has no end-of-document token (one of "
                        "<|endoftext|>, </s>, <eos>); allowed: false, or a tokenizer with one")
    vocab = _check_vocab(encoder.vocab_size, vocab_size)
    (train, train_offsets), (val, val_offsets) = (_tokenize(encoder, part, name, cache)
                                                  for part, name in ((train_docs, "train"), (val_docs, "val")))
    eod_id = encoder.eod_id if use_eod else None
    separator = encoder.encode_batch([docs.separator])[0]
    train, train_offsets = _assemble(train, train_offsets, eod_id, separator, packing)
    val, val_offsets = _assemble(val, val_offsets, eod_id, separator, packing)
    if len(train) < 2 or len(val) < 2:
        raise KeelError(f"data.source: '{source}' gives {len(train)} training and {len(val)} validation tokens; "
                        "allowed: a source with enough text for both splits")
    layout = "packed" if packing else "one document per sequence"
    description = (f"{docs.description}; {encoder.description}; {layout}"
                   + (f", end-of-document id {eod_id}" if eod_id is not None else ""))
    return TokenSplits(train, val, vocab, encoder.kind == "bytes", description, encoder, eod_id,
                       None if packing else train_offsets, None if packing else val_offsets)


def _slug(source: str) -> str:
    name = Path(source.split(":")[-1]).name if source not in BUILTIN_CORPORA else source
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "source"


def _check_vocab(tokenizer_vocab: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise KeelError(f"data.vocab_size: {vocab_size} is too small for the tokenizer's {tokenizer_vocab} ids; "
                        f"allowed: at least {tokenizer_vocab} (or null)")
    return vocab_size


def _tokenize(encoder, texts: list[bytes], name: str, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, concatenated, and the document offsets; cached beside the tokenizer."""
    if cache is not None and (cache / f"{name}.npy").is_file() and (cache / f"{name}_offsets.npy").is_file():
        return np.load(cache / f"{name}.npy", mmap_mode="r"), np.load(cache / f"{name}_offsets.npy")
    pieces = encoder.encode_batch(texts)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    if cache is not None:
        _save_arrays(cache, {name: tokens, f"{name}_offsets": offsets})
    return tokens, offsets


def _save_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".npy")
        with open(fd, "wb") as handle:
            np.save(handle, np.asarray(array))
        Path(tmp).replace(folder / f"{name}.npy")


def _assemble(tokens: np.ndarray, offsets: np.ndarray, eod_id: int | None, separator: np.ndarray,
              packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Documents with their end-of-document token appended (or, packed without one, the source's separator
    between them); the new offsets."""
    pieces, lengths = [], []
    dtype = np.uint16 if eod_id is not None and tokens.dtype == np.uint8 else tokens.dtype
    suffix = np.asarray([eod_id] if eod_id is not None else [], dtype=dtype)
    n = len(offsets) - 1
    for i in range(n):
        piece = [np.asarray(tokens[offsets[i] : offsets[i + 1]], dtype=dtype), suffix]
        if eod_id is None and packing and i < n - 1:
            piece.append(separator.astype(dtype))
        pieces.extend(piece)
        lengths.append(sum(len(p) for p in piece))
    new_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)), new_offsets


def _load_token_files(source: str, val_fraction: float, vocab_size: int | None, tokenizer: Any,
                      packing: bool) -> TokenSplits:
    if not packing:
        raise KeelError(f"data.packing: false needs documents, but '{source}' is a token file without document "
                        "boundaries; allowed: true with token files, or a text source")
    if isinstance(tokenizer, dict):
        raise KeelError(f"data.tokenizer: {{bpe: ...}} trains on text, but '{source}' is a token file; allowed: "
                        "bytes or the tokenizer.json that made the file (to decode samples)")
    decoder = build_tokenizer(tokenizer, None, None) if tokenizer != "bytes" else None
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "val.bin").is_file():
            raise KeelError(f"data.source: folder '{source}' has train.bin but no val.bin; allowed: both, or neither")
        train, val = _memmap_tokens(path / "train.bin"), _memmap_tokens(path / "val.bin")
        splits = _token_splits(train, val, vocab_size, f"token files in '{source}'")
    else:
        tokens = _memmap_tokens(path)
        train, val = _split(tokens, val_fraction, "data.source")
        splits = _token_splits(train, val, vocab_size, f"token file '{source}' ({len(tokens):,} tokens)")
    if decoder is not None:
        splits.tokenizer = decoder
        splits.vocab_size = max(splits.vocab_size, decoder.vocab_size) if vocab_size is None else splits.vocab_size
        splits.description += f"; {decoder.description}"
    return splits


def _chunks(tokens: np.ndarray, size: int = 1 << 24):
    for start in range(0, len(tokens), size):
        yield np.asarray(tokens[start : start + size])


def _token_splits(train: np.ndarray, val: np.ndarray, vocab_size: int | None, description: str) -> TokenSplits:
    largest = max(int(chunk.max()) for split in (train, val) for chunk in _chunks(split))
    if vocab_size is None:
        vocab_size = largest + 1
    elif largest >= vocab_size:
        raise KeelError(
            f"data.vocab_size: {vocab_size} is too small for the token file, whose largest id is {largest}; "
            f"allowed: at least {largest + 1}"
        )
    return TokenSplits(train, val, vocab_size, False, description)


def train_token_count(source: str, val_fraction: float = 0.1) -> int:
    """Tokens in the train split of ``source`` as ``load_tokens`` makes it with bytes, from file sizes where it
    can (a token file or text is not read; JSONL and ``hf:`` sources count their files' bytes), so a config can
    resolve epochs before any data is loaded."""
    if source in BUILTIN_CORPORA:
        n = len(load_builtin(source))
    elif is_hf_source(source):
        n = sum(Path(p).stat().st_size for p in hf_files(parse_hf_source(source)[1]))
    else:
        path = Path(source).expanduser()
        if path.is_dir() and (path / "train.bin").is_file():
            return (path / "train.bin").stat().st_size // 2
        if path.is_file():
            n = path.stat().st_size // (2 if path.suffix == ".bin" else 1)
        else:
            files = text_files(path)
            n = sum(p.stat().st_size for p in files) + max(len(files) - 1, 0)  # joined by newlines
    return n - _val_size(n, val_fraction)


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy in nats of the validation split under the train split's unigram distribution (add-one).

    The baseline a language model must beat: what predicting each token from its frequency alone achieves.
    """
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one smoothing
    for chunk in _chunks(train):  # a memory-mapped token file is counted a slice at a time
        counts += np.bincount(chunk, minlength=vocab_size)
    log_p = np.log(counts / counts.sum())
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in _chunks(val):
        val_counts += np.bincount(chunk, minlength=vocab_size)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
