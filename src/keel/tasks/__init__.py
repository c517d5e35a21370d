"""Tasks: what the trainer trains. ``task: lm`` (default), ``task: digits``, or ``task: package.module:factory``.

Tasks with a name are registered (``keel.task_registry``) with the config blocks they own and their recipe. A
factory named by import path is called with ``task_args`` as keyword arguments and returns a ``Task`` (for
plain PyTorch objects, ``PlainTask(model, train_data, val_data, loss_fn)``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.tasks.base import Task, batch_examples, check_loss, check_model, expected_initial_loss, move_to_device
from keel.tasks.plain import PlainTask
from keel.task_registry import PYTHON_TASK, TaskSpec, check_task_name, register_task, task_spec, task_specs

__all__ = ["PYTHON_TASK", "PlainTask", "Task", "TaskSpec", "batch_examples", "check_loss", "check_model",
           "expected_initial_loss", "from_config", "move_to_device", "register_task", "resolve_factory", "task_spec",
           "task_specs"]


def resolve_factory(name: str):
    """The class or function that builds task ``name``."""
    spec = task_spec(name)
    if spec is not None:
        module_name, _, attribute = spec.factory.partition(":")
        return getattr(importlib.import_module(module_name), attribute)
    if name == PYTHON_TASK:
        raise KeelError("task: 'python': this run's task was passed to keel.train() as a Python object and cannot be "
                        "rebuilt from its config; allowed: pass the same task again in Python, or name a factory "
                        "as task: package.module:factory")
    module_name, _, attribute = check_task_name(name).partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, "")  # a factory in the user's working directory imports like `python -m` finds it
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise KeelError(f"task: {name!r}: module '{module_name}' does not import ({error}); allowed: an "
                        "importable module (on PYTHONPATH or in the working directory)") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise KeelError(f"task: {name!r}: '{module_name}' has no attribute '{attribute}'; allowed: the name of "
                            "a function or class that returns a keel Task")
        target = getattr(target, part)
    if not callable(target):
        raise KeelError(f"task: {name!r} is a {type(target).__name__}, not callable; allowed: a function or class "
                        "that returns a keel Task")
    return target


def build(name: str, args: dict[str, Any]) -> Task:
    """Call the factory of task ``name`` with ``args``; the result must be a ``Task``."""
    factory = resolve_factory(name)
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as error:
        raise KeelError(f"task_args: {error} for task {name!r}; allowed: {_parameters(factory)}") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call below reports
    try:
        task = factory(**args)
    except KeelError:
        raise
    except (TypeError, ValueError) as error:
        raise KeelError(f"task_args: task {name!r} rejected {args!r}: {error}") from None
    if not isinstance(task, Task):
        raise KeelError(f"task: {name!r} returned a {type(task).__name__}; allowed: a keel.tasks.Task (wrap a model "
                        "and data in keel.tasks.PlainTask)")
    return task


def from_config(config) -> Task:
    """The task of a run config, bound to its settings."""
    return build(config.task, dict(config.task_args)).bind(config)


def _parameters(factory) -> str:
    try:
        names = [p.name for p in inspect.signature(factory).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return "the factory's keyword arguments"
    return ", ".join(names) if names else "no arguments"
