"""from_config: every registered schedule builds from the run config; defaults, time units, errors; resume."""

import io
import math

import pytest
import torch

from keel.errors import KeelError
from keel.timeunits import Timeline
from keel.schedules import (
    SCHEDULES,
    cosine_decay,
    from_config,
    join,
    linear_decay,
    noam,
    parse_spec,
    set_lr,
    warmup,
    wrap,
    wsd,
)

# One spec per registered name; the conformance test below fails when a new schedule lacks one.
EXAMPLES = {
    "constant": {"name": "constant"},
    "step": {"name": "step", "rate": 0.5, "interval": "10%"},
    "multistep": {"name": "multistep", "milestones": ["30%", "60%", "90%"]},
    "exponential": {"name": "exponential", "rate": 0.99},
    "linear": {"name": "linear", "warmup": 10, "end_lr": 1e-5},
    "cosine": {"name": "cosine", "warmup": "2%", "min_lr": 1e-5},
    "sqrt": {"name": "sqrt"},
    "polynomial": {"name": "polynomial", "power": 2, "end_lr": "1e-6"},
    "inverse_sqrt": {"name": "inverse_sqrt", "warmup": 40},
    "noam": {"name": "noam", "model_dim": 512, "warmup": 40, "scale": 2},
    "rsqrt": {"name": "rsqrt", "warmup": 40, "scale": 0.01},
    "wsd": {"name": "wsd", "warmup": "5%", "decay": "20%", "shape": "1-sqrt"},
    "cosine_restarts": {"name": "cosine_restarts", "period": 50, "period_mult": 2, "decay": 0.8},
    "plateau": {"name": "plateau", "warmup": 10, "patience": 2, "factor": 0.5},
    "warmup": {"name": "warmup", "steps": 20, "schedule": {"name": "cosine"}},
    "join": {"name": "join", "schedules": ["constant", {"name": "linear", "end_lr": 0}], "boundaries": ["50%"]},
    "wrap": {"name": "wrap", "schedule": {"name": "noam", "model_dim": 4, "warmup": 10}, "minimum": 1e-4},
}
RUN = 400


def test_every_registered_schedule_has_an_example():
    assert set(EXAMPLES) == set(SCHEDULES)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_finite_non_negative_and_saveable(name):
    schedule = from_config(EXAMPLES[name], base_lr=1e-3, total_steps=RUN)
    xs = [schedule(t) for t in range(RUN + 50)]
    assert all(isinstance(x, float) and math.isfinite(x) and x >= 0 for x in xs)
    assert max(xs) > 0
    assert repr(schedule)
    if hasattr(schedule, "state_dict"):
        for metric in (1.0, 1.0, 1.0, 1.0):
            schedule.observe(metric)
        buffer = io.BytesIO()
        torch.save(schedule.state_dict(), buffer)
        buffer.seek(0)
        fresh = from_config(EXAMPLES[name], base_lr=1e-3, total_steps=RUN)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert [fresh(t) for t in range(RUN)] == [schedule(t) for t in range(RUN)]


def test_default_trainer_spec_warms_up_then_cosines_over_the_rest():
    f = from_config({"name": "cosine", "warmup": 100, "min_lr": 1e-5}, base_lr=3e-4, total_steps=1000)
    expected = warmup(cosine_decay(3e-4, 900, min_lr=1e-5), 100)
    assert [f(t) for t in range(1100)] == [expected(t) for t in range(1100)]
    assert f(0) == 0.0 and f(50) == pytest.approx(1.5e-4) and f(100) == 3e-4
    assert f(550) == pytest.approx((3e-4 + 1e-5) / 2) and f(1000) == 1e-5 and f(5000) == 1e-5


