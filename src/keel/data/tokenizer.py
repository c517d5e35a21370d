"""Tokenizers: bytes (the default, no training, nothing to install) and Hugging Face ``tokenizers`` JSON files.

``data.tokenizer`` is ``bytes`` (ids 0-255 are the bytes; with an end-of-document token the vocabulary is 257 and
id 256 ends a document), ``{bpe: VOCAB}`` (a byte-level BPE of ``VOCAB`` ids trained on the training split with
Hugging Face ``tokenizers``, GPT-2's scheme: ids for the 256 bytes, ``<|endoftext|>``, then merges), or the path
of a ``tokenizer.json`` written by ``tokenizers`` (``Tokenizer.save``) or by transformers' ``save_pretrained``.
``tokenizers`` is imported only for the latter two (the optional extra ``keel[hf]``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keel.errors import KeelError

EOD_TEXT = "<|endoftext|>"
#: Special tokens recognised as the end-of-document token of a loaded tokenizer, in this order.
EOD_CANDIDATES = (EOD_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BPE_MIN_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def default_cache_dir() -> Path:
    """Where keel caches tokenizers and tokenized data: ``$KEEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/keel``, else
    ``~/.cache/keel``."""
    if os.environ.get("KEEL_CACHE_DIR"):
        return Path(os.environ["KEEL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "keel"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise KeelError("data.tokenizer: a BPE or tokenizer.json needs the tokenizers package; install the extra: "
                        "pip install 'keel[hf]' (allowed without it: data.tokenizer: bytes)") from None
    return tokenizers


class ByteTokenizer:
    """Bytes as tokens: ids 0-255; with ``eod`` id 256 ends a document (vocabulary 257)."""

    kind = "bytes"

    def __init__(self, eod: bool = False):
        self.eod_id = 256 if eod else None
        self.vocab_size = 257 if eod else 256
        self.description = "bytes" + (" (vocabulary 257)" if eod else "")

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        dtype = np.uint16 if self.eod_id is not None else np.uint8
        return [np.frombuffer(text, dtype=np.uint8).astype(dtype) for text in texts]

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace") + EOD_TEXT)
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer``: encodes documents (UTF-8, invalid bytes replaced) without added
    special tokens, decodes ids to text; ``eod_id`` is its end-of-document token, if it has one."""

    kind = "hf"

    def __init__(self, tokenizer: Any, json_text: str, description: str, path: Path | None = None):
        self.tokenizer = tokenizer
        self.json_text = json_text
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eod_id = next((tokenizer.token_to_id(t) for t in EOD_CANDIDATES if tokenizer.token_to_id(t) is not None),
                           None)
        self.description = description
        self.path = path

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        strings = [t.decode("utf-8", errors="replace") for t in texts]
        try:
            encodings = self.tokenizer.encode_batch(strings, add_special_tokens=False)
        except Exception as error:  # tokenizers raises its own exception types for text it cannot encode
            raise KeelError(f"data.tokenizer: {self.description} cannot encode the data ({error}); allowed: a "
                            "tokenizer that covers the text (a byte-level BPE covers any text)") from None
        return [np.asarray(e.ids, dtype=dtype) for e in encodings]

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer_file(path: str | Path) -> HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``); a file that does not load is a ``KeelError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeelError(f"data.tokenizer: '{path}' does not exist; allowed: bytes, {{bpe: VOCAB}}, or a "
                        "tokenizer.json file")
    tokenizers = _import_tokenizers()
    try:
        text = path.read_text(encoding="utf-8")
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # a parse error of the JSON or of the tokenizer's structure
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KeelError(f"data.tokenizer: '{path}' does not load as a tokenizers JSON file ({first}); allowed: a "
                        "tokenizer.json written by tokenizers or transformers' save_pretrained") from None
    return HFTokenizer(tokenizer, text, f"tokenizer '{path}'", path)


def train_bpe(texts: Sequence[bytes], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme) of ``vocab_size`` ids trained on ``texts``, with ``<|endoftext|>``.

    Byte-level: every text encodes (the 256 byte symbols are in the vocabulary), so no token is unknown.
    """
    if vocab_size < BPE_MIN_VOCAB:
        raise KeelError(f"data.tokenizer.bpe: {vocab_size} is too small a vocabulary for the data (byte-level BPE "
                        f"needs the 256 bytes and {EOD_TEXT}); allowed: at least {BPE_MIN_VOCAB}")
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer=trainer,
                                  length=len(texts))
    return HFTokenizer(tokenizer, tokenizer.to_str(), f"byte-level BPE ({vocab_size:,} ids)")


def tokenizer_label(spec: Any) -> str:
    """A short name of a tokenizer setting for cache folders: ``bytes``, ``bpe512``, ``file-<hash>``."""
    if spec == "bytes":
        return "bytes"
    if isinstance(spec, dict):
        return f"bpe{int(spec['bpe'])}"
    return "file-" + hashlib.sha256(Path(spec).expanduser().read_bytes()).hexdigest()[:16]


def build_tokenizer(spec: Any, train_texts: Sequence[bytes] | None, cache: Path | None, eod: bool = False):
    """The tokenizer of ``data.tokenizer``: bytes, a cached or newly trained BPE, or a tokenizer file.

    A BPE is trained on ``train_texts`` once and kept as ``cache/tokenizer.json``; a second run with the same
    source and settings loads it from there.
    """
    if spec == "bytes":
        return ByteTokenizer(eod)
    if isinstance(spec, dict):
        vocab = int(spec["bpe"])
        if cache is not None and (cache / "tokenizer.json").is_file():
            return load_tokenizer_file(cache / "tokenizer.json")
        if train_texts is None:
            raise KeelError("data.tokenizer: {bpe: ...} trains on text; allowed with a token file: bytes or a "
                            "tokenizer.json that decodes it")
        tokenizer = train_bpe(train_texts, vocab)
        if cache is not None:
            atomic_write_bytes(cache / "tokenizer.json", tokenizer.json_text.encode("utf-8"))
            tokenizer.path = cache / "tokenizer.json"
        return tokenizer
    return load_tokenizer_file(spec)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
