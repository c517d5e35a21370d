"""Sequence-length warmup: the length schedule at its boundaries, both ways of shortening a batch, exact
accumulation, seq_len in the metrics, full-context evaluation, and a bitwise resume after SIGKILL."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.config import load_config
from keel.data.seq_warmup import SequenceLengthWarmup, reshape_sequences, truncate_sequences
from keel.errors import KeelError
from keel.grad import count_tokens
from keel.rundir.metrics import read_metrics
from keel.tasks.lm import LanguageModelTask
from keel.train import Trainer, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_helpers import assert_bitwise_equal, keel_train, kill_when_step_reached  # noqa: E402


def test_linear_and_stepped_schedules_at_their_boundaries():
    linear = SequenceLengthWarmup(64, 256, 100)
    assert linear(0) == 64 and linear(100) == 256 and linear(10**6) == 256
    assert linear(50) == 160 and linear(99) == 248
    stepped = SequenceLengthWarmup(64, 256, 100, "stepped", stages=4)
    assert [stepped(t) for t in (0, 24, 25, 49, 50, 75, 99, 100)] == [64, 64, 112, 112, 160, 208, 208, 256]
    assert SequenceLengthWarmup(8, 60, 0)(0) == 60  # no warmup: the full context at once
    assert SequenceLengthWarmup(60, 60, 10)(0) == 60  # start at the context: nothing to shorten


@given(st.integers(8, 512), st.integers(0, 600), st.integers(0, 700), st.sampled_from(["linear", "stepped"]),
       st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_lengths_are_multiples_of_8_monotone_and_within_bounds(start, extra, duration, pacing, stages):
    full = start + extra
    warmup = SequenceLengthWarmup(start, full, duration, pacing, stages)
    lengths = [warmup(t) for t in range(0, duration + 2)]
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert lengths[-1] == full
    assert all(n == full or (n % 8 == 0 and start - 7 <= n <= full) for n in lengths)


def test_bad_start_is_one_line_and_nothing_is_written(tmp_path, tiny_overrides, capsys):
    from keel.cli.main import main

    for value, message in (("40", "seq_warmup.start: 40 is above the context (32 tokens, task lm); allowed: 8 to 32"),
                           ("4", "seq_warmup.start: 4 is below 8; allowed: 8 to model.block_size")):
        code = main(["train", *tiny_overrides, "seq_warmup.enabled=true", f"seq_warmup.start={value}",
                     "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err
        assert not (tmp_path / "r").exists()


def windows(rows=3, length=20):
    x = torch.arange(rows * (length + 1)).reshape(rows, length + 1)
    return x[:, :-1], x[:, 1:]


def test_reshape_keeps_every_target_exactly_once_and_truncate_keeps_the_rows():
    x, y = windows()
    for length in (8, 12, 16, 19, 20, 24):
        cx, cy = reshape_sequences((x, y), length)
        assert cx.shape[1] == min(length, 20) and cx.shape == cy.shape
        kept = cy[cy != -100]
        assert sorted(kept.tolist()) == sorted(y.reshape(-1).tolist()) and count_tokens(cy) == y.numel()
        assert torch.equal(cy.masked_fill(cy == -100, 0) - cx, torch.where(cy == -100, -cx, 1))  # still next tokens
        tx, ty = truncate_sequences((x, y), length)
        assert tx.shape == (3, min(length, 20)) and torch.equal(ty, y[:, :length])


def test_shortening_commutes_with_splitting_rows_so_accumulation_is_exact():
    x, y = windows(rows=4)
    y = y.clone()
    y[3, 14:] = -100  # a padded row (length bucketing)
    for shorten in (reshape_sequences, truncate_sequences):
        whole = shorten((x, y), 8)
        halves = [shorten((x[:2], y[:2]), 8), shorten((x[2:], y[2:]), 8)]
        assert torch.equal(whole[0], torch.cat([h[0] for h in halves]))
        assert torch.equal(whole[1], torch.cat([h[1] for h in halves]))
        assert count_tokens(whole[1]) == sum(count_tokens(h[1]) for h in halves)
    cx, cy = reshape_sequences((x, y), 8)
    assert bool(((cy != -100).any(dim=1)).all())  # chunks of pure padding are dropped


class FixedWindowsTask(LanguageModelTask):
    """Micro-batch i holds windows i*B .. (i+1)*B - 1 of a fixed list, so grad_accum=2 with batch B sees exactly
    the windows of grad_accum=1 with batch 2B."""

    def train_batch(self, index, rank=0, world_size=1):
        b, block = self.config.data.batch_size, self.block_size
        starts = (np.arange(index * b, (index + 1) * b) * 997) % (len(self.data.train) - block - 1)
        w = torch.from_numpy(np.stack([np.asarray(self.data.train[s:s + block + 1], dtype=np.int64) for s in starts]))
        return w[:, :-1], w[:, 1:]


@pytest.mark.parametrize("keep", ["true", "false"])
def test_warmup_with_gradient_accumulation_matches_one_large_batch(tmp_path, tiny_overrides, keep):
    base = tiny_overrides + ["max_steps=12", "eval_interval=12", "schedule.warmup=2", "seq_warmup.enabled=true",
                             "seq_warmup.start=8", "seq_warmup.duration=10", f"seq_warmup.keep_tokens_per_step={keep}"]
    runs = {}
    for accum, batch in ((1, 8), (2, 4)):
        config = load_config(None, base + [f"grad_accum={accum}", f"data.batch_size={batch}",
                                           f"out_dir={tmp_path / str(accum)}"])
        runs[accum] = Trainer(config, quiet=True, task=FixedWindowsTask()).fit()
    steps = [[r for r in runs[a]["history"] if "grad_norm" in r] for a in (1, 2)]
    assert [r["seq_len"] for r in steps[0]] == [r["seq_len"] for r in steps[1]]
    assert [r["tokens"] for r in steps[0]] == [r["tokens"] for r in steps[1]]
    np.testing.assert_allclose([r["loss"] for r in steps[0]], [r["loss"] for r in steps[1]], rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in steps[0]], [r["grad_norm"] for r in steps[1]], rtol=2e-4)


def test_seq_len_is_logged_tokens_follow_the_mode_and_evaluation_uses_the_full_context(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_steps=10", "eval_interval=5", "schedule.warmup=2", "seq_warmup.enabled=true",
                             "seq_warmup.start=8", "seq_warmup.duration=8"]
    kept = train(load_config(None, base + [f"out_dir={tmp_path / 'a'}"]), quiet=True)
    cut = train(load_config(None, base + ["seq_warmup.keep_tokens_per_step=false", f"out_dir={tmp_path / 'b'}"]),
                quiet=True)
    plain = train(load_config(None, base + ["seq_warmup.enabled=false", f"out_dir={tmp_path / 'c'}"]), quiet=True)
    steps = [r for r in kept["history"] if "grad_norm" in r]
    assert [r["seq_len"] for r in steps] == [8, 8, 8, 16, 16, 16, 24, 24, 32, 32]  # 8 + 3t rounded down to 8s
    assert kept["tokens"] == plain["tokens"] == 10 * 8 * 32  # tokens per step kept
    assert cut["tokens"] == 8 * sum(r["seq_len"] for r in steps)  # rows kept, fewer tokens
    trainer = Trainer(load_config(None, base + [f"out_dir={tmp_path / 'd'}"]), quiet=True)
    assert all(x.shape[1] == 32 for x, _ in trainer.task.eval_batches("val"))
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_the_start_line_says_the_tokens_per_step_change_until_the_warmup_ends(tmp_path, tiny_overrides, capsys):
    """Truncating rows, the first steps count fewer tokens: the start line gives both counts and where the second
    begins, rather than the first step's count as if it held all run."""
    base = tiny_overrides + ["max_steps=2", "schedule.warmup=1", "seq_warmup.enabled=true", "seq_warmup.start=8",
                             "seq_warmup.duration=8",
                             "seq_warmup.keep_tokens_per_step=false", f"out_dir={tmp_path / 'a'}"]
    train(load_config(None, base))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("task: lm"))
    assert "64 tokens per step at first, changing all run;" in line, line  # 8 rows of 8, the warmup outlasts the run
    train(load_config(None, base + ["max_steps=10", f"out_dir={tmp_path / 'b'}"]))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("task: lm"))
    assert "64 tokens per step at first, 256 from step 8;" in line, line  # then 8 rows of 32