def test_time_units_and_fraction_of_run():
    spec = {"name": "cosine", "warmup": "2%", "total_steps": "3ep"}
    f = from_config(spec, base_lr=1.0, timeline=Timeline.at_rate(1000, steps_per_epoch=100))
    g = warmup(cosine_decay(1.0, 300), 20)
    assert [f(t) for t in range(0, 1000, 7)] == [g(t) for t in range(0, 1000, 7)]
    h = from_config({"name": "linear", "warmup": "1Mtok"}, base_lr=1.0,
                    timeline=Timeline.at_rate(1000, tokens_per_step=10_000))
    assert h(100) == 1.0 and h(99) < 1.0


def test_spec_lr_overrides_base_lr_and_scale_defaults_to_lr():
    assert from_config({"name": "constant", "lr": "1e-4"}, base_lr=1.0)(0) == 1e-4
    f = from_config({"name": "noam", "model_dim": 4, "warmup": 8000}, base_lr=2.0)
    assert f(1) == noam(2.0, 4, 8000)(1)


def test_opennmt_wrapper_keys_on_any_schedule():
    spec = {"name": "noam", "model_dim": 4, "warmup": 8000, "scale": 2, "minimum": 1e-4}
    f = from_config(spec, base_lr=1.0)
    assert f(1) == 1e-4
    g = from_config({**spec, "step_start": 100, "step_duration": 3, "minimum": 0}, base_lr=1.0)
    ref = wrap(noam(2.0, 4, 8000), step_start=100, step_duration=3)
    assert [g(t) for t in range(0, 30000, 101)] == [ref(t) for t in range(0, 30000, 101)]


def test_wsd_from_config_matches_function():
    f = from_config({"name": "wsd", "warmup": "5%", "decay": "20%", "min_lr": 1e-5}, base_lr=1e-3, total_steps=1000)
    g = wsd(1e-3, 1000, decay_steps=200, warmup_steps=50, min_lr=1e-5)
    assert [f(t) for t in range(1001)] == [g(t) for t in range(1001)]


def test_join_pieces_default_to_their_segment():
    spec = {"name": "join", "boundaries": [100, "50%"],
            "schedules": [{"name": "linear", "lr": 1e-4, "end_lr": 1e-3}, "constant", {"name": "cosine"}]}
    f = from_config(spec, base_lr=1e-3, total_steps=1000)
    g = join([linear_decay(1e-4, 100, end_lr=1e-3), linear_decay(1e-3, 400, 1e-3), cosine_decay(1e-3, 500)], [100, 500])
    assert [f(t) for t in range(1001)] == pytest.approx([g(t) for t in range(1001)], rel=1e-15)
    assert f(1000) == 0.0


def test_generic_warmup_options():
    f = from_config({"name": "cosine", "warmup": 10, "warmup_init_lr": 1e-6, "warmup_shape": "exponential"},
                    base_lr=1e-3, total_steps=100)
    assert f(0) == 1e-6 and f(5) == pytest.approx(math.sqrt(1e-6 * 1e-3)) and f(10) == 1e-3


def test_plateau_from_config_observes_and_resumes():
    f = from_config({"name": "plateau", "patience": 0, "factor": 0.5, "min_lr": 1e-4}, base_lr=1e-3)
    assert f(0) == 1e-3
    f.observe(1.0)
    f.observe(1.0)
    assert f(10) == 5e-4
    for _ in range(10):
        f.observe(1.0)
    assert f(20) == 1e-4


