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


def pydoc_topics() -> bytes:
    """The CPython reference topics, concatenated in sorted key order (deterministic), as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def stdlib_source(max_bytes: int | None = None) -> bytes:
    """The standard library's ``.py`` files in sorted path order, tests and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "test", "tests", "idle_test", "__pycache__"})
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            data = (Path(dirpath) / name).read_bytes()
            parts.append(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                return b"\n".join(parts)[:max_bytes]
    return b"\n".join(parts)


@functools.lru_cache(maxsize=2)
def load_builtin(name: str) -> bytes:
    """The bytes of a built-in corpus by name (``pydoc`` or ``stdlib``)."""
    if name == "pydoc":
        return pydoc_topics()
    if name == "stdlib":
        return stdlib_source()
    raise ValueError(f"unknown built-in corpus {name!r}; allowed: {', '.join(BUILTIN_CORPORA)}")
