"""keel.timeunits: a length parsed once into a typed Time, resolved against a run's timeline (its projected counts)
and compared with a counted clock; every bad input is an error naming the key."""

from types import SimpleNamespace

import pytest

from keel.errors import KeelError
from keel.timeunits import MAX_STEPS, Time, Timeline, parse_time


@pytest.mark.parametrize(
    ("value", "amount", "unit"),
    [
        (0, 0, "step"),
        (500, 500, "step"),
        ("500", 500, "step"),
        (" 500 ", 500, "step"),
        ("1_000", 1000, "step"),
        ("1e3", 1000, "step"),
        (250.0, 250, "step"),
        ("2%", 0.02, "fraction"),
        ("0.3dur", 0.3, "fraction"),
        ("3ep", 3, "epoch"),
        ("0.5ep", 0.5, "epoch"),
        ("1000tok", 1000, "token"),
        ("500ktok", 500_000, "token"),
        ("2Mtok", 2_000_000, "token"),
        ("1.5Gtok", 1.5e9, "token"),
        ("1Btok", 1e9, "token"),
        ("50kex", 50_000, "example"),
        ("1000ex", 1000, "example"),
    ],
)
def test_parses_every_unit_and_keeps_its_spelling(value, amount, unit):
    time = parse_time(value, "x")
    assert (time.amount, time.unit) == (pytest.approx(amount), unit)
    assert time.serialize() == (int(amount) if unit == "step" else str(value).strip())
    assert parse_time(time.serialize(), "x") == time


@pytest.mark.parametrize(
    ("value", "steps"),
    [(0, 0), ("500", 500), ("2%", 20), ("2.5%", 25), ("0.05%", 1), ("100%", 1000), ("0.3dur", 300),
     ("3ep", 150), ("0.5ep", 25), ("1000tok", 2), ("500ktok", 977), ("2Mtok", 3907), ("1Gtok", 1953125),
     ("1000ex", 125), ("50kex", 6250)],
)
def test_resolves_to_the_first_step_at_which_the_clock_reaches_it(value, steps):
    """512 tokens and 8 examples a step, 50 steps an epoch: a count resolves to the first step that reaches it
    (2Mtok: 3906.25 steps -> 3907), a share of a run in steps to the nearest step (halves up)."""
    timeline = Timeline(Time.steps(1000), lambda step: (8, 512), epoch=Time(400, "example"))
    assert timeline.steps(value, "x") == steps
    unit, amount = timeline.amount(parse_time(value), "x")
    counted = {"step": steps, "example": 8 * steps, "token": 512 * steps}[unit]
    if unit != "step" and steps:
        assert counted >= amount > counted - {"example": 8, "token": 512}[unit]


def test_counts_that_change_from_step_to_step_are_summed():
    """Tokens of step t: 100 * (t + 1). The clock reaches 1000 tokens after 4 steps (100+200+300+400)."""
    timeline = Timeline(Time.parse("1000tok"), lambda step: (1, 100 * (step + 1)), steady_from=None)
    assert timeline.total_steps == 4
    assert timeline.steps("999tok", "x") == 4 and timeline.steps("1001tok", "x") == 5
    assert timeline.projected(4) == (4, 1000)


def test_a_transform_changes_the_counts_before_its_end():
    """A technique that halves the tokens of the first 10 steps: 1000 tokens a step after."""
    timeline = Timeline(Time.parse("20ktok"), lambda step: (1, 1000))
    timeline.add_transform(lambda step, counts: (counts[0], counts[1] / 2), until=10)
    assert timeline.projected(10) == (10, 5000)
    assert timeline.total_steps == 25  # 5000 in the first 10 steps, then 15 steps of 1000


def test_shares_of_a_run_in_tokens_are_tokens():
    timeline = Timeline(Time.parse("10ktok"), lambda step: (1, 100 * (step + 1)), steady_from=None)
    unit, amount = timeline.amount(parse_time("30%"), "x")
    assert (unit, amount) == ("token", pytest.approx(3000))
    assert timeline.steps("30%", "x") == 8  # 2800 tokens after 7 steps, 3600 after 8


def test_the_counted_clock_decides_reached_and_crossed():
    timeline = Timeline(Time.parse("1000tok"), lambda step: (1, 300), epoch=Time(600, "token"))
    clock = SimpleNamespace(step=3, examples=3, tokens=900)
    assert not timeline.reached(timeline.duration, clock)
    assert timeline.reached(timeline.duration, SimpleNamespace(step=4, examples=4, tokens=1000))
    before, after = SimpleNamespace(step=1, examples=1, tokens=500), SimpleNamespace(step=2, examples=2, tokens=800)
    assert timeline.crossed(parse_time("1ep"), before, after, "eval_interval")  # passed 600 tokens
    assert not timeline.crossed(parse_time("1ep"), after, clock, "eval_interval")  # 800 -> 900
    steps = [s for s in range(1, 30) if timeline.crossed(parse_time(7), SimpleNamespace(step=s - 1),
                                                         SimpleNamespace(step=s), "x")]
    assert steps == [7, 14, 21, 28]  # in steps: step % 7 == 0


def test_unit_level_timelines():
    assert Timeline.of_steps(200).steps("10%", "x") == 20
    assert Timeline.at_rate(1000, tokens_per_step=10_000).steps("1Mtok", "x") == 100
    assert Timeline.at_rate(1000, steps_per_epoch=7.5).steps("2ep", "x") == 15