@pytest.mark.parametrize(
    ("spec", "total", "needle"),
    [
        ({"name": "cosin"}, 100, "schedule.name: 'cosin' is not a schedule; did you mean 'cosine'? allowed: constant"),
        ({"name": "cosine_decay_x"}, 100, "did you mean 'cosine'"),
        ({"name": 3}, 100, "schedule.name: 3 is not a schedule name"),
        ({"warmup": 10}, 100, "schedule.name: missing"),
        ("", 100, "schedule.name: '' is not a schedule"),
        (["cosine"], 100, "is not a schedule spec"),
        ({"name": "cosine", "min_lrr": 0.1}, 100, "schedule.min_lrr: not a parameter of 'cosine'; did you mean 'min_lr'?"),
        ({"name": "cosine", "lr": 0}, 100, "schedule.lr: 0.0 is not allowed; must be > 0"),
        ({"name": "cosine", "lr": -1e-3}, 100, "schedule.lr: -0.001 is not allowed"),
        ({"name": "cosine", "lr": "fast"}, 100, "schedule.lr: 'fast' is not a number"),
        ({"name": "cosine", "min_lr": -1}, 100, "schedule.min_lr: -1.0 is not allowed; must be >= 0"),
        ({"name": "cosine", "min_lr": 1}, 100, "schedule.min_lr: 1.0 is above lr"),
        ({"name": "cosine", "total_steps": 0}, 100, "schedule.total_steps: 0 is not allowed; must be >= 1"),
        ({"name": "linear", "total": "0%"}, 100, "schedule.total: 0 is not allowed"),
        ({"name": "cosine", "warmup": 100}, 100, "schedule.warmup: 100 (100 steps) is at or beyond the run length"),
        ({"name": "cosine", "warmup": "100%"}, 100, "at or beyond the run length (100 steps)"),
        ({"name": "cosine", "warmup": "2%"}, None, "schedule.warmup: '2%' is a fraction of the run, but the run length"),
        ({"name": "cosine"}, None, "schedule.total_steps: 'cosine' needs its length"),
        ({"name": "cosine", "warmup": "3ep"}, 100, "'3ep' is in epochs, but the steps per epoch are not known here"),
        ({"name": "cosine", "warmup": -5}, 100, "schedule.warmup: -5 is negative"),
        ({"name": "cosine", "warmup_shape": "exponential"}, 100, "schedule.warmup_shape: given without warmup"),
        ({"name": "cosine", "warmup": 5, "warmup_shape": "cubic"}, 100,
         "schedule.warmup_shape: 'cubic' is not allowed; allowed: linear, exponential"),
        ({"name": "cosine", "warmup": 5, "warmup_shape": "exponential"}, 100,
         "schedule.warmup_init_lr: 0.0 is not allowed with shape 'exponential'"),
        ({"name": "step", "interval": 10}, 100, "schedule.rate: missing; step_decay needs rate"),
        ({"name": "step", "rate": 1.5, "interval": 10}, 100, "schedule.rate: 1.5 is not allowed; must be in (0, 1]"),
        ({"name": "step", "rate": 0.5, "interval": 0}, 100, "schedule.interval: 0 is not allowed; must be >= 1"),
        ({"name": "multistep", "milestones": 50}, 100, "schedule.milestones: 50 is not a list of lengths"),
        ({"name": "multistep", "milestones": [50, 20]}, 100, "schedule.milestones: [50, 20] is not allowed; must be strictly increasing"),
        ({"name": "multistep", "milestones": [50, "x"]}, 100, "schedule.milestones[1]: 'x' is not a length"),
        ({"name": "exponential", "rate": 0}, 100, "schedule.rate: 0.0 is not allowed"),
        ({"name": "polynomial", "power": 0}, 100, "schedule.power: 0.0 is not allowed; must be > 0"),
        ({"name": "noam", "warmup": 10}, 100, "schedule.model_dim: missing"),
        ({"name": "noam", "model_dim": 51.5, "warmup": 10}, 100, "schedule.model_dim: 51.5 is not a whole number"),
        ({"name": "noam", "model_dim": 512, "warmup": 0}, 100, "schedule.warmup: 0 is not allowed; must be >= 1"),
        ({"name": "rsqrt", "warmup": 10, "scale": 0}, 100, "schedule.scale: 0.0 is not allowed"),
        ({"name": "wsd", "warmup": "50%", "decay": "60%"}, 100, "must fit in the run"),
        ({"name": "wsd", "decay": 10, "shape": "cubic"}, 100, "schedule.shape: 'cubic' is not allowed; allowed: linear, cosine, sqrt, 1-sqrt"),
        ({"name": "wsd"}, 100, "schedule.decay: missing"),
        ({"name": "cosine_restarts", "period": 10, "period_mult": 0.5}, 100, "schedule.period_mult: 0.5 is not allowed; must be >= 1"),
        ({"name": "cosine_restarts", "period": 10, "decay": 0}, 100, "schedule.decay: 0.0 is not allowed"),
        ({"name": "plateau", "factor": 1.0}, 100, "schedule.factor: 1.0 is not allowed; must be in (0, 1)"),
        ({"name": "plateau", "patience": -1}, 100, "schedule.patience: -1 is not allowed; must be >= 0"),
        ({"name": "plateau", "mode": "lowest"}, 100, "schedule.mode: 'lowest' is not allowed; allowed: min, max"),
        ({"name": "warmup", "steps": 10}, 100, "schedule.schedule: missing"),
        ({"name": "warmup", "steps": 100, "schedule": "cosine"}, 100, "schedule.steps: 100 (100 steps) is at or beyond"),
        ({"name": "join", "schedules": ["constant", "cosine"]}, 100, "schedule.boundaries: missing"),
        ({"name": "join", "schedules": ["constant", "cosine"], "boundaries": [10, 20]}, 100,
         "schedule.boundaries: [10, 20] has 2 entries; 2 schedules need 1"),
        ({"name": "join", "schedules": [], "boundaries": []}, 100, "schedule.schedules: [] is not allowed"),
        ({"name": "join", "schedules": ["constant", "cosin"], "boundaries": [10]}, 100,
         "schedule.schedules[1].name: 'cosin' is not a schedule"),
        ({"name": "join", "schedules": ["constant", "plateau"], "boundaries": [10]}, 100,
         "schedule.schedules[1]: reduce_on_plateau"),
        ({"name": "join", "schedules": ["constant", {"name": "cosine", "min_lr": 1}], "boundaries": [10]}, 100,
         "schedule.schedules[1].min_lr: 1.0 is above lr"),
        ({"name": "join", "schedules": ["constant", "constant"], "boundaries": [0]}, 100,
         "schedule.boundaries[0]: 0 is not allowed; must be >= 1"),
        ({"name": "wrap", "schedule": "constant", "step_duration": 0}, 100, "schedule.step_duration: 0 is not allowed"),
        ({"name": "cosine", "minimum": -1}, 100, "schedule.minimum: -1.0 is not allowed"),
        ({"name": "cosine", "warmup": 10, "warmup_steps": 10}, 100, "schedule.warmup_steps: not a parameter of 'cosine'"),
        ({"name": "wsd", "decay": 10, "decay_steps": 10}, 100, "given twice"),
    ],
)
def test_invalid_specs_raise_clear_errors(spec, total, needle):
    with pytest.raises(KeelError) as error:
        from_config(spec, base_lr=1e-3, total_steps=total)
    assert needle in str(error.value)


