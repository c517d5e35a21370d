"""Search spaces in the run config: the ``sweep:`` block (what to search) and ``sweep_options:`` (how).

``sweep:`` maps dotted config keys to distributions, written as strings, or a YAML list for a grid axis::

    sweep:
      optimizer.lr: loguniform(1e-4, 1e-1)       # log-uniform floats in [low, high]
      optimizer.weight_decay: [0, 1.0e-5, 1.0e-4] # a grid axis (a categorical choice for other samplers)
      model.dropout: uniform(0.0, 0.3)           # uniform floats
      model.n_layer: int(2, 6)                   # integers low..high inclusive; int(16, 256, log) log-spaced
      optimizer.name: choice([adamw, lion])      # one of the values

Both blocks are registered techniques (``keel.techniques``) whose factory makes no trainer callback, so
``keel train`` validates them with the rest of the config and trains the config as written (it says so once);
``keel sweep`` searches. Syntax, empty ranges, keys that do not exist and distributions that do not fit a typed key
(``uniform`` on an integer, anything but a choice on a word) fail here with one line; ``check_space`` then tries
every distribution's values in the whole config (a choice of optimizer names, an LR range) before any trial runs.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.errors import KeelError
from keel.techniques import Callback, register_technique

__all__ = ["Distribution", "SweepBlock", "SweepOptions", "apply_params", "check_space", "parse_distribution",
           "space_of"]

KINDS = ("loguniform", "uniform", "int", "choice")
_CALL = re.compile(r"^\s*(?P<kind>[a-z]+)\s*\((?P<args>.*)\)\s*$", re.S)
_FORMS = "loguniform(low, high), uniform(low, high), int(low, high), int(low, high, log), choice([a, b, ...]) " \
         "or a YAML list (a grid axis)"
#: Keys a sweep may not set: where runs go is the sweep's business, and a sweep does not search its own blocks.
_NOT_SEARCHABLE = ("out_dir", "sweep", "sweep_options")


@dataclass(frozen=True)
class Distribution:
    """One searched key: ``kind`` (loguniform, uniform, int, choice, grid), its range or values, how it was written."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = field(default_factory=tuple)
    text: str = ""

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def suggest(self, trial: Any, name: str) -> Any:
        """The value of this key for an Optuna trial."""
        if self.kind in ("loguniform", "uniform"):
            return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(name, list(self.choices))

    def representatives(self) -> list[Any]:
        """Values that exercise the range (its ends and an inner point) or every choice: what ``check_space`` tries."""
        if self.kind == "loguniform":
            return [float(self.low), math.sqrt(float(self.low) * float(self.high)), float(self.high)]
        if self.kind == "uniform":
            return [float(self.low), float(self.low) + 0.37 * (float(self.high) - float(self.low)), float(self.high)]
        if self.kind == "int":
            return sorted({int(self.low), (int(self.low) + int(self.high)) // 2, int(self.high)})
        return list(self.choices)


def parse_distribution(key: str, value: Any) -> Distribution:
    """``"loguniform(1e-4, 1e-1)"`` (and the other forms) or a list -> a ``Distribution``; a KeelError names
    ``sweep.<key>``, the value and the allowed forms."""
    where = f"sweep.{key}"
    if isinstance(value, list):
        if not value:
            raise KeelError(f"{where}: [] is an empty grid axis; allowed: a list of at least one value")
        _check_choices(where, value)
        return Distribution("grid", choices=tuple(value), text=repr(value))
    if not isinstance(value, str) or not _CALL.match(value):
        raise KeelError(f"{where}: {value!r} is not a distribution; allowed: {_FORMS}")
    match = _CALL.match(value)
    kind, text = match["kind"], value.strip()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise KeelError(f"{where}: '{kind}' is not a distribution{hint}; allowed: {_FORMS}")
    from keel.config import load_yaml

    try:
        args = load_yaml(f"[{match['args']}]")
    except Exception:
        raise KeelError(f"{where}: the arguments of {text!r} do not parse; allowed: {_FORMS}") from None
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise KeelError(f"{where}: {text!r} needs one non-empty list; allowed: choice([a, b, ...])")
        _check_choices(where, args[0])
        return Distribution("choice", choices=tuple(args[0]), text=text)
    log = False
    if kind == "int" and len(args) == 3 and args[2] == "log":
        args, log = args[:2], True
    if len(args) != 2 or not all(_is_number(a) for a in args):
        shown = "int(low, high) or int(low, high, log)" if kind == "int" else f"{kind}(low, high)"
        raise KeelError(f"{where}: {text!r} needs two numbers; allowed: {shown}")
    low, high = args
    if kind == "int":
        if not all(isinstance(a, int) or float(a).is_integer() for a in args):
            raise KeelError(f"{where}: {text!r} has a bound that is not an integer; allowed: int(low, high) with "
                            "integers low <= high")
        low, high = int(low), int(high)
        if high < low:
            raise KeelError(f"{where}: {text!r} is an empty range (high {high} < low {low}); allowed: low <= high")
        if log and low < 1:
            raise KeelError(f"{where}: {text!r} is log-spaced from {low}; allowed: int(low, high, log) with low >= 1")
        return Distribution("int", low, high, log=log, text=text)
    low, high = float(low), float(high)
    if not low < high:
        raise KeelError(f"{where}: {text!r} is an empty range (low {low:g} >= high {high:g}); allowed: low < high")
    if kind == "loguniform" and low <= 0:
        raise KeelError(f"{where}: {text!r} starts at {low:g}; allowed: loguniform(low, high) with 0 < low < high "
                        "(for a range that includes 0, a list such as [0, 1e-5, 1e-4])")
    return Distribution(kind, low, high, log=kind == "loguniform", text=text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choices(where: str, values: list) -> None:
    for value in values:
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise KeelError(f"{where}: {value!r} cannot be a choice; allowed: numbers, words, true/false or null "
                            "(Optuna stores choices as plain values)")
    if len({repr(v) for v in values}) != len(values):
        raise KeelError(f"{where}: {values!r} repeats a value; allowed: distinct values")


# ------------------------------------------------------------------------------------------ the config blocks


class SweepBlock(BaseModel):
    """``sweep:`` — dotted config key -> distribution; read by ``keel sweep``, ignored by ``keel train``."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        return flatten_keys(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _distributions(self) -> "SweepBlock":
        for key, value in (self.__pydantic_extra__ or {}).items():
            _check_key(key)
            distribution = parse_distribution(key, value)
            _check_kind(key, distribution)
        return self

    def space(self) -> dict[str, Distribution]:
        return {key: parse_distribution(key, value) for key, value in (self.__pydantic_extra__ or {}).items()}


class SweepOptions(BaseModel):
    """``sweep_options:`` — how ``keel sweep`` searches; each key is also a ``keel sweep --option``."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_loss", description="The objective: a key of the evaluation record (val_loss, "
                        "val_accuracy, ...), its value at the trial's last evaluation.")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="minimize or maximize the metric (null: maximize for accuracies, else minimize).")
    sampler: Literal["auto", "grid", "random", "tpe", "cmaes", "gp"] = Field(
        "auto", description="Optuna sampler; auto: grid when every key is a list, else tpe.")
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = Field(
        "none", description="Stop unpromising trials at an evaluation, from the metric reported at each one.")
    trials: int | None = Field(None, ge=1, description="Finished trials to reach (null: the grid's size for a "
                               "grid, else 20). Trials of a study shared by several machines count together.")
    seed: int = Field(0, description="Seed of the sampler (each worker adds its index).")
    workers: int = Field(1, ge=1, description="Local worker processes (each runs whole trials).")
    threads: int = Field(1, ge=1, description="torch threads per trial when the config leaves `threads` null.")
    heartbeat_interval: int = Field(30, ge=1, description="Seconds between a running trial's heartbeats; a trial "
                                    "silent for 2 intervals is failed and retried once.")
    prune_startup: int = Field(3, ge=0, description="Median pruner: trials that finish before it prunes any.")
    diverged_factor: float = Field(
        3.0, gt=1.0, description="A trial whose val_loss exceeds this times ln(classes) (the loss of a uniform "
        "guess) has diverged: stopped and recorded as failed.")
    budget: int | str = Field(
        "20%", description="Presets: the short runs' length: steps, or a percentage of the config's max_steps.")
    seeds: int = Field(8, ge=2, description="Preset restarts: seeds trained for the short budget.")
    refine_trials: int = Field(8, ge=1, description="Preset coarse-to-fine: trials of the refined search.")
    survivors: int = Field(1, ge=1, description="Preset coarse-to-fine: configs carried from one stage to the next: "
                           "the best LR decades into the grid, the best grid points into the refined search, and "
                           "the best refined configs each trained for the whole max_steps without decay.")
    repeats: int = Field(1, ge=1, description="Preset coarse-to-fine: rounds of refine, then train the survivors "
                         "longer; each round after the first refines around the best long runs so far.")


def _check_key(key: str) -> None:
    """The key names a config field (a technique block's field, or a key inside a free-form block such as
    optimizer); it is not one a sweep may not set."""
    from keel.config import TrainConfig

    parts = key.split(".")
    if parts[0] in _NOT_SEARCHABLE:
        raise KeelError(f"sweep.{key}: '{parts[0]}' cannot be searched (the sweep owns it); allowed: any other "
                        "config key")
    _resolve(parts, TrainConfig, prefix="")


def _resolve(parts: list[str], model: type[BaseModel], prefix: str) -> Any:
    """The annotation of the field ``parts`` names under ``model`` (``Any`` inside free-form dicts)."""
    from keel.techniques import techniques

    fields = {name: field.annotation for name, field in model.model_fields.items()}
    extra = {}
    if prefix == "":
        from keel.config import task_blocks

        extra = {name: t.config for name, t in techniques().items() if name not in _NOT_SEARCHABLE}
        for name, (_, block) in task_blocks().items():  # a task's blocks (model.n_embd), its data keys (data.source)
            (fields if name in fields else extra)[name] = block
    name = parts[0]
    if name in fields:
        annotation = fields[name]
    elif name in extra:
        annotation = extra[name]
    else:
        allowed = [n for n in [*fields, *extra] if n not in _NOT_SEARCHABLE]
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise KeelError(f"sweep.{prefix}{'.'.join(parts)}: '{prefix}{name}' is not a config key{hint} allowed "
                        f"here: {', '.join(allowed)}")
    if len(parts) == 1:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _resolve(parts[1:], annotation, f"{prefix}{name}.")
    if typing.get_origin(annotation) is dict or annotation is dict or (
            isinstance(annotation, type) and issubclass(annotation, Mapping)):  # the typed optimizer block
        return Any  # optimizer, schedule, task_args: their keys are checked with the whole config (check_space)
    raise KeelError(f"sweep.{prefix}{'.'.join(parts)}: '{prefix}{name}' holds a value, not keys; allowed: "
                    f"sweep.{prefix}{name}")


def _kind_of(annotation: Any) -> str:
    """'int', 'float', 'bool', 'word' (str or Literal) or 'any' for a field's annotation (None dropped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind_of(a) for a in typing.get_args(annotation) if a is not type(None)}
        if kinds == {"int", "float"}:
            return "float"
        return kinds.pop() if len(kinds) == 1 else "any"
    if origin is Literal:
        return "word"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "word"
    return "any"


def _check_kind(key: str, distribution: Distribution) -> None:
    from keel.config import TrainConfig

    kind = _kind_of(_resolve(key.split("."), TrainConfig, prefix=""))
    if distribution.categorical or kind in ("any", "float"):
        return
    if kind == "int" and distribution.kind == "int":
        return
    allowed = {"int": "int(low, high), choice([...]) or a list",
               "bool": "choice([true, false]) or [true, false]",
               "word": "choice([...]) or a list of its values"}[kind]
    noun = {"int": "an integer", "bool": "true or false", "word": "a word"}[kind]
    raise KeelError(f"sweep.{key}: {distribution.text} samples {'floats' if distribution.kind != 'int' else 'integers'}"
                    f", but {key} is {noun}; allowed: {allowed}")


# ------------------------------------------------------------------------------------------ applying a space


def flatten_keys(block: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{optimizer: {lr: X}}`` -> ``{"optimizer.lr": X}`` (what ``sweep.optimizer.lr=X`` on the command line gives);
    distributions are never mappings, so this is unambiguous."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def space_of(raw: dict[str, Any]) -> dict[str, Distribution]:
    """The parsed ``sweep:`` block of a raw config (empty when there is none)."""
    block = raw.get("sweep") or {}
    if not isinstance(block, dict):
        raise KeelError(f"sweep: {block!r} is not a mapping; allowed: dotted.key: distribution")
    block = flatten_keys(block)
    return {key: parse_distribution(key, value) for key, value in block.items()}


def apply_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` (without the sweep blocks) with each dotted key set to its value."""
    import copy

    from keel.config import set_dotted

    out = copy.deepcopy({k: v for k, v in raw.items() if k not in ("sweep", "sweep_options")})
    for key, value in params.items():
        set_dotted(out, key, value)
    return out


def check_space(raw: dict[str, Any], space: dict[str, Distribution], limit: int = 64) -> None:
    """Every value each distribution can take fits the config: for each key and each representative value (range
    ends, an inner point, every choice), the config validates with it and with some values of the other keys
    (a hyperparameter of one optimizer in a choice of optimizers needs only that one). One KeelError otherwise."""
    from keel.config import validate

    keys = list(space)
    for key in keys:
        others = [k for k in keys if k != key]
        combos = list(itertools.product(*(space[k].representatives() for k in others)))
        random.Random(0).shuffle(combos)
        for value in space[key].representatives():
            first_error = None
            for combo in [None, *combos[:limit]]:
                params = {key: value} if combo is None else {key: value, **dict(zip(others, combo))}
                try:
                    validate(apply_params(raw, params))
                    break
                except KeelError as error:
                    first_error = first_error or error
            else:
                raise KeelError(f"sweep.{key}: {space[key].text} takes the value {value!r}, which the config does "
                                f"not accept: {first_error}") from None


# ------------------------------------------------------------------------------------------ keel train's note


class _SweepNote(Callback):
    """``keel train`` with a ``sweep:`` block trains the config as written; this says so once."""

    name = "sweep_note"

    def __init__(self, keys: list[str]):
        self.keys, self._said = keys, False

    def on_run_start(self, trainer) -> None:
        if not self._said:
            self._said = True
            trainer.say(f"note: the sweep: block ({', '.join(self.keys)}) is for `keel sweep`; keel train trains the "
                        "config as written")


register_technique("sweep", SweepBlock,
                   lambda block: _SweepNote(list(block.__pydantic_extra__)) if block.__pydantic_extra__ else None)
register_technique("sweep_options", SweepOptions, lambda block: None)
