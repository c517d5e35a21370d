"""The optimizer registry: name -> (description, defaults, builder), and `create`, `from_config`, `check_config`.

Each record names the optimizer's hyperparameters with their defaults and a check; `check_config` validates a
config dict without a model, `create` builds param groups from a model (no weight decay on biases, norms and
embeddings; LR multipliers; layer-wise LR decay; freezing) and constructs the optimizer. Hyperparameters that are
lengths (AdEMAMix's warmups) take keel's time units ("500", "100%", "2ep", "1Mtok"; `keel.timeunits`), resolved to
steps by `create` / `from_config` with the run's `timeline` (or a run of `total_steps`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from keel.errors import KeelError
from keel.optim.param_groups import NO_DECAY_DEFAULT, build_param_groups
from keel.optim.torch_kernels import choose_kernels, has_sparse_embedding
from keel.timeunits import SYNTAX, Time, Timeline, stand_in

__all__ = [
    "GROUP_OPTIONS",
    "OptimizerConfig",
    "OptimizerSpec",
    "check_config",
    "create",
    "from_config",
    "get",
    "names",
    "register",
]

# --- hyperparameter checks: each returns None if the value is allowed, else a description of what is allowed ---


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def nonnegative(value: Any) -> str | None:
    return None if _number(value) and value >= 0 else "a finite number >= 0"


def positive(value: Any) -> str | None:
    return None if _number(value) and value > 0 else "a finite number > 0"


def unit_interval(value: Any) -> str | None:
    return None if _number(value) and 0 <= value < 1 else "a number in [0, 1)"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "an integer >= 1"


def integer_in(low: int, high: int) -> Callable[[Any], str | None]:
    def check_integer(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"an integer in [{low}, {high}]"

    return check_integer


def length(value: Any) -> str | None:
    """A length of at least one step in keel's time units; only its syntax is checked (the run length may be unknown)."""
    problem = f"a length of at least 1 step: {SYNTAX}"
    try:  # a very long run stands in for the run's: only malformed or zero lengths fail
        steps = stand_in(Time.steps(10**12)).steps(value, "")
    except KeelError:
        return problem
    return None if steps >= 1 and Time.parse(value).amount > 0 else problem


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check_optional(value: Any) -> str | None:
        return None if value is None else (None if check(value) is None else f"null or {check(value)}")

    return check_optional


