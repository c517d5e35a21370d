"""The trainer's stability features end to end: non-finite guard, loss-spike rollback, bf16 and fp16 runs."""

import math

import pytest
import torch

from keel.config import load_config
from keel.grad import TrainingUnstableError
from keel import rundir as ckpt
from keel.train.loop import Trainer
from keel.rundir.metrics import read_metrics
from run_helpers import Inject, same  # tests/ is on sys.path

SHORT = ["max_steps=24", "checkpoint_interval=8", "eval_interval=100", "sample.tokens=0", "log_interval=1"]


@pytest.fixture
def make_trainer(tmp_path, tiny_overrides):
    def make(overrides, callbacks=(), name="run"):
        config = load_config(overrides=[*tiny_overrides, *SHORT, *overrides])
        return Trainer(config, callbacks=list(callbacks), run_dir=tmp_path / name, quiet=True)

    return make


def test_nan_and_inf_skip_the_update_and_change_nothing(make_trainer):
    inject = Inject(nan_loss={3}, inf_grad={7, 8})
    trainer = make_trainer(["ema.enabled=true", "ema.decay=0.9"], [inject])
    summary = trainer.fit()
    assert summary["step"] == 24 and summary["skipped"] == 3
    snaps = inject.snapshots
    assert len(snaps) == 24 + 3
    for bad in (3, 7, 8):
        before, after = snaps[bad], snaps[bad + 1]
        # parameters, optimizer state, EMA, step counter and schedule position (LR) are unchanged
        assert same(before, after), bad
    assert not same(snaps[4]["params"], snaps[5]["params"])  # an ordinary update does change them

    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    skips = [r for r in records if r.get("event") == "skipped"]
    assert [(r["step"], r["reason"]) for r in skips] == [(3, "nonfinite_loss"), (6, "nonfinite_grad"),
                                                         (6, "nonfinite_grad")]
    steps = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(24))
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["skipped"] == 3 and steps[2]["skipped"] == 0 and steps[3]["skipped"] == 1


def test_too_many_consecutive_skips_stop_with_the_last_good_checkpoint(make_trainer):
    inject = Inject(nan_loss=set(range(10, 100)))
    trainer = make_trainer(["nonfinite.max_consecutive_skips=4"], [inject])
    with pytest.raises(TrainingUnstableError, match="4 consecutive updates skipped") as raised:
        trainer.fit()
    assert "step_00000008" in str(raised.value)
    root = trainer.run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000008"]
    assert ckpt.verify(root / "step_00000008") is None
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert records[-1]["event"] == "stopped" and records[-1]["skipped"] == 4
    assert (trainer.run_dir / "loss.png").is_file()


def test_loss_spike_rolls_back_skips_batches_and_finishes(make_trainer):
    inject = Inject(spike_batches={13})
    overrides = ["spike.enabled=true", "spike.min_history=5", "spike.window=20", "spike.lr_factor=0.5",
                 "checkpoint_interval=5", "keep_last=3", "ema.enabled=true", "ema.decay=0.9"]
    trainer = make_trainer(overrides, [inject])
    summary = trainer.fit()
    assert summary["step"] == 24
    assert inject.spiked == [(13, 13)]  # the spiking batch was seen once: the rollback skipped past it
    # attempt 13 spiked; attempt 14 starts again from the checkpoint at step 10: weights, optimizer and EMA as then
    before, after = inject.snapshots[10], inject.snapshots[14]
    assert after["step"] == 10 and math.isclose(after["lr"], 0.5 * before["lr"], rel_tol=1e-12)
    assert all(same(before[k], after[k]) for k in ("params", "optimizer", "ema"))
    assert trainer.state.rollbacks == 1 and trainer.state.lr_multiplier == 0.5

    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    spike = next(r for r in records if r.get("event") == "spike")
    rollback = next(r for r in records if r.get("event") == "rollback")
    assert spike["step"] == 13 and spike["spike_loss"] > spike["threshold"]
    assert rollback == {"kind": "event", "step": 10, "event": "rollback", "from_step": 13,
                        "checkpoint": "step_00000010", "batches_skipped": 4, "lr_multiplier": 0.5, "rollbacks": 1}
    steps = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(24))  # the abandoned steps 10..12 were cut from the log
    assert all(r["loss"] < spike["threshold"] for r in steps)
    schedule = trainer.schedule
    for r in steps:
        expected = schedule(r["step"]) * (0.5 if r["step"] >= 10 else 1.0)
        assert math.isclose(r["lr"], expected, rel_tol=1e-12), r
    assert (trainer.run_dir / "loss.png").is_file()


def test_rollback_limit_stops_the_run(make_trainer):
    inject = Inject(spike_batches={8, 9, 10, 11, 12, 13, 14})
    overrides = ["spike.enabled=true", "spike.min_history=5", "spike.window=20", "spike.max_rollbacks=2",
                 "checkpoint_interval=4"]
    trainer = make_trainer(overrides, [inject])
    with pytest.raises(TrainingUnstableError, match="spike.max_rollbacks: 2"):
        trainer.fit()
    events = [r["event"] for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "event" in r]
    assert events == ["spike", "rollback", "spike", "rollback", "spike", "stopped"]


