"""Token sources: built-in corpora, the user's text files and folders, and nanoGPT-style uint16 token files.

Text is modelled at the byte level (vocabulary 256), so no tokenizer is needed. A token file is a flat array
of little-endian ``uint16`` token ids (the nanoGPT ``.bin`` layout), memory-mapped so it never has to fit in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.data.corpora import BUILTIN_CORPORA, load_builtin
from keel.errors import KeelError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml")


@dataclass
class TokenSplits:
    """Train and validation token arrays (1-D, integer) and the vocabulary size."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    is_bytes: bool
    description: str


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


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def _read_text_folder(folder: Path) -> bytes:
    files = _text_files(folder)
    if not files:
        raise KeelError(
            f"data.source: folder '{folder}' holds no text files; allowed suffixes: {', '.join(TEXT_SUFFIXES)}"
        )
    return b"\n".join(p.read_bytes() for p in files)


def _memmap_tokens(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise KeelError(
            f"data.source: token file '{path}' has {size} bytes; allowed: a non-empty flat array of uint16 "
            "token ids (an even number of bytes)"
        )
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_tokens(source: str, val_fraction: float = 0.1, vocab_size: int | None = None) -> TokenSplits:
    """Load ``source`` and split it into train and validation tokens.

    ``source`` is a built-in corpus name (``pydoc``, ``stdlib``), a text file, a folder of text files (read in
    sorted order), a ``.bin`` token file (split at ``1 - val_fraction``), or a folder holding ``train.bin`` and
    ``val.bin`` (nanoGPT's layout, used as given). Text splits are contiguous: the last ``val_fraction`` of the
    bytes is the validation split, so the split is deterministic.
    """
    if source in BUILTIN_CORPORA:
        data = np.frombuffer(load_builtin(source), dtype=np.uint8)
        train, val = _split(data, val_fraction, "data.source")
        return TokenSplits(train, val, 256, True, f"built-in corpus '{source}' ({len(data):,} bytes)")
    path = Path(source).expanduser()
    if not path.exists():
        raise KeelError(
            f"data.source: '{source}' does not exist; allowed: {', '.join(BUILTIN_CORPORA)}, a text file, "
            "a folder of text files, a .bin uint16 token file, or a folder with train.bin and val.bin"
        )
    if path.is_dir() and (path / "train.bin").is_file():
        if not (path / "val.bin").is_file():
            raise KeelError(f"data.source: folder '{source}' has train.bin but no val.bin; allowed: both, or neither")
        train, val = _memmap_tokens(path / "train.bin"), _memmap_tokens(path / "val.bin")
        return _token_splits(train, val, vocab_size, f"token files in '{source}'")
    if path.is_file() and path.suffix == ".bin":
        tokens = _memmap_tokens(path)
        train, val = _split(tokens, val_fraction, "data.source")
        return _token_splits(train, val, vocab_size, f"token file '{source}' ({len(tokens):,} tokens)")
    data = _read_text_folder(path) if path.is_dir() else path.read_bytes()
    tokens = np.frombuffer(data, dtype=np.uint8)
    train, val = _split(tokens, val_fraction, "data.source")
    return TokenSplits(train, val, 256, True, f"text '{source}' ({len(tokens):,} bytes)")


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
    """Tokens in the train split of ``source`` as ``load_tokens`` makes it, from file sizes where it can
    (a token file or text is not read), so a config can resolve epochs before any data is loaded."""
    if source in BUILTIN_CORPORA:
        n = len(load_builtin(source))
    else:
        path = Path(source).expanduser()
        if path.is_dir() and (path / "train.bin").is_file():
            return (path / "train.bin").stat().st_size // 2
        if path.is_file():
            n = path.stat().st_size // (2 if path.suffix == ".bin" else 1)
        else:
            files = _text_files(path)
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
