"""Time in the units practitioners think in, parsed once and compared with the trainer's counted clock.

A time (``Time``) is an amount and a unit:

=======================  =================================================================================
``500`` / "500"          steps (optimizer updates; an int or a string of digits)
"3ep" / "0.5ep"          epochs: passes over the task's training data, as the task defines one (its examples,
                         or for a language model its training tokens)
"2Mtok" / "500ktok"      tokens: the target positions the clock counts; k = 1e3, M = 1e6, G or B = 1e9, T = 1e12
"50kex" / "1000ex"       examples (sequences, images), with the same multipliers
"2%" / "0.3dur"          a share of the run: of ``duration`` (or ``max_steps``), in its unit
=======================  =================================================================================

Config keys that hold a length are parsed into a ``Time`` when the config is validated (a pydantic field of type
``Time``), and ``config.yaml`` records them as written. The trainer's ``Clock`` counts steps, and the examples and
tokens of every batch it trained on, summed over ranks; a ``Timeline`` compares a time with it:

- ``Timeline.reached(time, clock)`` / ``crossed(interval, before, after)``: the run stops, evaluates and
  checkpoints by what was counted;
- ``Timeline.steps(time)``: the first step count at which the clock will have reached ``time``, for the units
  that need a length in steps ahead of time (schedules, sequence-length warmup, averaging starts). It is worked
  out from the task's projection of each step's counts (``Task.batch_counts``, transformed by techniques such as
  sequence-length warmup that change them): exact where the task knows its batches in advance (the language
  model, packed or bucketed; examples of map-style datasets), the task's projection otherwise (docs/schedules.md).

A share of the run in steps rounds to the nearest step (halves up); every other unit resolves to the first step
at which the counted amount is reached.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.errors import KeelError

__all__ = ["MAX_RUN_STEPS", "MAX_STEPS", "SYNTAX", "UNITS", "Time", "Timeline", "parse_time", "whole_count"]

#: The longest length any key may have: what a signed 64-bit step counter holds.
MAX_STEPS = 2**63 - 1
#: The longest run: ``max_steps``' bound, and a ``duration`` in any unit once resolved to steps (far above any run
#: this toolkit is for, so an absurd length fails with its key rather than as a hang).
MAX_RUN_STEPS = 10**12

SYNTAX = ("steps (500), epochs ('3ep'), tokens ('2Mtok', '500ktok'), examples ('50kex') or a share of the run "
          "('2%', '0.3dur')")

#: Units and the suffix each is written with (steps have none).
UNITS = {"step": "", "epoch": "ep", "token": "tok", "example": "ex", "fraction": "%"}

_PATTERN = re.compile(
    r"^\s*(?P<number>(?:\d+(?:_\d+)*)?(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*"
    r"(?P<unit>%|dur|ep|(?P<multiplier>[kKMGBT]?)(?:tok|ex))?\s*$"
)
_MULTIPLIERS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}
_COUNTS = ("example", "token")  # what the clock counts besides steps


@dataclass(frozen=True, eq=False)
class Time:
    """An amount of training time: ``amount`` in ``unit`` (``step``, ``epoch``, ``token``, ``example`` or
    ``fraction``, a share in [0, 1] of the run). ``text`` is the spelling it was parsed from (what config.yaml
    records); two times are equal when amount and unit are, and a time equals a spelling of it (``'10%'``)."""

    amount: float
    unit: str
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r}; allowed: {', '.join(UNITS)}")

    @classmethod
    def parse(cls, value: Any, key: str = "") -> Time:
        """``value`` (an int, or a string such as ``'3ep'``) as a ``Time``; a KeelError naming ``key``, the value
        and what is allowed otherwise."""
        return parse_time(value, key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, int)) and not isinstance(other, bool):
            try:
                other = parse_time(other)
            except KeelError:
                return False
        if not isinstance(other, Time):
            return NotImplemented
        return (self.amount, self.unit) == (other.amount, other.unit)

    def __hash__(self) -> int:
        return hash((self.amount, self.unit))

    @classmethod
    def steps(cls, n: int) -> Time:
        return cls(n, "step", str(n))

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.unit == "step":
            return str(int(self.amount))
        if self.unit == "fraction":
            return f"{self.amount * 100:g}%"
        return f"{self.amount:g}{UNITS[self.unit]}"

    def __repr__(self) -> str:
        return repr(self.serialize())

    def serialize(self) -> int | str:
        """What config.yaml records: steps as an int, other units as written."""
        return int(self.amount) if self.unit == "step" else str(self)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        def validate(value: Any) -> Time:
            try:
                return value if isinstance(value, Time) else parse_time(value, "")
            except KeelError as error:
                raise ValueError(str(error).removeprefix(": ")) from None

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda t: t.serialize()),
            json_schema_input_schema=core_schema.union_schema([core_schema.int_schema(), core_schema.str_schema()]))


def _too_long(key: str, value: Any) -> KeelError:
    return KeelError(f"{key}: {value!r} is too long; a length must be at most {MAX_STEPS} steps")


def parse_time(value: Any, key: str = "") -> Time:
    """Parse a length (``500``, ``"2%"``, ``"3ep"``, ``"2Mtok"``, ``"50kex"``, ``"0.3dur"``) into a ``Time``.

    >>> parse_time("2Mtok", "duration")
    '2Mtok'
    >>> parse_time("30%", "seq_warmup.duration").amount
    0.3
    """
    if isinstance(value, Time):
        return value
    if isinstance(value, bool):
        raise KeelError(f"{key}: {value!r} is not a length; allowed: {SYNTAX}")
    if isinstance(value, int):
        if value < 0:
            raise KeelError(f"{key}: {value!r} is negative; allowed: a length >= 0 ({SYNTAX})")
        if value > MAX_STEPS:
            raise _too_long(key, value)
        return Time(value, "step", str(value))
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            if value > MAX_STEPS:
                raise _too_long(key, value)
            return parse_time(int(value), key)
        hint = f"; for a share of the run write '{value * 100:g}%'" if 0 < value < 1 else ""
        raise KeelError(f"{key}: {value!r} is not a whole number of steps{hint}; allowed: {SYNTAX}")
    if not isinstance(value, str):
        raise KeelError(f"{key}: {value!r} is not a length; allowed: {SYNTAX}")
    match = _PATTERN.match(value)
    number_text = match.group("number") if match else ""
    if not match or not any(c.isdigit() for c in number_text):
        raise KeelError(f"{key}: {value!r} is not a length; allowed: {SYNTAX}")
    number = float(number_text.replace("_", ""))
    suffix = match.group("unit") or ""
    text = value.strip()
    if not math.isfinite(number):
        raise _too_long(key, value)
    if suffix == "":
        if not number.is_integer():
            raise KeelError(f"{key}: {value!r} is not a whole number of steps; allowed: {SYNTAX}")
        if number > MAX_STEPS:
            raise _too_long(key, value)
        return Time(int(number), "step", text)
    if suffix in ("%", "dur"):
        share = number / 100 if suffix == "%" else number
        if share > 1:
            raise KeelError(f"{key}: {value!r} is more than the whole run; allowed: a share from 0% to 100% "
                            "(0dur to 1dur)")
        return Time(share, "fraction", text)
    if suffix == "ep":
        if number * 1.0 > MAX_STEPS:
            raise _too_long(key, value)
        return Time(number, "epoch", text)
    amount = number * _MULTIPLIERS[match.group("multiplier")]
    if not math.isfinite(amount) or amount > 1e30:
        raise _too_long(key, value)
    return Time(amount, "token" if suffix.endswith("tok") else "example", text)


def round_steps(x: float, key: str, value: Any) -> int:
    """``x`` steps rounded half up; beyond ``MAX_STEPS`` (or infinite) a KeelError naming ``key``."""
    if isinstance(x, int) and 0 <= x <= MAX_STEPS:
        return x
    if not math.isfinite(x) or x + 0.5 > MAX_STEPS:
        raise _too_long(key, value)
    return int(math.floor(x + 0.5))


StepCounts = Callable[[int], tuple[float, float]]
#: ``(step, (examples, tokens)) -> (examples, tokens)``: how a technique changes the counts of a step.
CountTransform = Callable[[int, tuple[float, float]], tuple[float, float]]


class Timeline:
    """The run's time: its ``duration``, the task's epoch, and the projected counts of every step.

    ``step_counts(step)`` -> (examples, tokens) step ``step`` is projected to count over all ranks and
    micro-batches; ``known``: which of ``example`` and ``token`` it projects (none without ``step_counts``: lengths
    in those units, and epochs in them, cannot be resolved ahead of time). ``steady_from``: the step from which the
    counts no longer change (None: they may change at every step). ``epoch``: one epoch as the clock counts it (a
    ``Time`` in examples, tokens or steps; None: the task has no epochs). Techniques that change the counts add a
    transform (``add_transform``). ``given_by``: where a count this timeline lacks (``epoch``, ``token``,
    ``example``) can be given, named in its errors (``of_steps``: a timeline with rates; ``keel schedule``: its
    options); without it, an error says that ``what`` has no epoch.
    """

    given_by: dict[str, str] = {}

    def __init__(self, duration: Time, step_counts: StepCounts | None = None, *, steady_from: int | None = 0,
                 epoch: Time | None = None, known: Sequence[str] = _COUNTS, what: str = "the run"):
        if duration.unit == "fraction":
            raise KeelError(f"duration: {duration!r} is a share of the run itself; allowed: steps, epochs, tokens or "
                            "examples")
        self.duration, self.epoch, self.what = duration, epoch, what
        self._step_counts, self._steady_from = step_counts, steady_from
        self._known = set(known) if step_counts is not None else set()
        self._transforms: list[tuple[CountTransform, int]] = []
        self._cumulative: list[tuple[float, float]] = [(0.0, 0.0)]

    # ---- constructors for unit-level use (a plain loop, ``keel schedule``) ---------------------------------------
    @classmethod
    def of_steps(cls, total_steps: int | None = None) -> Timeline:
        """Steps only: lengths in steps, and shares of a run of ``total_steps`` (None: unknown)."""
        timeline = _UnknownLength() if total_steps is None else cls(Time.steps(total_steps))
        timeline.given_by = dict(_RATE_ARGUMENTS)
        return timeline

    @classmethod
    def at_rate(cls, total_steps: int | None, *, examples_per_step: float | None = None,
                tokens_per_step: float | None = None, steps_per_epoch: float | None = None,
                given_by: dict[str, str] | None = None) -> Timeline:
        """A run of ``total_steps`` whose every step counts the examples and tokens given (what a user assumes for
        a preview, e.g. ``keel schedule --tokens-per-step``); an epoch of ``steps_per_epoch`` steps. ``given_by``:
        what errors tell the user to give for an unknown count (an option of a command; default: nothing, and
        an epoch-less timeline says that ``what`` has no epoch)."""
        known = [unit for unit, rate in zip(_COUNTS, (examples_per_step, tokens_per_step)) if rate is not None]
        rates = (examples_per_step or 0.0, tokens_per_step or 0.0)
        epoch = None if steps_per_epoch is None else Time(steps_per_epoch, "step")
        timeline = cls.of_steps(total_steps)
        timeline.epoch, timeline.what = epoch, "the given rates"
        timeline.given_by = dict(given_by or {})
        if known:
            timeline._step_counts, timeline._known = (lambda step: rates), set(known)
        return timeline

    def with_duration(self, duration: Time) -> Timeline:
        """This timeline for a run of another length (the same counts and epoch)."""
        other = copy.copy(self)
        other.duration = duration
        return other

    # ---- projection --------------------------------------------------------------------------------------------
    def add_transform(self, transform: CountTransform, until: int) -> None:
        """A technique changes the counts of the steps before ``until`` (sequence-length warmup truncating rows)."""
        self._transforms.append((transform, until))
        self._cumulative = [(0.0, 0.0)]

    def counts(self, step: int) -> tuple[float, float]:
        """(examples, tokens) step ``step`` is projected to count."""
        counts = self._step_counts(step)
        for transform, until in self._transforms:
            if step < until:
                counts = transform(step, counts)
        return counts

    def projected(self, steps: int) -> tuple[float, float]:
        """(examples, tokens) the clock is projected to have counted after ``steps`` steps."""
        self._extend(steps)
        if steps < len(self._cumulative):
            return self._cumulative[steps]
        last = len(self._cumulative) - 1  # steady from here: the rest is linear
        e, t = self.counts(last)
        base = self._cumulative[last]
        return base[0] + (steps - last) * e, base[1] + (steps - last) * t

    def steady_step(self) -> int | None:
        """The step from which every step counts the same (after any curriculum); None when steps vary all run."""
        if self._steady_from is None:
            return None
        return max([self._steady_from, *(until for _, until in self._transforms)])

    def _extend(self, steps: int, key: str = "duration", value: Any = None) -> None:
        """Project the counts of the steps up to ``steps`` one by one; ``key`` and ``value``: the length that needs
        them, named if it needs more than ``_MAX_PROJECTED``."""
        steady = self.steady_step()
        target = steps if steady is None else min(steps, steady)
        cumulative = self._cumulative
        while len(cumulative) <= target:
            if len(cumulative) > _MAX_PROJECTED:
                shown = repr(value) if value is not None else f"a length of {steps:,} steps"
                raise KeelError(f"{key}: {shown} lies beyond the first {_MAX_PROJECTED:,} steps, which are as far "
                                f"as the counts of {self.what} are projected step by step; allowed: a shorter length, "
                                "or a length in steps")
            e, t = self.counts(len(cumulative) - 1)
            last = cumulative[-1]
            cumulative.append((last[0] + e, last[1] + t))

    # ---- times -------------------------------------------------------------------------------------------------
    def amount(self, time: Time, key: str) -> tuple[str, float]:
        """``time`` in what the clock counts: ``("step" | "example" | "token", amount)``."""
        if time.unit == "fraction":
            unit, whole = self.amount(self.duration, "duration")
            return unit, time.amount * whole
        if time.unit == "epoch":
            if self.epoch is None and "epoch" in self.given_by:
                raise KeelError(f"{key}: {time!r} is in epochs, but the steps per epoch are not known here; allowed: "
                                f"steps, tokens, examples or a share of the run, or give {self.given_by['epoch']}")
            if self.epoch is None:  # e.g. a task whose batches come from a function, a loader without a length
                raise KeelError(f"{key}: {time!r} is in epochs, but {self.what} has no epoch; allowed: steps, tokens, "
                                "examples or a share of the run")
            unit, size = self.amount(self.epoch, "epoch")
            return unit, time.amount * size
        return time.unit, time.amount

    def steps(self, time: Time | int | str, key: str) -> int:
        """The first step count at which the clock is projected to have reached ``time`` (a share of a run in
        steps: rounded to the nearest step, halves up)."""
        time = parse_time(time, key)
        unit, amount = self.amount(time, key)
        if unit == "step":
            return round_steps(amount, key, str(time))
        if unit not in self._known:
            give = self.given_by.get(unit, "the counts per step")
            raise KeelError(f"{key}: {time!r} is in {unit}s, but the {unit}s per step are not known here; allowed: a "
                            f"length in steps or a share of the run (or give {give})")
        index, target = _COUNTS.index(unit), whole_count(amount)
        if target <= 0:
            return 0
        steady = self.steady_step()
        self._extend(len(self._cumulative) if steady is None else steady, key, time)
        cumulative = self._cumulative
        while steady is None and cumulative[-1][index] < target:  # counts may change at every step
            self._extend(2 * len(cumulative), key, time)
        if cumulative[-1][index] >= target:  # within the steps projected one by one: bisect
            low, high = 0, len(cumulative) - 1
            while low < high:
                middle = (low + high) // 2
                low, high = (middle + 1, high) if cumulative[middle][index] < target else (low, middle)
            return low
        per_step = self.counts(steady)[index]
        if not per_step > 0:
            raise KeelError(f"{key}: {time!r} is never reached: {self.what} counts {per_step:g} {unit}s a step; "
                            "allowed: a length in steps")
        last = len(cumulative) - 1
        remaining = (target - cumulative[last][index]) / per_step
        if not remaining < MAX_STEPS:  # also infinite (a tiny count per step): math.ceil would overflow
            raise _too_long(key, str(time))
        steps = last + math.ceil(remaining - 1e-9)
        if steps > MAX_STEPS:
            raise _too_long(key, str(time))
        return steps

    def resolves(self, time: Time | int | str) -> bool:
        """Whether ``steps(time)`` is the step the run will reach ``time`` at (or an error saying why it cannot be
        known); False only on a config-time stand-in (``stand_in``) for lengths that need the task's counts."""
        return True

    @property
    def total_steps(self) -> int:
        """The run's projected length in steps; a duration in epochs, tokens or examples that comes to more than
        ``MAX_RUN_STEPS`` steps is a KeelError, as ``max_steps`` beyond it is."""
        steps = self.steps(self.duration, "duration")
        if self.duration.unit != "step" and steps > MAX_RUN_STEPS:
            raise KeelError(f"duration: {self.duration!r} is {steps:,} steps for {self.what}; allowed: a run of at "
                            f"most {MAX_RUN_STEPS:.0e} steps, as for max_steps")
        return steps

    @staticmethod
    def elapsed(clock: Any, unit: str) -> float:
        """What ``clock`` (``step``, ``examples``, ``tokens``) has counted in ``unit``."""
        return getattr(clock, {"step": "step", "example": "examples", "token": "tokens"}[unit])

    def reached(self, time: Time, clock: Any, key: str = "duration") -> bool:
        """Whether the counted ``clock`` has reached ``time``."""
        unit, amount = self.amount(time, key)
        if unit == "step":
            return clock.step >= round_steps(amount, key, str(time))
        return self.elapsed(clock, unit) >= whole_count(amount)

    def crossed(self, interval: Time, before: Any, after: Any, key: str) -> bool:
        """Whether the counted clock passed a multiple of ``interval`` from ``before`` to ``after`` (one step; for
        an interval in steps, ``step % interval == 0``)."""
        unit, amount = self.amount(interval, key)
        if unit == "step":
            amount = round_steps(amount, key, str(interval))
        if amount <= 0:
            return True
        start, end = self.elapsed(before, unit), self.elapsed(after, unit)
        return math.floor(end / amount + 1e-9) > math.floor(start / amount + 1e-9)