@pytest.mark.parametrize(
    ("value", "timeline", "needle"),
    [
        ("2%", Timeline.of_steps(), "fraction of the run, but the run length is not known"),
        ("3ep", Timeline.of_steps(100), "is in epochs, but the steps per epoch are not known here; allowed: "
         "steps, tokens, examples or a share of the run, or give Timeline.at_rate(steps_per_epoch=...)"),
        ("2Mtok", Timeline.of_steps(100), "is in tokens, but the tokens per step are not known"),
        ("2kex", Timeline.at_rate(100, tokens_per_step=5), "is in examples, but the examples per step are not known"),
        ("2Mtok", Timeline(Time.steps(9), lambda step: (1, 0)), "is never reached"),
        (-1, Timeline.of_steps(), "negative"),
        ("-5", Timeline.of_steps(), "not a length"),
        ("150%", Timeline.of_steps(10), "more than the whole run"),
        ("2.5", Timeline.of_steps(), "whole number of steps"),
        (0.02, Timeline.of_steps(), "'2%'"),
        (True, Timeline.of_steps(), "not a length"),
        (None, Timeline.of_steps(), "not a length"),
        ([1], Timeline.of_steps(), "not a length"),
        ("abc", Timeline.of_steps(), "not a length"),
        ("5 epochs", Timeline.of_steps(), "not a length"),
        ("%", Timeline.of_steps(10), "not a length"),
        ("", Timeline.of_steps(), "not a length"),
        (float("nan"), Timeline.of_steps(), "not a whole number"),
        ("1e400", Timeline.of_steps(), "too long"),
        ("1e400ep", Timeline.at_rate(10, steps_per_epoch=50), "too long"),
        ("1e400tok", Timeline.at_rate(10, tokens_per_step=512), "too long"),
        ("1e300Ttok", Timeline.at_rate(10, tokens_per_step=1), "too long"),
        ("1e19", Timeline.of_steps(), "too long"),
        (2**63, Timeline.of_steps(), "too long"),
        ("9" * 400, Timeline.of_steps(), "too long"),
    ],
)
def test_errors_name_the_key_and_the_value(value, timeline, needle):
    with pytest.raises(KeelError) as error:
        timeline.steps(value, "schedule.warmup")
    message = str(error.value)
    assert message.startswith("schedule.warmup: ")
    assert needle in message
    assert repr(value) in message or str(value) in message


def test_the_longest_length_is_a_signed_64_bit_step_count():
    timeline = Timeline.of_steps()
    assert timeline.steps(MAX_STEPS, "x") == MAX_STEPS
    assert timeline.steps("1e18", "x") == 10**18
    assert Timeline.at_rate(1, steps_per_epoch=10**12).steps("1e6ep", "x") == 10**18


def test_a_duration_cannot_be_a_share_of_itself():
    with pytest.raises(KeelError, match="duration: '30%' is a share of the run itself"):
        Timeline(parse_time("30%"))


def test_a_length_needing_many_projected_steps_names_its_key(monkeypatch):
    """Counts that change at every step are projected one step at a time up to a bound: past it, the error names
    the key and the length that needed more."""
    monkeypatch.setattr("keel.timeunits._MAX_PROJECTED", 100)
    timeline = Timeline(Time.steps(10), lambda step: (1, 1), steady_from=None, what="task 'x'")
    with pytest.raises(KeelError, match=r"^schedule\.warmup: '1kex' lies beyond the first 100 steps"):
        timeline.steps("1kex", "schedule.warmup")


def test_a_tiny_count_per_step_is_too_long_not_an_overflow():
    with pytest.raises(KeelError, match=r"^x: '1e30ex' is too long"):
        Timeline.at_rate(100, examples_per_step=1e-300).steps("1e30ex", "x")


def test_a_duration_in_counts_is_held_to_the_run_length_bound():
    """max_steps is at most MAX_RUN_STEPS; so is a duration in examples, tokens or epochs once resolved."""
    from keel.timeunits import MAX_RUN_STEPS

    timeline = Timeline(parse_time("1e14ex"), lambda step: (32, 0), what="task 'digits'")
    with pytest.raises(KeelError, match=r"^duration: '1e14ex' is 3,12\d,\d{3},\d{3},\d{3} steps for task 'digits'; "
                                        r"allowed: a run of at most 1e\+12 steps"):
        timeline.total_steps
    assert Timeline(parse_time(f"{MAX_RUN_STEPS}ex"), lambda step: (1, 0)).total_steps == MAX_RUN_STEPS


def test_the_config_time_stand_in_knows_which_lengths_it_resolves():
    from keel.timeunits import stand_in

    in_steps, in_epochs = stand_in(Time.steps(200)), stand_in(parse_time("3ep"))
    assert in_steps.resolves(50) and in_steps.resolves("10%") and in_steps.steps("10%", "x") == 20
    assert not in_steps.resolves("1ep") and in_steps.steps("1ep", "x") == 1  # at least one step
    assert not in_epochs.resolves("10%") and in_epochs.resolves("0ex") and in_epochs.steps("0ex", "x") == 0
    assert Timeline.of_steps(10).resolves("1ep")  # every other timeline resolves what it can, or says why not


def test_a_whole_count_is_exact_at_any_size_and_forgives_float_noise():
    from keel.timeunits import whole_count

    assert whole_count(0.3 * 5e7) == 15_000_000 and whole_count(100.5) == 101 and whole_count(0) == 0
    assert whole_count(2e12) == 2 * 10**12 and whole_count(1e15 + 0.5) == 10**15  # not a thousand short
