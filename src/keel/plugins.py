"""Finding plugins: the modules that register techniques or tasks, without a list of them anywhere.

A registry (``keel.techniques``, ``keel.task_registry``) is filled by the modules that call its ``register_...``
function at their top level. ``discover`` imports them: keel's own, found by reading keel's package for modules
that make that call (package discovery: nothing is imported to look), then those other packages declare as entry
points of a group, e.g. in a plugin's ``pyproject.toml``::

    [project.entry-points."keel.techniques"]
    my_technique = "my_package.my_module"

So the arrows point one way: a plugin imports its registry, and no registry imports (or names) its plugins.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from importlib import metadata
from pathlib import Path

__all__ = ["discover", "registering_modules"]


@cache
def registering_modules(function: str) -> tuple[str, ...]:
    """keel's modules whose source calls ``function`` at its top level (a line starting ``function(``)."""
    root = Path(__file__).resolve().parent
    call = re.compile(rf"^{re.escape(function)}\(", re.M)
    found = []
    for path in sorted(root.rglob("*.py")):
        if call.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(root).with_suffix("").parts
            found.append(".".join(("keel", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return tuple(found)


def discover(function: str, group: str) -> None:
    """Import every module that registers through ``function``: keel's own, then the entry points of ``group``."""
    for name in registering_modules(function):
        importlib.import_module(name)
    for entry_point in metadata.entry_points(group=group):
        entry_point.load()
