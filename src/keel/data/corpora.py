"""Built-in corpora read from the local Python installation, so keel trains with no download.

- ``pydoc``: the reference-documentation topics that ship with CPython (``pydoc_data.topics``),
  English prose about the language, about half a megabyte to three quarters of one depending on the version.
- ``stdlib``: the standard library's own Python source code (tests and site-packages left out).
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

BUILTIN_CORPORA = ("pydoc", "stdlib")


#: What joins a corpus's documents in its byte stream (``pydoc_topics()``, ``stdlib_source()``).
SEPARATORS = {"pydoc": b"\n\n", "stdlib": b"\n"}


def pydoc_topic_texts() -> list[bytes]:
    """The CPython reference topics in sorted key order, one UTF-8 document each."""
    from pydoc_data.topics import topics

    return [topics[key].encode("utf-8") for key in sorted(topics)]


def pydoc_topics() -> bytes:
    """The CPython reference topics, concatenated in sorted key order (deterministic), as UTF-8 bytes."""
    return SEPARATORS["pydoc"].join(pydoc_topic_texts())


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted path order, tests and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "test", "tests", "idle_test", "__pycache__"})
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def stdlib_source(max_bytes: int | None = None) -> bytes:
    """The standard library's ``.py`` files in sorted path order, tests and site-packages left out."""
    parts: list[bytes] = []
    total = 0
    for path in stdlib_files():
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return SEPARATORS["stdlib"].join(parts)[:max_bytes]
    return SEPARATORS["stdlib"].join(parts)


def builtin_documents(name: str) -> list[bytes]:
    """A built-in corpus as documents: pydoc's topics, or the standard library's files (one document each)."""
    if name == "pydoc":
        return pydoc_topic_texts()
    if name == "stdlib":
        return [path.read_bytes() for path in stdlib_files()]
    raise ValueError(f"unknown built-in corpus {name!r}; allowed: {', '.join(BUILTIN_CORPORA)}")


@functools.lru_cache(maxsize=2)
def load_builtin(name: str) -> bytes:
    """The bytes of a built-in corpus by name (``pydoc`` or ``stdlib``)."""
    if name == "pydoc":
        return pydoc_topics()
    if name == "stdlib":
        return stdlib_source()
    raise ValueError(f"unknown built-in corpus {name!r}; allowed: {', '.join(BUILTIN_CORPORA)}")