def test_bf16_run_trains(make_trainer):
    trainer = make_trainer(["precision=bf16", "max_steps=30"])
    summary = trainer.fit()
    losses = [r["loss"] for r in summary["history"] if "grad_norm" in r]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_fp16_run_trains_and_checkpoints_the_loss_scale(make_trainer):
    trainer = make_trainer(["precision=fp16", "max_steps=16"])
    summary = trainer.fit()
    losses = [r["loss"] for r in summary["history"] if "grad_norm" in r]
    assert len(losses) == 16 and losses[-1] < losses[0]
    _, payload = ckpt.load_checkpoint(ckpt.newest_intact(trainer.run_dir / "checkpoints"))
    assert payload["precision"]["scaler"] == trainer.precision.scaler.state_dict()


# ------------------------------------------------------------------------------------------ the full matrix (-m faults)

INJECTIONS = {  # name -> (Inject arguments, extra overrides); attempts count from 0, skipped ones included
    "nan loss at the first update": ({"nan_loss": {0}}, []),
    "nan loss mid-run": ({"nan_loss": {11}}, []),
    "nan loss at the last update": ({"nan_loss": {23}}, []),
    "inf loss": ({"inf_loss": {5}}, []),
    "inf loss, two in a row": ({"inf_loss": {9, 10}}, []),
    "inf gradient": ({"inf_grad": {2}}, []),
    "nan gradient": ({"nan_grad": {14}}, []),
    "nan gradient with EMA": ({"nan_grad": {6}}, ["ema.enabled=true", "ema.decay=0.9"]),
    "inf gradient with SWA": ({"inf_grad": {20}}, ["swa.enabled=true", "swa.start=50%"]),
    "nan loss with gradient accumulation": ({"nan_loss": {4}}, ["grad_accum=2"]),
    "nan loss and inf gradient, alternating": ({"nan_loss": {3, 5}, "inf_grad": {4, 6}}, []),
    "nan loss under bf16": ({"nan_loss": {7}}, ["precision=bf16"]),
    "inf gradient with a cosine-restart schedule": ({"inf_grad": {8}}, ["schedule.name=cosine_restarts",
                                                                          "schedule.period=6"]),
    "nan loss with clip.mode=value": ({"nan_loss": {12}}, ["clip.mode=value", "clip.max_value=0.5"]),
}


@pytest.mark.faults
@pytest.mark.parametrize("name", list(INJECTIONS))
def test_each_nonfinite_injection_leaves_the_state_untouched(make_trainer, name):
    arguments, overrides = INJECTIONS[name]
    inject = Inject(**arguments)
    trainer = make_trainer(overrides, [inject])
    summary = trainer.fit()
    bad = sorted(set().union(*arguments.values()))
    assert summary["step"] == 24 and summary["skipped"] == len(bad)
    assert len(inject.snapshots) == 24 + len(bad)
    for attempt in bad:  # parameters, optimizer state, EMA, step and LR as before the bad attempt
        assert same(inject.snapshots[attempt], inject.snapshots[attempt + 1]), attempt
    steps = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(24))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


SPIKES = {  # name -> (batches that spike, extra overrides)
    "one spike": ({13}, []),
    "an early spike": ({7}, []),
    "a late spike": ({21}, []),
    "two spikes": ({9, 17}, []),
    "a spike with EMA": ({13}, ["ema.enabled=true", "ema.decay=0.9"]),
    "a spike with gradient accumulation": ({14}, ["grad_accum=2"]),
}


@pytest.mark.faults
@pytest.mark.parametrize("name", list(SPIKES))
def test_each_loss_spike_rolls_back_and_the_rollback_is_reproducible(make_trainer, name):
    """Two runs with the same injected spike: each rolls back to the checkpoint before it (weights, optimizer and
    EMA as they were then) and the two end bitwise equal, with the same metrics."""
    batches, overrides = SPIKES[name]
    overrides = ["spike.enabled=true", "spike.min_history=5", "spike.window=20", "spike.lr_factor=0.5",
                 "checkpoint_interval=5", "keep_last=3", *overrides]
    runs = []
    for copy in ("a", "b"):
        inject = Inject(spike_batches=batches)
        trainer = make_trainer(overrides, [inject], name=copy)
        summary = trainer.fit()
        assert summary["step"] == 24 and trainer.state.rollbacks == len(set(inject.spiked)) >= 1
        records = read_metrics(trainer.run_dir / "metrics.jsonl")
        for rollback in (r for r in records if r.get("event") == "rollback"):
            restored = next(i for i, snap in enumerate(inject.snapshots) if snap["step"] == rollback["step"])
            again = next(i for i in range(restored + 1, len(inject.snapshots))
                         if inject.snapshots[i]["step"] == rollback["step"])
            assert all(same(inject.snapshots[restored][k], inject.snapshots[again][k])
                       for k in ("params", "optimizer", "ema"))
        runs.append(([p.detach().clone() for p in trainer.model.parameters()],
                     [{k: v for k, v in r.items() if k not in ("time", "elapsed", "tokens_per_second")}
                      for r in records]))
    (weights_a, records_a), (weights_b, records_b) = runs
    assert same(weights_a, weights_b)
    assert [r for r in records_a if r.get("kind") != "step"] == [r for r in records_b if r.get("kind") != "step"]
    assert [r["loss"] for r in records_a if "grad_norm" in r] == [r["loss"] for r in records_b if "grad_norm" in r]
