"""Build schedules from the run config: ``{"name": "cosine", "warmup": "2%", "min_lr": 1e-5}``.

A spec is a mapping with ``name`` (a schedule or combinator, see :data:`SCHEDULES`) and the
arguments of its function in :mod:`keel.schedules`. Rules, in the order they apply:

* ``lr`` is the peak LR; it defaults to the optimizer's LR (``base_lr``), or the enclosing spec's
  ``lr`` inside ``join``/``warmup``/``wrap``/``plateau``. For ``noam`` and ``rsqrt``, ``scale``
  defaults to ``lr`` (as OpenNMT-tf passes its ``learning_rate`` as the scale).
* An argument named ``X_steps`` may be written ``X`` (``warmup`` for ``warmup_steps``, ``decay``
  for ``decay_steps``, ``total`` for ``total_steps``).
* Every length (``total_steps``, ``decay_steps``, ``interval``, ``period``, ``milestones``,
  ``boundaries``, ``step_start``, ...) takes time units: steps, ``"2%"`` of the whole run,
  ``"3ep"``, ``"2Mtok"``, ``"50kex"`` (:mod:`keel.timeunits`), resolved to the first step at which
  the run's clock reaches them (``timeline``; a schedule stays a pure function of the step).
* ``warmup`` (with optional ``warmup_init_lr`` and ``warmup_shape``) on a schedule that has no
  warmup of its own puts :func:`~keel.schedules.warmup` in front of it; the schedule then spans the
  rest of the run: its ``total_steps`` defaults to ``run length - warmup``, so a cosine with
  ``warmup: 100`` in a 1000-step run rises over steps 0..100 and reaches ``min_lr`` at step 1000.
  Schedules with their own warmup (``wsd``, ``noam``, ``rsqrt``, ``inverse_sqrt``) take ``warmup``
  as their ``warmup_steps`` and ``wsd``'s ``total_steps`` is the whole run.
* ``step_start``, ``step_duration`` and ``minimum`` on any schedule wrap it in
  :func:`~keel.schedules.wrap` (OpenNMT-tf's ``start_decay_steps``, ``decay_step_duration``,
  ``minimum_learning_rate``).
* Inside ``join``, a piece's ``total_steps`` defaults to the length of its segment (the last piece:
  up to the end of the run).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from keel.errors import KeelError
from keel.schedules import combinators, decays, plateau
from keel.schedules.base import check_lr
from keel.timeunits import SYNTAX, Time, Timeline, parse_time

__all__ = ["from_config", "parse_spec", "SCHEDULES"]


@dataclass(frozen=True)
class _Entry:
    function: Callable[..., Any]
    summary: str


#: Config names of every schedule and combinator, with the function each builds.
SCHEDULES: dict[str, _Entry] = {
    "constant": _Entry(decays.constant, "lr"),
    "step": _Entry(decays.step_decay, "lr * rate ** (t // interval)"),
    "multistep": _Entry(decays.multistep_decay, "lr * rate ** (milestones passed)"),
    "exponential": _Entry(decays.exponential_decay, "lr * rate ** (t / interval)"),
    "linear": _Entry(decays.linear_decay, "lr -> end_lr linearly over total_steps"),
    "cosine": _Entry(decays.cosine_decay, "lr -> min_lr along a half cosine over total_steps"),
    "sqrt": _Entry(decays.sqrt_decay, "lr * sqrt((T - t) / T)"),
    "polynomial": _Entry(decays.polynomial_decay, "end_lr + (lr - end_lr) * (1 - t / T) ** power"),
    "inverse_sqrt": _Entry(decays.inverse_sqrt, "linear warmup, then lr * sqrt(warmup_steps / t)"),
    "noam": _Entry(decays.noam, "scale * model_dim**-0.5 * min(s**-0.5, s * warmup_steps**-1.5)"),
    "rsqrt": _Entry(decays.rsqrt, "scale / sqrt(max(t, warmup_steps))"),
    "wsd": _Entry(decays.wsd, "warmup, constant lr, cooldown over decay_steps"),
    "cosine_restarts": _Entry(decays.cosine_restarts, "cosine cycles with warm restarts (SGDR)"),
    "plateau": _Entry(plateau.reduce_on_plateau, "lr * factor after patience evaluations without improvement"),
    "warmup": _Entry(combinators.warmup, "warmup in front of a schedule"),
    "join": _Entry(combinators.join, "schedules one after another at boundaries"),
    "wrap": _Entry(combinators.wrap, "OpenNMT-tf ScheduleWrapper: remap steps, floor at minimum"),
}
# The function names are accepted as well ("cosine_decay" for "cosine").
_ALIASES = {entry.function.__name__: name for name, entry in SCHEDULES.items() if entry.function.__name__ != name}

_LENGTHS = {"total_steps", "decay_steps", "warmup_steps", "interval", "period", "steps", "step_start", "step_duration"}
_LENGTH_LISTS = {"milestones", "boundaries"}
_INTEGERS = {"model_dim", "patience", "cooldown"}
_WORDS = {"shape", "threshold_mode", "mode"}
_GENERIC_WARMUP = ("warmup", "warmup_init_lr", "warmup_shape")
_GENERIC_WRAP = ("step_start", "step_duration", "minimum")


def from_config(
    spec: Mapping[str, Any] | str,
    *,
    base_lr: float,
    total_steps: int | None = None,
    timeline: Timeline | None = None,
    key: str = "schedule",
) -> Callable[[int], float]:
    """Build a schedule from a config spec such as ``{"name": "cosine", "warmup": "2%", "min_lr": 1e-5}``.

    ``base_lr`` is the optimizer's peak LR (a spec may override it with ``lr``); ``total_steps`` is
    the run length in steps, needed for shares of the run (``"2%"``) and for decays whose length
    defaults to the run. ``timeline`` (:class:`keel.timeunits.Timeline`, the trainer's) resolves
    lengths in epochs, tokens and examples to steps, and gives the run length when ``total_steps``
    is not given. Errors are :class:`~keel.errors.KeelError` naming ``<key>.<field>``, the value and
    what is allowed. The result is a function of the step; for ``plateau`` it also has
    ``observe(metric)``, ``state_dict()`` and ``load_state_dict(state)``. See the module docstring.
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)):
        raise KeelError(f"{key}.lr: the optimizer's learning rate {base_lr!r} is not a number")
    lr = check_lr(base_lr, f"{key}.lr")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise KeelError(f"{key}: the run length {total_steps!r} is not allowed; must be a whole number of steps >= 1")
    if timeline is None:
        timeline = Timeline.of_steps(total_steps)
    elif total_steps is not None:
        timeline = timeline.with_duration(Time.steps(total_steps))
    else:
        total_steps = timeline.total_steps
    return _build(spec, key, lr, total_steps, timeline, top=True)