def test_non_sequence_task_is_refused():
    with pytest.raises(KeelError, match="task digits has no sequences"):
        load_config(None, ["task=digits", "seq_warmup.enabled=true"])


@pytest.mark.parametrize("extra", [
    ["seq_warmup.keep_tokens_per_step=true", "seq_warmup.duration=40%"],
    ["seq_warmup.keep_tokens_per_step=false", "seq_warmup.pacing=stepped", "data.packing=false",
     "data.source=stdlib", "data.long_documents=truncate"],
], ids=["packed-keep-tokens", "bucketed-truncate"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, tiny_overrides, extra):
    overrides = tiny_overrides + ["max_steps=40", "checkpoint_interval=6", "eval_interval=20", "model.dropout=0.1",
                                  "seq_warmup.enabled=true", "seq_warmup.start=8", "seq_warmup.duration=24", *extra]
    reference = tmp_path / "reference"
    train(load_config(None, overrides + [f"out_dir={reference}"]), quiet=True)
    run = tmp_path / "killed"
    kills = sorted(random.Random(7).sample(range(4, 36), 2))
    kill_when_step_reached(keel_train(*overrides, "--out", str(run), "--quiet"), run, kills[0])
    kill_when_step_reached(keel_train("--resume", str(run), "--quiet"), run, kills[1])
    done = subprocess.run(keel_train("--resume", str(run), "--quiet"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_bitwise_equal(reference, run)
    lengths = {r["step"]: r["seq_len"] for r in read_metrics(run / "metrics.jsonl") if "seq_len" in r}
    assert lengths == {r["step"]: r["seq_len"] for r in read_metrics(reference / "metrics.jsonl") if "seq_len" in r}
    assert len(set(lengths.values())) > 2


def test_a_duration_in_tokens_is_reached_by_the_truncated_batches_themselves():
    """Truncating 8 rows of 64 tokens: the warmup over D steps is the first D whose own steps 0..D-1 (cut as it
    cuts them) count 20,000 tokens; the timeline then projects each step's cut tokens exactly."""
    from types import SimpleNamespace

    from keel.data.seq_warmup import SeqWarmupCallback, SeqWarmupConfig, SequenceLengthWarmup
    from keel.timeunits import Time, Timeline

    block = SeqWarmupConfig(enabled=True, start=8, duration="20ktok", keep_tokens_per_step=False)
    host = SimpleNamespace(task=SimpleNamespace(block_size=64), config=SimpleNamespace(task="lm"),
                           timeline=Timeline(Time.steps(1000), lambda step: (8, 8 * 64)))
    callback = SeqWarmupCallback(block)
    transform, until = callback.project_counts(host)
    duration = callback.unit.duration

    def counted(d):
        warmup = SequenceLengthWarmup(8, 64, d)
        return sum(8 * warmup(t) for t in range(d))

    assert until == duration and counted(duration) >= 20_000 > counted(duration - 1)
    assert duration > 20_000 // (8 * 64)  # longer than at full length
    host.timeline.add_transform(transform, until)
    assert host.timeline.projected(duration)[1] == counted(duration)


def test_a_resume_with_a_longer_duration_ends_where_the_kept_warmup_projects_it(tmp_path, tiny_overrides, capsys):
    """The warmup keeps its length from the checkpoint ('30%' of the first run: 10 steps, where 30% of the new run
    would be 20): the new run length in steps, the new decay and the cut batches all follow the kept warmup, so the
    run stops exactly where the decay it planned ends."""
    import re

    from keel.cli.main import main

    run = tmp_path / "run"
    fast = [item for item in tiny_overrides
            if not item.startswith(("max_steps=", "recipe=", "schedule.", "optimizer."))]  # wsd: ends at LR 0
    overrides = fast + ["sample.tokens=0", "eval_interval=100%", "checkpoint_interval=100%", "seq_warmup.enabled=true",
                        "seq_warmup.start=8", "seq_warmup.duration=30%", "seq_warmup.keep_tokens_per_step=false"]
    first = train(load_config(None, overrides + ["duration=4ktok", f"out_dir={run}"]), quiet=True)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "duration=8ktok", "resume_policy=new_decay"]) == 0
    out = capsys.readouterr().out
    assert "seq_warmup: duration kept at 10 steps from the checkpoint (30% now resolves to 20)" in out
    projected = int(re.search(r"run length 8ktok \((\d+) steps projected\)", out).group(1))
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]
    assert steps[-1]["step"] == projected - 1 and steps[-1]["tokens"] + 8 * 32 >= 8000 > steps[-1]["tokens"]
    assert [r["seq_len"] for r in steps if r["step"] >= 10] == [32] * (projected - 10)  # the kept warmup's end
    decay = [r["lr"] for r in steps if r["step"] > first["step"]]
    assert decay[0] == pytest.approx(0.02) and all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] < 0.02 / 50  # the new decay reached its end (cut short, it stopped near 0.02 / 5)
