"""Lengths in the units practitioners think in, resolved to optimizer steps in one place.

A length is one of:

=================  ===========================================================
``500`` / "500"    steps (optimizer updates; an int or a string of digits)
"2%" / "2.5%"      a fraction of the run (needs the run length, ``total_steps``)
"3ep" / "0.5ep"    epochs (needs ``steps_per_epoch``)
"2Mtok" / "500ktok" / "1000tok" / "1.5Gtok"
                   tokens (needs ``tokens_per_step``); k = 1e3, M = 1e6, G or B = 1e9,
                   T = 1e12
=================  ===========================================================

Fractions, epochs and tokens are rounded to the nearest step (halves round up).
"""

from __future__ import annotations

import math
import re

from keel.errors import KeelError

__all__ = ["resolve_steps", "SYNTAX", "MAX_STEPS"]

#: The longest length any key may have: what a signed 64-bit step counter holds.
MAX_STEPS = 2**63 - 1

SYNTAX = "steps (500), a fraction of the run ('2%'), epochs ('3ep') or tokens ('2Mtok', '500ktok', '1000tok')"

_PATTERN = re.compile(
    r"^\s*(?P<number>(?:\d+(?:_\d+)*)?(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(?P<unit>%|ep|[kKMGBT]?tok)?\s*$"
)
_TOKEN_MULTIPLIERS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}


def _round(x: float, name: str, value: object) -> int:
    """``x`` steps rounded half up; a length beyond ``MAX_STEPS`` (or infinite) is a KeelError naming ``name``."""
    if not math.isfinite(x) or x + 0.5 > MAX_STEPS:
        raise KeelError(f"{name}: {value!r} is too long; a length must be at most {MAX_STEPS} steps")
    return int(math.floor(x + 0.5))


def resolve_steps(
    value: int | str,
    *,
    name: str,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    tokens_per_step: int | None = None,
) -> int:
    """Resolve a length (steps, ``"2%"``, ``"3ep"``, ``"2Mtok"``) to a whole number of optimizer steps.

    ``name`` is the config key or argument the value came from; every error names it, the value
    given and what is allowed. Raises :class:`~keel.errors.KeelError` for a negative or malformed
    length, and for a fraction, epoch count or token count whose conversion factor is unknown.

    >>> resolve_steps("2%", name="schedule.warmup", total_steps=1000)
    20
    >>> resolve_steps("3ep", name="schedule.warmup", steps_per_epoch=50)
    150
    >>> resolve_steps("1Mtok", name="schedule.warmup", tokens_per_step=4096)
    244
    """
    if isinstance(value, bool):
        raise KeelError(f"{name}: {value!r} is not a length; use {SYNTAX}")
    if isinstance(value, int):
        if value < 0:
            raise KeelError(f"{name}: {value!r} is negative; a length must be >= 0 steps")
        if value > MAX_STEPS:
            raise KeelError(f"{name}: {value!r} is too long; a length must be at most {MAX_STEPS} steps")
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return resolve_steps(int(value), name=name)
        hint = f"; for a fraction of the run write '{value * 100:g}%'" if 0 < value < 1 else ""
        raise KeelError(f"{name}: {value!r} is not a whole number of steps{hint}; use {SYNTAX}")
    if not isinstance(value, str):
        raise KeelError(f"{name}: {value!r} is not a length; use {SYNTAX}")

    match = _PATTERN.match(value)
    number_text = match.group("number") if match else ""
    if not match or not any(c.isdigit() for c in number_text):
        raise KeelError(f"{name}: {value!r} is not a length; use {SYNTAX}")
    number = float(number_text.replace("_", ""))
    unit = match.group("unit") or ""

    if unit == "":
        if math.isfinite(number) and not number.is_integer():
            raise KeelError(f"{name}: {value!r} is not a whole number of steps; use {SYNTAX}")
        return _round(number, name, value)
    if unit == "%":
        if number > 100:
            raise KeelError(f"{name}: {value!r} is more than the whole run; a fraction must be 0% to 100%")
        if total_steps is None:
            raise KeelError(
                f"{name}: {value!r} is a fraction of the run, but the run length is not known here; "
                "give the length in steps, epochs or tokens, or set the run length"
            )
        return _round(number / 100 * total_steps, name, value)
    if unit == "ep":
        if steps_per_epoch is None:
            raise KeelError(
                f"{name}: {value!r} is in epochs, but the number of steps per epoch is not known here; "
                "give the length in steps or as a fraction of the run"
            )
        return _round(number * steps_per_epoch, name, value)
    # tokens
    if tokens_per_step is None:
        raise KeelError(
            f"{name}: {value!r} is in tokens, but the number of tokens per step is not known here; "
            "give the length in steps or as a fraction of the run"
        )
    if tokens_per_step <= 0:
        raise KeelError(f"{name}: cannot convert {value!r} to steps with {tokens_per_step} tokens per step")
    return _round(number * _TOKEN_MULTIPLIERS[unit[0] if len(unit) == 4 else ""] / tokens_per_step, name, value)