@pytest.mark.parametrize(("base_lr", "total"), [(0.0, 100), (-1.0, 100), ("x", 100), (1e-3, 0), (1e-3, 1.5)])
def test_invalid_run_values(base_lr, total):
    with pytest.raises(KeelError, match=r"^schedule"):
        from_config({"name": "cosine"}, base_lr=base_lr, total_steps=total)


def test_key_prefixes_errors():
    with pytest.raises(KeelError, match=r"^optimizer\.schedule\.name: "):
        from_config({"name": "nope"}, base_lr=1.0, total_steps=10, key="optimizer.schedule")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cosine", {"name": "cosine"}),
        ("cosine,warmup=100,min_lr=1e-5", {"name": "cosine", "warmup": 100, "min_lr": "1e-5"}),
        (" wsd , warmup=5% , decay=20% ", {"name": "wsd", "warmup": "5%", "decay": "20%"}),
        ("multistep,milestones=[300, 600],rate=0.5", {"name": "multistep", "milestones": [300, 600], "rate": 0.5}),
        ("{name: join, schedules: [constant, cosine], boundaries: [10%]}",
         {"name": "join", "schedules": ["constant", "cosine"], "boundaries": ["10%"]}),
    ],
)
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize("text", ["", "cosine,warmup", "cosine,=3", "cosine,a=1,a=2", "{name: [", "{}x"])
def test_parse_spec_errors(text):
    with pytest.raises(KeelError, match=r"^schedule"):
        parse_spec(text)


