"""keel.timeunits.resolve_steps: every unit, rounding, and an error naming the key for each bad input."""

import pytest

from keel.errors import KeelError
from keel.timeunits import resolve_steps


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (500, 500),
        ("500", 500),
        (" 500 ", 500),
        ("1_000", 1000),
        ("1e3", 1000),
        (250.0, 250),
        ("2%", 20),
        ("2.5%", 25),
        ("0%", 0),
        ("100%", 1000),
        ("0.05%", 1),  # 0.5 steps rounds half up
        ("3ep", 150),
        ("0.5ep", 25),
        ("1000tok", 2),  # 1000 / 512 = 1.95
        ("500ktok", 977),
        ("2Mtok", 3906),
        ("1Gtok", 1953125),
        ("1Btok", 1953125),
    ],
)
def test_resolves_every_unit(value, expected):
    got = resolve_steps(value, name="x", total_steps=1000, steps_per_epoch=50, tokens_per_step=512)
    assert got == expected
    assert isinstance(got, int)


def test_units_that_need_no_run_information():
    assert resolve_steps(7, name="x") == 7
    assert resolve_steps("7", name="x") == 7


@pytest.mark.parametrize(
    ("value", "kwargs", "needle"),
    [
        ("2%", {}, "run length is not known"),
        ("3ep", {}, "steps per epoch is not known"),
        ("2Mtok", {}, "tokens per step is not known"),
        ("2Mtok", {"tokens_per_step": 0}, "tokens per step"),
        (-1, {}, "negative"),
        ("-5", {}, "not a length"),
        ("150%", {"total_steps": 10}, "more than the whole run"),
        ("2.5", {}, "whole number of steps"),
        (0.02, {}, "'2%'"),
        (True, {}, "not a length"),
        (None, {}, "not a length"),
        ([1], {}, "not a length"),
        ("abc", {}, "not a length"),
        ("5 epochs", {}, "not a length"),
        ("%", {"total_steps": 10}, "not a length"),
        ("", {}, "not a length"),
        (float("nan"), {}, "not a whole number"),
        ("1e400", {}, "too long"),
        ("1e400ep", {"steps_per_epoch": 50}, "too long"),
        ("1e400tok", {"tokens_per_step": 512}, "too long"),
        ("1e300Ttok", {"tokens_per_step": 1}, "too long"),
        ("1e19", {}, "too long"),
        (2**63, {}, "too long"),
        ("9" * 400, {}, "too long"),
    ],
)
def test_errors_name_the_key_and_the_value(value, kwargs, needle):
    with pytest.raises(KeelError) as error:
        resolve_steps(value, name="schedule.warmup", **kwargs)
    message = str(error.value)
    assert message.startswith("schedule.warmup: ")
    assert needle in message
    assert repr(value) in message or str(value) in message


def test_the_longest_length_is_a_signed_64_bit_step_count():
    from keel.timeunits import MAX_STEPS

    assert resolve_steps(MAX_STEPS, name="x") == MAX_STEPS
    assert resolve_steps("1e18", name="x") == 10**18
    assert resolve_steps("1e6ep", name="x", steps_per_epoch=10**12) == 10**18