_MAX_PROJECTED = 10**7
#: What ``of_steps``' errors tell the user to give for a count it lacks: a timeline with rates (``at_rate``).
_RATE_ARGUMENTS = {unit: f"Timeline.at_rate({rate}=...)" for unit, rate in
                   (("epoch", "steps_per_epoch"), ("token", "tokens_per_step"), ("example", "examples_per_step"))}


def whole_count(amount: float) -> int:
    """A count the clock must reach: the amount rounded up, forgiving float noise (0.3 * 5e7 is 15000000.000000002):
    an amount within a relative 1e-9 of a whole number is that number (so 2e12 stays 2e12, not 1999999998000)."""
    nearest = round(amount)
    if abs(amount - nearest) <= 1e-9 * max(1.0, abs(amount)):
        return nearest
    return math.ceil(amount)


class _UnknownLength(Timeline):
    """Steps only, without a run length: shares of the run cannot be resolved."""

    def __init__(self) -> None:
        super().__init__(Time.steps(0), None)

    def amount(self, time: Time, key: str) -> tuple[str, float]:
        if time.unit == "fraction":
            raise KeelError(f"{key}: {time!r} is a fraction of the run, but the run length is not known here; allowed: "
                            "a length in steps, or set the run length")
        return super().amount(time, key)

    @property
    def total_steps(self) -> int | None:
        return None  # unknown: what needs it says so


def stand_in(duration: Time) -> Timeline:
    """A timeline for checking a config before its task is built (``resolves`` says which lengths it knows).

    Exact: steps, lengths of 0, and shares of a run given in steps. Every other length needs the task's counts: it
    stands in as 1 step (what any length > 0 comes to at least), a run of unknown length as one of
    ``MAX_RUN_STEPS``, so only what the config alone decides can fail (syntax, sign); whatever depends on where
    such a length falls (the order of a list of them, a warmup against the run) is checked on the trainer's
    timeline, once the task is known."""
    return _StandIn(duration)


class _StandIn(Timeline):
    def __init__(self, duration: Time) -> None:
        super().__init__(duration, None, what="the run")

    def resolves(self, time: Time | int | str) -> bool:
        time = parse_time(time)
        return (time.unit == "step" or time.amount == 0
                or (time.unit == "fraction" and self.duration.unit == "step"))

    def steps(self, time: Time | int | str, key: str) -> int:
        time = parse_time(time, key)
        if time.amount == 0:
            return 0
        return super().steps(time, key) if self.resolves(time) else 1

    @property
    def total_steps(self) -> int:
        return int(self.duration.amount) if self.duration.unit == "step" else MAX_RUN_STEPS