def betas(n: int) -> Callable[[Any], str | None]:
    def check_betas(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and len(value) == n and all(unit_interval(b) is None for b in value)
        return None if ok else f"a list of {n} numbers, each in [0, 1)"

    return check_betas


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check_choice(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(map(repr, choices))

    return check_choice


def any_value(value: Any) -> str | None:
    return None


# --- options that shape the param groups; every optimizer accepts them when given an nn.Module ---

GROUP_OPTIONS: dict[str, tuple[Any, Callable[[Any], str | None], str]] = {
    "no_decay": (
        list(NO_DECAY_DEFAULT),
        lambda v: None
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
        else "a list of categories (bias, norm, embedding, 1d) or name patterns",
        "parameters that get weight_decay 0: categories bias, norm, embedding, 1d, or name patterns",
    ),
    "lr_scales": (
        {},
        lambda v: None
        if isinstance(v, Mapping) and all(isinstance(k, str) and positive(x) is None for k, x in v.items())
        else "a mapping of name pattern -> LR multiplier > 0",
        "{name pattern: LR multiplier}; the last matching pattern wins",
    ),
    "layer_lr_decay": (
        None,
        lambda v: None if v is None or (_number(v) and 0 < v <= 1) else "null or a number in (0, 1]",
        "LR multiplier d ** (num_blocks + 1 - depth): the head at full LR, each block below d times smaller",
    ),
    "freeze": (
        [],
        lambda v: None
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
        else "a list of name patterns",
        "name patterns of parameters to freeze (requires_grad = False)",
    ),
    "freeze_depth": (
        0,
        lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "an integer >= 0",
        "freeze every parameter of depth < k (1: the embeddings; 3: embeddings and blocks 0, 1)",
    ),
    "unfreeze_at": (
        None,
        lambda v: optional(length)(v),
        "a length ('300', '20%', '2ep'): the frozen parameters (freeze, freeze_depth) train too from that step on, "
        "with their group's settings (a new head on frozen features first, then the whole network: one run)",
    ),
}


@dataclass(frozen=True)
class Hparam:
    """One hyperparameter: its default, the check of its value, and a one-line description.

    `length`: the value is a length in keel's time units, resolved to steps when the optimizer is built.
    """

    default: Any
    check: Callable[[Any], str | None]
    doc: str = ""
    length: bool = False


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry record: the name, one line of what, the paper or source, the default LR and the hyperparameters.

    `build(groups, lr, **hparams)` constructs the optimizer from torch param groups. `group_split`, if set,
    labels each parameter (e.g. Muon's "muon" / "adamw") so that groups are built per label. `missing`, if set,
    returns None when the optimizer can be built here, else what it needs (e.g. a newer torch); `check_config`
    and `create` raise a KeelError with it. `torch_class`, if set, is the torch optimizer `build` constructs:
    `create` fills its `fused` / `foreach` hyperparameters left null for the parameters' devices
    (`keel.optim.torch_kernels.choose_kernels`). `takes_total_steps`: `build` accepts `total_steps`, the run's
    length when `create` is given it (keel's compiled optimizers decide from it whether compiling pays).
    """

    name: str
    description: str
    source: str
    lr: float
    hparams: dict[str, Hparam]
    build: Callable[..., torch.optim.Optimizer]
    group_split: Callable[[nn.Module], Callable[[str, torch.Tensor], str]] | None = None
    missing: Callable[[], str | None] | None = None
    torch_class: type | None = None
    takes_total_steps: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr} | {k: h.default for k, h in self.hparams.items()}


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add an optimizer record to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise KeelError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _closest(word: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(word, allowed, n=1)
    return f"; did you mean {close[0]!r}? " if close else "; "


def get(name: str, *, key: str = "optimizer") -> OptimizerSpec:
    """The registry record for `name`; a KeelError naming the valid ones otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        hint = _closest(name, _REGISTRY) if isinstance(name, str) else "; "
        raise KeelError(f"{key}.name: {name!r} is not an optimizer{hint}allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _require_available(record: OptimizerSpec, key: str) -> None:
    problem = record.missing() if record.missing is not None else None
    if problem is not None:
        raise KeelError(f"{key}.name: {record.name!r} {problem}")


def names() -> dict[str, str]:
    """Every registered optimizer: name -> one line with its description, source and defaults."""
    out = {}
    for spec in _REGISTRY.values():
        defaults = ", ".join(f"{k}={_show(v)}" for k, v in spec.defaults.items())
        out[spec.name] = f"{spec.description} ({spec.source}); defaults: {defaults}"
    return out


def _show(value: Any) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if isinstance(value, (list, tuple)) else str(value)


def check_config(spec: Mapping[str, Any], key: str = "optimizer", note: str = "") -> dict[str, Any]:
    """Validate an optimizer config dict without a model; returns it with every default filled in.

    `{"name": "adamw", "lr": 6e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}`. Unknown names and hyperparameters
    and out-of-range values raise KeelError naming the key, the value and what is allowed; `note` follows the
    optimizer's name in them (where the name came from, e.g. a recipe).
    """
    if not isinstance(spec, Mapping):
        raise KeelError(f"{key}: {spec!r} is not a mapping; expected e.g. {{name: adamw, lr: 0.001}}")
    if "name" not in spec:
        raise KeelError(f"{key}.name: missing; allowed: {', '.join(_REGISTRY)}")
    record = get(spec["name"], key=key)
    _require_available(record, key)
    hparams = {k: v for k, v in spec.items() if k != "name"}
    return {"name": record.name} | _check_hparams(record, hparams, key, note)


class OptimizerConfig(Mapping):
    """An optimizer block typed once, when the config is validated: the registered optimizer it names (``record``:
    its hyperparameters, defaults and checks), every hyperparameter checked with its default filled in
    (``settings``; also as attributes: ``config.optimizer.lr``, ``.betas``), and the block as given (the mapping
    itself, what config.yaml records: ``config.optimizer["lr"]``, ``dict(config.optimizer)``).

    ``keel.optim.from_config`` builds the optimizer from it without checking it again; the trainer, the schedule,
    LR scaling and the commands read its ``lr``. What the run resolves from it (a scaled LR, the kernels chosen)
    goes to the run's records, never back into it.
    """

    __slots__ = ("record", "settings", "_given")

    def __init__(self, block: Mapping[str, Any], key: str = "optimizer", note: str = ""):
        checked = check_config(block, key, note)
        self.record = get(checked["name"], key=key)
        self.settings: dict[str, Any] = {k: v for k, v in checked.items() if k != "name"}
        self._given = {"name": self.record.name, **{k: v for k, v in block.items() if k != "name"}}

    @property
    def name(self) -> str:
        return self.record.name

    def __getattr__(self, key: str) -> Any:
        settings = object.__getattribute__(self, "settings")
        if key in settings:
            return settings[key]
        raise AttributeError(f"optimizer {self.name!r} has no hyperparameter {key!r}")

    def __getitem__(self, key: str) -> Any:
        return self._given[key]

    def __iter__(self):
        return iter(self._given)

    def __len__(self) -> int:
        return len(self._given)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OptimizerConfig):
            return self._given == other._given
        return dict(self._given) == other if isinstance(other, Mapping) else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"OptimizerConfig({self._given!r})"

    def __deepcopy__(self, memo: dict) -> OptimizerConfig:
        return self  # immutable

    def __copy__(self) -> OptimizerConfig:
        return self

    def __reduce__(self):
        return OptimizerConfig, (self._given,)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """As a pydantic field: a mapping is typed (KeelError naming the key otherwise); dumped as given."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            lambda value: value if isinstance(value, OptimizerConfig) else OptimizerConfig(value),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: dict(value._given)),
            json_schema_input_schema=core_schema.dict_schema())


def _check_hparams(record: OptimizerSpec, hparams: Mapping[str, Any], key: str, note: str = "") -> dict[str, Any]:
    allowed = ["lr", *record.hparams, *GROUP_OPTIONS]
    out = dict(record.defaults) | {k: v[0] for k, v in GROUP_OPTIONS.items()}
    for name, value in hparams.items():
        if name not in allowed:
            raise KeelError(
                f"{key}.{name}: not a hyperparameter of {record.name!r}{note}{_closest(str(name), allowed)}"
                f"allowed: {', '.join(allowed)}"
            )
        if name == "lr":
            problem = nonnegative(value)
        elif name in GROUP_OPTIONS:
            problem = GROUP_OPTIONS[name][1](value)
        else:
            problem = record.hparams[name].check(value)
        if problem is not None:
            raise KeelError(f"{key}.{name}: {value!r} is not allowed for {record.name!r}{note}; allowed: {problem}")
        out[name] = tuple(value) if isinstance(value, list) and name not in GROUP_OPTIONS else value
    if out["unfreeze_at"] is not None and not out["freeze"] and not out["freeze_depth"]:
        raise KeelError(f"{key}.unfreeze_at: {out['unfreeze_at']!r} is given but nothing is frozen; allowed: with "
                        f"{key}.freeze (name patterns) or {key}.freeze_depth, or null")
    return out


def _resolve_lengths(record: OptimizerSpec, settings: dict[str, Any], key: str, timeline: Timeline) -> None:
    """Length hyperparameters (given in steps, "100%", "2ep", "1Mtok") to whole steps, in place."""
    for name, hparam in record.hparams.items():
        value = settings.get(name)
        if not hparam.length or value is None:
            continue
        steps = timeline.steps(value, f"{key}.{name}")
        if steps < 1:
            raise KeelError(f"{key}.{name}: {value!r} is {steps} steps in this run; allowed: a length of at least 1 "
                            "step, or null")
        settings[name] = steps


def _unfreeze_step(value: Any, key: str, timeline: Timeline) -> int | None:
    """``unfreeze_at`` in steps of this run (a length in keel's time units), or None."""
    if value is None:
        return None
    steps = timeline.steps(value, f"{key}.unfreeze_at")
    if steps < 1:
        raise KeelError(f"{key}.unfreeze_at: {value!r} is {steps} steps in this run; allowed: a length of at least "
                        "1 step, or null")
    return steps


def create(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    lr: float | None = None,
    *,
    key: str = "optimizer",
    total_steps: int | None = None,
    timeline: Timeline | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer `name` for a model (param groups built by keel) or for params / param groups.

    Given an `nn.Module`, biases, norm weights and embeddings get no weight decay (`no_decay`), and `lr_scales`,
    `layer_lr_decay`, `freeze`, `freeze_depth` shape the groups (see `keel.optim.param_groups`). Every group
    carries `lr_scale` (1.0 unless set), so `keel.schedules.set_lr` keeps the multipliers. Given parameters or
    group dicts, they are passed to the optimizer unchanged (group options are then an error).

    Length hyperparameters (AdEMAMix's `alpha_warmup`, `beta3_warmup`, `t_alpha_beta3`) may be given in keel's
    time units; `timeline` (the trainer's `keel.timeunits.Timeline`) or a run of `total_steps` resolves them.

    torch's optimizers get `fused` / `foreach` chosen for the parameters' devices where left null: the fused
    kernel where torch has one (AdamW, Adam and SGD on CPU), else foreach where the device has fast multi-tensor
    kernels, else torch's per-tensor loop (`keel.optim.torch_kernels`); values given are kept. Lion and
    AdEMAMix with `fused` null compile their update only if the run (its length in steps, else an assumed
    5000 steps) is long enough to repay the compile (`keel.optim.multi_tensor`).

    >>> opt = create("adamw", nn.Linear(4, 2), lr=1e-3, weight_decay=0.1)
    >>> opt = create("ademamix", nn.Linear(4, 2), alpha_warmup="100%", total_steps=1000)
    """
    record = get(name, key=key)
    _require_available(record, key)
    if lr is not None:
        hparams["lr"] = lr
    settings = _check_hparams(record, hparams, key)
    return _build(record, settings, model_or_params, key, total_steps, timeline,
                  group_options_given={k for k in GROUP_OPTIONS if k in hparams})


def _build(record: OptimizerSpec, settings: dict[str, Any], model_or_params: Any, key: str,
           total_steps: int | None, timeline: Timeline | None, group_options_given: set[str]) -> torch.optim.Optimizer:
    """The optimizer of ``record`` with checked ``settings`` (every hyperparameter): param groups, lengths in time
    units, kernels."""
    settings = dict(settings)
    if timeline is None:
        timeline = Timeline.of_steps(total_steps)
    elif total_steps is None:
        total_steps = timeline.total_steps
    _resolve_lengths(record, settings, key, timeline)
    group_settings = {k: settings.pop(k) for k in GROUP_OPTIONS}
    lr = settings.pop("lr")
    if isinstance(model_or_params, nn.Module):
        split = record.group_split(model_or_params) if record.group_split is not None else None
        groups = build_param_groups(
            model_or_params,
            weight_decay=settings.get("weight_decay", 0.0),
            no_decay=group_settings["no_decay"],
            lr_scales=group_settings["lr_scales"],
            layer_lr_decay=group_settings["layer_lr_decay"],
            freeze_patterns=group_settings["freeze"],
            freeze_depth=group_settings["freeze_depth"],
            split=split,
            unfreeze_at=_unfreeze_step(group_settings["unfreeze_at"], key, timeline),
        )
    else:
        if group_options_given:
            raise KeelError(
                f"{key}: {', '.join(sorted(group_options_given))} need a model (nn.Module), not a list of parameters"
            )
        groups = list(model_or_params)
        if not groups:
            raise KeelError(f"{key}: got an empty list of parameters")
        if isinstance(groups[0], dict):
            groups = [dict(g) for g in groups]
            for g in groups:
                g.setdefault("lr_scale", 1.0)
                params = g["params"]  # a generator would be used up by the kernel choice below
                if isinstance(params, torch.Tensor):
                    g["params"] = [params]
                elif not isinstance(params, (list, tuple, set)):
                    g["params"] = list(params)
        else:
            groups = [{"params": groups, "lr_scale": 1.0}]
    for g in groups:
        if "lr" not in g:
            g["lr"] = lr * g.get("lr_scale", 1.0)
    if record.torch_class is not None:
        settings |= choose_kernels(
            record.torch_class,
            [p for g in groups for p in g["params"]],
            fused=settings.get("fused"),
            foreach=settings.get("foreach"),
            sparse=isinstance(model_or_params, nn.Module) and has_sparse_embedding(model_or_params),
            key=key,
        )
    if record.takes_total_steps:
        settings["total_steps"] = total_steps
    return record.build(groups, lr=lr, **settings)


def from_config(
    spec: Mapping[str, Any],
    model: nn.Module,
    key: str = "optimizer",
    total_steps: int | None = None,
    timeline: Timeline | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer a config block describes for `model`: `{"name": "adamw", "lr": 6e-4, ...}`, or an
    `OptimizerConfig` (a run config's, checked once when it was validated: built without checking it again).

    `timeline` (or a run of `total_steps`) resolves length hyperparameters given in time units, e.g.
    `{"name": "ademamix", "alpha_warmup": "100%"}`.
    """
    typed = spec if isinstance(spec, OptimizerConfig) else OptimizerConfig(spec, key)
    _require_available(typed.record, key)
    group_options = {k for k in GROUP_OPTIONS if k in typed}
    return _build(typed.record, typed.settings, model, key, total_steps, timeline, group_options)


#: Hyperparameters of torch's optimizers that choose an implementation (a kernel), not the update.
KERNEL_HPARAMS = ("fused", "foreach")


def chosen_kernels(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The kernels ``optimizer`` runs with, as built (chosen for the parameters' devices where the config left them
    null): for the run's records, not for its config. keel's own optimizers say it (``kernels()``: Muon's batched
    Newton-Schulz and AdamW kernels, SOAP's batched path and product precision, Lion's and AdEMAMix's compiled
    update); torch's hold it in ``defaults`` (``fused`` / ``foreach``)."""
    if callable(getattr(optimizer, "kernels", None)):
        return optimizer.kernels()
    defaults = getattr(optimizer, "defaults", {})
    return {k: defaults[k] for k in KERNEL_HPARAMS if k in defaults and isinstance(defaults[k], (bool, type(None)))}
