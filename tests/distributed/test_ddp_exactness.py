"""Two ranks on batch B equal one process on batch 2B: the same logged losses, clipping decisions, evaluations
and final weights within float32 reduction tolerance, for lm (with and without gradient accumulation), a user's
task and FSDP; decisions (a NaN on rank 1 only, the percentile clip threshold) are taken alike on every rank."""

import json
from pathlib import Path

import pytest
import torch
from ddp_helpers import (
    TINY_LM,
    assert_same_run,
    digest,
    eval_records,
    keel_in_ranks,
    run_ranks,
    step_records,
    task_modules_importable,  # noqa: F401  (an autouse fixture)
    weights,
)

from keel.cli.main import main

STEPS = ["max_steps=24", "eval_interval=12", "checkpoint_interval=12"]
USER = ["task=user_task:make", "task_args.hidden=16", "device=cpu", "threads=1", "max_steps=30", "eval_interval=15",
        "checkpoint_interval=15", "data.global_batch_size=32", "optimizer.lr=3e-2", "schedule.warmup=3",
        "progress_interval=1000"]


def one_process(run: Path, *overrides: str) -> Path:
    assert main(["train", *overrides, "--out", str(run), "--quiet"]) == 0
    return run


def two_ranks(run: Path, *overrides: str) -> Path:
    keel_in_ranks(2, "train", *overrides, "--out", str(run), "--quiet")
    return run


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, grad_accum):
    overrides = [*TINY_LM, *STEPS, f"grad_accum={grad_accum}", "clip.max_norm=1.0"]
    single = one_process(tmp_path / "one", *overrides)
    ranks = two_ranks(tmp_path / "two", *overrides)
    assert_same_run(single, ranks)
    records = step_records(ranks)
    assert len(records) == 24 and any(r["clipped"] for r in records)  # clipping was on and acted
    assert records[-1]["tokens"] == 23 * 16 * 32  # the clock counts the tokens of both ranks
    config = (ranks / "config.yaml").read_text()
    assert f"batch_size: {8 // grad_accum}\n" in config and "global_batch_size: 16" in config


def test_a_user_task_on_two_ranks_equals_one_process(tmp_path):
    single = one_process(tmp_path / "one", *USER)
    ranks = two_ranks(tmp_path / "two", *USER)
    assert_same_run(single, ranks, atol=5e-5)
    losses = [r["loss"] for r in step_records(ranks)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # it learns
    assert "val_accuracy" in eval_records(ranks)[-1]


def test_digits_trains_on_two_ranks(tmp_path):
    """BatchNorm statistics are per rank (rank 0's are broadcast), so digits matches one process only roughly."""
    run = two_ranks(tmp_path / "two", "task=digits", "device=cpu", "threads=1", "max_steps=30", "eval_interval=30",
                    "checkpoint_interval=30", "data.batch_size=16", "optimizer.lr=1e-2", "schedule.warmup=2",
                    "progress_interval=1000")
    final = eval_records(run)[-1]
    assert final["val_accuracy"] > 0.5  # chance: 0.1
    assert step_records(run)[-1]["tokens"] == 29 * 32


def record_ranks(out: Path, overrides: list[str]) -> int:
    """Train in this rank with a callback that records what every rank must agree on."""
    from keel.config import load_config
    from keel.train import Callback, Trainer

    class Record(Callback):
        name = "record_ranks"

        def on_run_end(self, trainer, summary):
            (out / f"rank{trainer.rank}.json").write_text(json.dumps({
                "weights": digest(trainer.model.state_dict()),
                "clip_norms": list(trainer.clipper.norms),
                "threshold": trainer.clipper.threshold(),
                "skipped": trainer.state.skipped,
                "step": trainer.state.step,
            }))

    Trainer(load_config(None, overrides), callbacks=[Record()], quiet=True).fit()
    return 0


def test_a_nan_on_rank_1_only_skips_the_update_on_every_rank(tmp_path):
    overrides = ["task=ddp_tasks:nan_in_second_half", "task_args.at_batch=5", "device=cpu", "threads=1",
                 "max_steps=20", "eval_interval=20", "checkpoint_interval=20", "data.global_batch_size=32",
                 "optimizer.lr=3e-2",
                 "schedule.warmup=3", "clip.mode=percentile", "clip.calibration_steps=4", "clip.window=8",
                 "clip.percentile=50", "progress_interval=1000"]
    codes = run_ranks(2, record_ranks, tmp_path, [*overrides, f"out_dir={tmp_path / 'two'}"])
    assert codes == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # identical weights, clip windows and thresholds, counters: the replicas never drifted
    assert rank0["skipped"] == 1 and rank0["step"] == 20
    skips = [r for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"skipped"' in r
             and '"event"' in r]
    assert len(skips) == 1 and '"reason": "nonfinite_loss"' in skips[0] and '"step": 5' in skips[0]
    # One process with NaNs in the same rows of the same global batch takes the same path.
    single = one_process(tmp_path / "one", *overrides)
    assert_same_run(single, tmp_path / "two", atol=5e-5)
    assert any(r["clipped"] for r in step_records(single))  # the percentile threshold acted


def test_a_spike_on_rank_1_only_rolls_back_every_rank_and_early_stopping_stops_them_together(tmp_path):
    overrides = ["task=ddp_tasks:spike_in_second_half", "task_args.at_batch=12", "device=cpu", "threads=1",
                 "max_steps=40", "eval_interval=5", "checkpoint_interval=5", "data.global_batch_size=32",
                 "optimizer.lr=3e-2",
                 "schedule.warmup=3", "spike.enabled=true", "spike.window=10", "spike.min_history=5",
                 "spike.min_rise=0.3", "spike.factor=3", "early_stopping.patience=3", "early_stopping.min_delta=0.15",
                 "progress_interval=1000"]
    codes = run_ranks(2, record_ranks, tmp_path, [*overrides, f"out_dir={tmp_path / 'two'}"])
    assert codes == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # the same rollback, the same stop, the same best weights restored
    events = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
              if '"event"' in line]
    assert [e["event"] for e in events] == ["spike", "rollback"] and events[1]["from_step"] == 12
    assert rank0["step"] < 40  # early stopping ended the run
    single = one_process(tmp_path / "one", *overrides)
    assert_same_run(single, tmp_path / "two", atol=5e-5)


def test_fsdp_on_two_ranks_equals_one_process_and_writes_keels_format(tmp_path):
    overrides = [*TINY_LM, *STEPS, "strategy=fsdp"]
    single = one_process(tmp_path / "one", *overrides)
    ranks = two_ranks(tmp_path / "two", *overrides)
    assert_same_run(single, ranks)
    # The checkpoint holds whole tensors under the model's own names: init_from and keel average read it.
    assert main(["average", str(ranks), "--last", "2", "--out", str(tmp_path / "avg.safetensors")]) == 0
    again = one_process(tmp_path / "init", *TINY_LM, "max_steps=1", "optimizer.lr=1e-12", "schedule.min_lr=1e-13",
                        "schedule.warmup=0", "eval_interval=1", "checkpoint_interval=1", f"init_from={ranks}")
    for key, value in weights(ranks).items():
        torch.testing.assert_close(weights(again)[key], value, rtol=0, atol=1e-6)
