"""The task registry: each task keel builds by name, with the config blocks it owns and its default recipe.

A task's module registers it, as a technique's module registers the technique::

    register_task(TaskSpec("lm", "keel.tasks.lm:LanguageModelTask", "a language model on data.source",
                           settings={"data": LMDataConfig, "model": ModelConfig, "sample": SampleConfig},
                           recipe="fast", check=check_lm, context_length=lambda config: config.model.block_size))

A run config naming the task then accepts its blocks (``model:``, ``sample:``, and keys a ``data`` block model
adds to the core ``data`` keys), validated by the task's models; ``keel train --help`` lists them; a config
without ``recipe:`` gets the task's. Neither ``keel.config`` nor the trainer names a task. Tasks named by import
path (``package.module:factory``) and Python objects handed to ``keel.train`` own no block and take the
``baseline`` recipe. keel's own tasks are found by package discovery and other packages' through the entry-point
group ``keel.tasks`` (``keel.plugins``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError
from keel.plugins import discover

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["DEFAULT_RECIPE", "PYTHON_TASK", "TaskSpec", "check_task_name", "register_task", "task_spec",
           "task_specs"]

#: The recipe of a task that names none (and of tasks by import path or Python object).
DEFAULT_RECIPE = "baseline"
#: What ``config.yaml`` records for a task handed to ``train()`` as a Python object: it cannot be rebuilt from the
#: config, so commands that rebuild tasks (``keel average --eval``, ``--resume`` from the command line) say so.
PYTHON_TASK = "python"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, ``factory`` (``"module:attribute"`` of the class or function that builds it,
    imported when the task is built), one line of what it trains, and what it owns:

    ``settings``: config blocks by key, each a pydantic model (a ``data`` model extends the core ``data`` block,
    which it must subclass); ``recipe``: the recipe a config without ``recipe:`` gets; ``check(config)``: checks
    against the whole config when it is loaded (sizes, memory), raising ``KeelError``; ``context_length(config)``:
    the length of its sequences, or None when its batches are no sequences (sequence-length warmup asks).
    """

    name: str
    factory: str
    description: str
    settings: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    recipe: str = DEFAULT_RECIPE
    check: Callable[[Any], None] | None = None
    context_length: Callable[[Any], int | None] | None = None


_REGISTRY: dict[str, TaskSpec] = {}
_loaded = False


def register_task(spec: TaskSpec) -> None:
    """Register a task by its name (once per name)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise KeelError(f"task '{spec.name}' is registered twice ({existing.factory} and {spec.factory})")
    _REGISTRY[spec.name] = spec


def task_specs() -> dict[str, TaskSpec]:
    """Every registered task by name (keel's own and entry points' loaded on first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        discover("register_task", "keel.tasks")
    return _REGISTRY


def check_task_name(name: str) -> str:
    """Syntax of the ``task`` key (whether the factory imports is checked when the task is built)."""
    if name in task_specs() or name == PYTHON_TASK or _IMPORT_PATH.match(name):
        return name
    raise KeelError(f"task: {name!r} is not a task; allowed: {', '.join(task_specs())}, or an import path "
                    "'package.module:factory'")


def task_spec(name: Any) -> TaskSpec | None:
    """The registered task ``name``, or None (a task by import path, a Python object, or no task)."""
    return task_specs().get(name) if isinstance(name, str) else None
