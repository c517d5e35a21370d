"""Trainer events and the technique registry: how a technique enters the trainer without the trainer knowing it.

A technique is a unit (an EMA, an early-stopping rule, a curriculum) plus a thin ``Callback`` around it. The module
that defines the callback registers it with its config block::

    register_technique("ema", EMAConfig, lambda block: EMACallback(block) if block.enabled else None)

The run config then accepts an ``ema:`` block (validated by ``EMAConfig``), ``keel train --help`` lists its keys,
and ``make_callbacks(config)`` builds the callback for every enabled block. Neither ``keel.config`` nor the loop
names a technique.

Before any event, once the task and the model are built and before the run directory is touched, ``check`` may
raise KeelError for a task or config the callback cannot work with (bad input found then leaves nothing behind).
Events, in the order one step meets them: ``on_run_start``; per step ``on_step_start``, ``on_batch`` (sees each
micro-batch before the forward pass and returns it, or a replacement), ``on_after_backward``, ``on_step_end``
(only after an applied update: ``trainer.state.step`` already counts it); ``on_eval`` (may add keys such as
``val_loss_ema`` to the eval record); ``on_checkpoint`` (may write files into the checkpoint directory before it
is committed); ``on_run_end``. A callback signals with ``should_stop``; the trainer acts. Keys a callback puts in
``trainer.step_metrics`` (e.g. ``seq_len``) go into each following step record of ``metrics.jsonl``. Its ``state_dict``
(tensors and plain containers) is saved in every checkpoint under its unique ``name`` and handed back to
``load_state_dict`` on resume (before ``on_run_start``). A callback whose ``on_batch`` changes what a step counts
(sequence-length warmup) says how in ``project_counts``, so lengths in tokens or examples resolve against what the
clock will count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError
from keel.plugins import discover

if TYPE_CHECKING:
    from pydantic import BaseModel

#: What a callback is handed: the trainer (``keel.train.loop.Trainer``), named here without importing it, so that the
#: registry, which the config imports, depends on nothing of the trainer's (no import circle).
Trainer = Any

__all__ = ["Callback", "Technique", "check_unique_names", "make_callbacks", "register_technique", "techniques"]


class Callback:
    name: str = "callback"
    should_stop: bool = False

    def check(self, trainer: Trainer) -> None: ...

    def on_run_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer) -> None: ...

    def on_batch(self, trainer: Trainer, batch: Any) -> Any:
        return batch

    def on_after_backward(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, ckpt_dir: Path) -> None: ...

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...

    def project_counts(self, trainer: Trainer) -> tuple[Callable[[int, tuple[float, float]], tuple[float, float]],
                                                        int] | None:
        """How ``on_batch`` changes the examples and tokens the clock counts, for lengths resolved before training
        (``keel.timeunits.Timeline``): ``(transform(step, (examples, tokens)) -> (examples, tokens), until)`` for
        the steps before ``until``, or None (the default: it changes nothing). Called when the trainer is built,
        and again on resume once ``load_state_dict`` ran (what a callback keeps from the checkpoint shapes the run's
        time), with the callbacks before it already applied to ``trainer.timeline``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Technique:
    """A registered technique: its config key, the block's pydantic model, and the callback factory.

    ``make(block)`` returns the callback for a validated block, or ``None`` when the block leaves it off.
    ``check(block, config)``, if given, checks the block against the rest of the run config when it is loaded
    (e.g. a length against ``model.block_size``) and raises ``KeelError``. ``order`` places its callback among the
    others (lower first, then in the order found): a technique that records what the others put in the run's
    summary (tracking) goes after them.
    """

    key: str
    config: type[BaseModel]
    make: Callable[[Any], Callback | None]
    check: Callable[[Any, Any], None] | None = None
    order: int = 0


_REGISTRY: dict[str, Technique] = {}
# keel's own techniques are found by package discovery, other packages' through the entry-point group
# ``keel.techniques`` (``keel.plugins``), on first use: importing keel stays cheap, and the registry imports no
# technique (the technique modules import it, and may import the units they wrap without a cycle).
_loaded = False


def register_technique(key: str, config: type[BaseModel], make: Callable[[Any], Callback | None],
                       check: Callable[[Any, Any], None] | None = None, order: int = 0) -> None:
    """Register the config block ``key`` and the callback factory of a technique (once per key); ``check(block,
    config)`` optionally checks the block against the whole run config when it is loaded; ``order`` places its
    callback (lower first)."""
    existing = _REGISTRY.get(key)
    if existing is not None and (existing.config is not config or existing.make is not make):
        raise KeelError(f"technique '{key}' is registered twice ({existing.config.__name__} and {config.__name__})")
    _REGISTRY[key] = Technique(key, config, make, check, order)
    ordered = sorted(_REGISTRY.values(), key=lambda technique: technique.order)  # stable: found order within one
    _REGISTRY.clear()
    _REGISTRY.update((technique.key, technique) for technique in ordered)


def techniques() -> dict[str, Technique]:
    """Every registered technique by config key, in callback order (keel's own and entry points' loaded on first
    call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        discover("register_technique", "keel.techniques")
    return _REGISTRY


def make_callbacks(config: Any) -> list[Callback]:
    """One callback per technique block of ``config`` that is turned on."""
    callbacks = []
    for key, technique in techniques().items():
        block = getattr(config, key, None)
        if block is not None:
            callback = technique.make(block)
            if callback is not None:
                callbacks.append(callback)
    return callbacks


def check_unique_names(callbacks: Iterable[Callback]) -> None:
    """Callback state is keyed by name: two callbacks with one name would overwrite each other's state."""
    seen: dict[str, Callback] = {}
    for callback in callbacks:
        other = seen.setdefault(callback.name, callback)
        if other is not callback:
            raise KeelError(
                f"callbacks: two callbacks are named '{callback.name}' ({type(other).__name__} and "
                f"{type(callback).__name__}); allowed: unique names (set the `name` attribute)"
            )