def argument_of(field: str) -> str:
    """The argument a spec field sets, however it is spelled: ``decay`` and ``decay_steps`` are ``decay``."""
    return field.removesuffix("_steps") if isinstance(field, str) else field


def _lookup(name: Any, key: str) -> tuple[str, _Entry]:
    allowed = ", ".join(SCHEDULES)
    if not isinstance(name, str):
        raise KeelError(f"{key}.name: {name!r} is not a schedule name; allowed: {allowed}")
    canonical = _ALIASES.get(name, name)
    if canonical in SCHEDULES:
        return canonical, SCHEDULES[canonical]
    close = difflib.get_close_matches(name, [*SCHEDULES, *_ALIASES], n=1)
    hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ";"
    raise KeelError(f"{key}.name: {name!r} is not a schedule{hint} allowed: {allowed}")


def _real(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-5" as a string
        except ValueError:
            raise KeelError(f"{name}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KeelError(f"{name}: {value!r} is not a number")
    if not math.isfinite(value):
        raise KeelError(f"{name}: {value!r} is not finite")
    return float(value)


def _integer(value: Any, name: str) -> int:
    number = _real(value, name)
    if not number.is_integer():
        raise KeelError(f"{name}: {value!r} is not a whole number")
    return int(number)


def _field_map(
    name: str, parameters: list[str], fields: dict[str, Any], key: str
) -> tuple[dict[str, str], list[str]]:
    """Map each function argument to the spec field that sets it; return it and the generic fields used."""
    field_of: dict[str, str] = {}
    for field in fields:
        argument = field if field in parameters else f"{field}_steps"
        if argument not in parameters or argument == "lr":
            continue
        if argument in field_of:
            raise KeelError(f"{key}.{field}: given twice (as {field_of[argument]!r} and {field!r})")
        field_of[argument] = field
    used = set(field_of.values())
    generic = [f for f in _GENERIC_WARMUP if "warmup_steps" not in parameters and f in fields]
    if name != "wrap":
        generic += [f for f in _GENERIC_WRAP if f in fields and f not in used]
    if name == "plateau" and "schedule" in fields:
        generic.append("schedule")  # the base schedule the plateau rule scales
    unknown = [f for f in fields if f not in used and f not in generic]
    if unknown:
        allowed = {"lr", *_GENERIC_WRAP}
        allowed |= {p[: -len("_steps")] if p.endswith("_steps") and p != "total_steps" else p for p in parameters}
        if "warmup_steps" not in parameters:
            allowed |= set(_GENERIC_WARMUP)
        if name == "plateau":
            allowed.add("schedule")
        allowed = sorted(allowed)
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise KeelError(f"{key}.{unknown[0]}: not a parameter of {name!r}{hint} allowed: {', '.join(allowed)}")
    return field_of, generic


def _convert(argument: str, value: Any, field_name: str, timeline: Timeline) -> Any:
    """Turn a config value into the function argument: lengths to steps, numbers to floats."""
    if argument in _LENGTHS:
        steps = timeline.steps(value, field_name)
        if argument == "decay_steps" and steps == 0 and isinstance(value, str):
            return 1  # a share of a very short run ('20%' of 2 steps) still decays, over its last step
        return steps
    if argument in _LENGTH_LISTS:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise KeelError(f"{field_name}: {value!r} is not a list of lengths; each one is {SYNTAX}")
        return _length_list(value, field_name, timeline)
    if argument in _INTEGERS:
        return _integer(value, field_name)
    if argument in _WORDS or argument in ("schedule", "schedules"):
        return value
    return _real(value, field_name)


def _length_list(value: list | tuple, field_name: str, timeline: Timeline) -> list[int]:
    """A list of lengths (milestones, boundaries) in steps. Where ``timeline`` cannot place them all (a config
    checked before its task is known: ``keel.timeunits.stand_in``), the entries of each unit must increase, and
    1, 2, 3, ... stand in for them; the trainer's timeline checks the steps they come to."""
    times = [parse_time(v, f"{field_name}[{i}]") for i, v in enumerate(value)]
    if not all(timeline.resolves(t) for t in times):
        for unit in {t.unit for t in times}:
            amounts = [t.amount for t in times if t.unit == unit]
            if any(b <= a for a, b in zip(amounts, amounts[1:])):
                raise KeelError(f"{field_name}: {[t.serialize() for t in times]!r} is not allowed; lengths in the "
                                "same unit must be strictly increasing")
        return list(range(1, len(times) + 1))
    steps = [timeline.steps(t, f"{field_name}[{i}]") for i, t in enumerate(times)]
    if any(t.unit != "step" for t in times) and any(b <= a for a, b in zip(steps, steps[1:])):
        raise KeelError(f"{field_name}: {[t.serialize() for t in times]!r} comes to steps {steps} for "
                        f"{timeline.what}, which is not allowed; must be strictly increasing (lengths at least a step "
                        "apart)")
    return steps


_WARMUP_FIELDS = {"steps": "warmup", "init_lr": "warmup_init_lr", "shape": "warmup_shape"}


def _build(
    spec: Any, key: str, lr: float, span: int | None, timeline: Timeline, *, top: bool = False
) -> Callable[[int], float]:
    """Build ``spec``; ``span`` is the number of steps it covers (None if unknown)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise KeelError(
            f"{key}: {spec!r} is not a schedule spec; expected a mapping such as {{name: cosine, warmup: 100}}"
        )
    fields = dict(spec)
    if "name" not in fields:
        raise KeelError(f"{key}.name: missing; every schedule spec needs a name (allowed: {', '.join(SCHEDULES)})")
    name, entry = _lookup(fields.pop("name"), key)
    if "lr" in fields:
        lr = check_lr(_real(fields.pop("lr"), f"{key}.lr"), f"{key}.lr")
    parameters = list(inspect.signature(entry.function).parameters)
    field_of, generic = _field_map(name, parameters, fields, key)
    arguments = {a: _convert(a, fields[f], f"{key}.{f}", timeline) for a, f in field_of.items()}

    # A warmup in front of this schedule, for schedules that do not warm up themselves.
    warmup_options: dict[str, Any] = {}
    if "warmup" in generic:
        warmup_options["steps"] = timeline.steps(fields["warmup"], f"{key}.warmup")
        if span is not None and warmup_options["steps"] >= span:
            where = "the run length" if top else "the length of this part of the run"
            raise KeelError(
                f"{key}.warmup: {fields['warmup']!r} ({warmup_options['steps']} steps) is at or beyond {where} "
                f"({span} steps); the warmup must end before the run does"
            )
    if "warmup_init_lr" in generic:
        warmup_options["init_lr"] = _real(fields["warmup_init_lr"], f"{key}.warmup_init_lr")
    if "warmup_shape" in generic:
        warmup_options["shape"] = fields["warmup_shape"]
    if warmup_options and "steps" not in warmup_options:
        field = next(f for f in generic if f.startswith("warmup_"))
        raise KeelError(f"{key}.{field}: given without warmup; set warmup (its length) too")
    rest = None if span is None else span - warmup_options.get("steps", 0)

    # Defaults that come from the run rather than from the function.
    if "lr" in parameters:
        arguments["lr"] = lr
    if "scale" in parameters and "scale" not in arguments:
        arguments["scale"] = lr
    if "total_steps" in parameters and "total_steps" not in arguments:
        if rest is None:
            raise KeelError(
                f"{key}.total_steps: {name!r} needs its length, and the run length is not known here; "
                f"set total_steps ({SYNTAX}) or the run length"
            )
        arguments["total_steps"] = rest

    # Combinators: build the schedules they contain.
    if name == "join":
        pieces = fields.get("schedules")
        if not isinstance(pieces, list) or not pieces:
            raise KeelError(f"{key}.schedules: {pieces!r} is not allowed; must be a non-empty list of schedule specs")
        if "boundaries" not in arguments:
            raise KeelError(
                f"{key}.boundaries: missing; join needs {len(pieces) - 1} boundaries (where each next schedule starts)"
            )
        boundaries = arguments["boundaries"]
        if len(boundaries) != len(pieces) - 1:
            raise KeelError(
                f"{key}.boundaries: {fields['boundaries']!r} has {len(boundaries)} entries; "
                f"{len(pieces)} schedules need {len(pieces) - 1}"
            )
        starts, ends = [0, *boundaries], [*boundaries, rest]
        spans = [_length(start, end) for start, end in zip(starts, ends)]
        if not all(timeline.resolves(b) for b in fields["boundaries"]):
            spans = [rest] * len(pieces)  # stand-in boundaries: each part is at most the rest of the run
        arguments["schedules"] = [
            _build(piece, f"{key}.schedules[{i}]", lr, spans[i], timeline) for i, piece in enumerate(pieces)
        ]
    elif name in ("warmup", "wrap", "plateau") and "schedule" in fields:
        child_span = rest
        if rest is not None and name == "warmup":
            if arguments.get("steps", 0) >= rest:
                raise KeelError(
                    f"{key}.steps: {fields.get('steps')!r} ({arguments.get('steps', 0)} steps) is at or beyond "
                    f"the length of this part of the run ({rest} steps); the warmup must end before it does"
                )
            child_span = rest - arguments.get("steps", 0)
        elif rest is not None and name == "wrap":
            start, duration = arguments.get("step_start", 0), arguments.get("step_duration", 1)
            child_span = -(-(rest - start) // max(duration, 1)) if rest > start else None
        arguments["schedule"] = _build(fields["schedule"], f"{key}.schedule", lr, child_span, timeline)
    elif name in ("warmup", "wrap"):
        raise KeelError(f"{key}.schedule: missing; {name} needs the schedule it applies to, e.g. {{name: cosine}}")

    if name == "plateau":
        # The plateau rule must be outermost: the warmup goes on its base schedule.
        base = arguments.pop("schedule", None) or decays.constant(lr)
        if warmup_options:
            base = _call(combinators.warmup, key, _WARMUP_FIELDS, schedule=base, **warmup_options)
            warmup_options = {}
        arguments["lr"] = base
        field_of = {**field_of, "lr": "schedule" if "schedule" in fields else "lr"}

    schedule = _call(entry.function, key, field_of, **arguments)
    if warmup_options:
        schedule = _call(combinators.warmup, key, _WARMUP_FIELDS, schedule=schedule, **warmup_options)
    wrap_fields = [f for f in _GENERIC_WRAP if f in generic]
    if wrap_fields:
        wrap_arguments = {f: _convert(f, fields[f], f"{key}.{f}", timeline) for f in wrap_fields}
        schedule = _call(combinators.wrap, key, {}, schedule=schedule, **wrap_arguments)
    return schedule


def _length(start: int, end: int | None) -> int | None:
    return None if end is None or end <= start else end - start


def _call(function: Callable[..., Any], key: str, field_of: Mapping[str, str], **arguments: Any) -> Any:
    """Call a schedule function, naming the config field in any error it raises."""
    missing = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in arguments
    ]
    if missing:
        fields = [m[: -len("_steps")] if m.endswith("_steps") and m != "total_steps" else m for m in missing]
        raise KeelError(f"{key}.{fields[0]}: missing; {function.__name__} needs {', '.join(fields)}")
    try:
        return function(**arguments)
    except KeelError as error:
        head, separator, rest = str(error).partition(":")
        argument = head.split("[", 1)[0]
        field = field_of.get(argument, argument)
        raise KeelError(f"{key}.{field}{head[len(argument):]}{separator}{rest}") from None


def parse_spec(text: str) -> dict[str, Any]:
    """Parse a schedule spec written on the command line.

    Either ``"NAME,KEY=VALUE,..."`` (values read as YAML scalars or flow lists:
    ``"cosine,warmup=2%,min_lr=1e-5"``, ``"multistep,milestones=[300,600]"``) or a YAML/JSON
    mapping (``"{name: join, schedules: [...], boundaries: [100]}"``).
    """
    text = text.strip()
    if not text:
        raise KeelError("schedule: empty spec; write NAME,KEY=VALUE,... such as 'cosine,warmup=100'")
    if text.startswith("{"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise KeelError(f"schedule: {text!r} is not a valid YAML mapping ({str(error).splitlines()[0]})") from None
        if not isinstance(value, dict):
            raise KeelError(f"schedule: {text!r} is not a mapping")
        return value
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    spec: dict[str, Any] = {"name": parts[0].strip()}
    for part in parts[1:]:
        field, equals, value = part.partition("=")
        field = field.strip()
        if not equals or not field:
            raise KeelError(f"schedule: {part.strip()!r} in {text!r} is not KEY=VALUE; write NAME,KEY=VALUE,...")
        if field in spec:
            raise KeelError(f"schedule.{field}: given twice in {text!r}")
        try:
            spec[field] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            spec[field] = value.strip()
    return spec