@pytest.mark.parametrize("name", sorted(set(SCHEDULES) - {"plateau"}))
@pytest.mark.parametrize("resume_at", [1, 37, 250])
def test_resume_at_any_step_continues_on_the_same_curve(name, resume_at):
    """A run stopped after `resume_at` updates and restarted from the config sets the same LRs, bitwise."""
    param = torch.nn.Parameter(torch.zeros(1))

    def run(start, stop, schedule, optimizer):
        seen = []
        for step in range(start, stop):
            set_lr(optimizer, schedule(step))
            seen.append(optimizer.param_groups[0]["lr"])
        return seen

    def make():
        return torch.optim.SGD([{"params": [param], "lr_scale": 0.5}], lr=1.0)

    build = lambda: from_config(EXAMPLES[name], base_lr=1e-3, total_steps=RUN)  # noqa: E731
    whole = run(0, RUN, build(), make())
    resumed = run(0, resume_at, build(), make()) + run(resume_at, RUN, build(), make())
    assert resumed == whole


@pytest.mark.parametrize("overrides", [
    ["task=digits", "schedule={name: multistep, milestones: [1ep, 2ep]}"],
    ["task=digits", "schedule={name: multistep, milestones: [100ex, 200ex]}"],
    ["duration=3ep", "schedule={name: multistep, milestones: [30%, 60%]}"],  # docs/schedules.md's form
    ["task=digits", "schedule={name: multistep, milestones: [100, 1ep]}"],  # units apart: the trainer orders them
    ["task=digits", "schedule={name: join, schedules: [constant, constant, cosine], boundaries: [1ep, 2ep]}"],
    ["task=digits", "schedule={name: join, schedules: [{name: cosine, warmup: 50}, constant], boundaries: [1ep]}"],
])
def test_lists_of_lengths_the_task_decides_pass_the_config_check(overrides):
    """Before the task is known a length in epochs or examples (or a share of a run in them) has no step: the
    config check holds only their syntax and the order of entries in one unit, not stand-in steps."""
    from keel.config import load_config

    load_config(None, ["device=cpu", *overrides])


def test_lengths_of_one_unit_out_of_order_are_one_line_at_config_time():
    from keel.config import load_config

    with pytest.raises(KeelError) as error:
        load_config(None, ["task=digits", "schedule={name: multistep, milestones: [100, 2ep, 1ep]}"])
    assert str(error.value) == ("schedule.milestones: [100, '2ep', '1ep'] is not allowed; lengths in the same unit "
                                "must be strictly increasing")


def test_lists_of_lengths_resolve_on_the_real_timeline():
    """On a timeline with counts (32 examples a step, 51 steps an epoch) the entries resolve to steps; entries
    that come to one step are refused there, naming what they came to."""
    timeline = Timeline.at_rate(600, examples_per_step=32, steps_per_epoch=51)
    schedule = from_config({"name": "multistep", "milestones": ["1ep", "2ep"]}, base_lr=1.0, timeline=timeline)
    assert schedule.params["milestones"] == (51, 102)
    joined = from_config({"name": "join", "schedules": ["constant", "cosine"], "boundaries": ["320ex"]}, base_lr=1.0,
                         timeline=timeline)
    assert joined.params["boundaries"] == (10,) and joined.params["schedules"][1].params["total_steps"] == 590
    with pytest.raises(KeelError) as error:
        from_config({"name": "multistep", "milestones": ["100ex", "110ex"]}, base_lr=1.0, timeline=timeline)
    assert str(error.value) == ("schedule.milestones: ['100ex', '110ex'] comes to steps [4, 4] for the given rates, "
                                "which is not allowed; must be strictly increasing (lengths at least a step apart)")
