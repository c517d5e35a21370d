"""End to end: a tiny run beats the unigram baseline and writes a complete run directory."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from keel.config import load_config
from keel.train import Callback, train
from keel.rundir.metrics import read_metrics


class Recorder(Callback):
    name = "recorder"

    def __init__(self):
        self.events = []
        self.ends = 0

    def on_run_start(self, trainer):
        self.events.append("run_start")

    def on_step_end(self, trainer):
        self.ends += 1

    def on_eval(self, trainer, metrics):
        metrics["val_loss_probe"] = metrics["val_loss"] + 1.0

    def on_checkpoint(self, trainer, ckpt_dir):
        (ckpt_dir / "probe.txt").write_text(str(trainer.state.step))

    def on_run_end(self, trainer, summary):
        self.events.append("run_end")

    def state_dict(self):
        return {"ends": self.ends}

    def load_state_dict(self, state):
        self.ends = state["ends"]


def test_tiny_run_beats_unigram_baseline(tmp_path, tiny_overrides):
    config = load_config(None, tiny_overrides + [f"out_dir={tmp_path / 'run'}"])
    recorder = Recorder()
    result = train(config, callbacks=[recorder], quiet=True)
    run = tmp_path / "run"
    assert result["val_loss"] < result["unigram_baseline"] - 0.3
    assert result["step"] == 120 and result["tokens"] == 120 * 8 * 32
    assert recorder.events == ["run_start", "run_end"] and recorder.ends == 120

    # run directory
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["max_steps"] == 120 and saved["model"]["n_embd"] == 32
    assert (run / "loss.png").stat().st_size > 10_000
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(120))
    for record in steps:
        assert {"step", "tokens", "lr", "loss", "grad_norm", "time", "skipped"} <= set(record)
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]
    assert all(r["val_loss_probe"] == r["val_loss"] + 1.0 for r in evals)
    assert result["history"] == records

    # warmup then cosine: LR rises over 10 steps, peaks, ends near min_lr
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3) and int(np.argmax(lrs)) == 10
    assert lrs[-1] == pytest.approx(3e-4, rel=0.05)

    # checkpoints: the newest keep_last plus the best, callback files inside, pointer to the newest
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts[-2:] == ["step_00000080", "step_00000120"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000120"
    best = (run / "checkpoints" / "best").read_text().strip()
    assert best in ckpts
    newest = run / "checkpoints" / "step_00000120"
    assert (newest / "probe.txt").read_text() == "120"
    weights = load_file(str(newest / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in result_model_state(run).items())
    manifest = json.loads((newest / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "probe.txt"}


def result_model_state(run):
    return load_file(str(run / "checkpoints" / "step_00000120" / "model.safetensors"))


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tiny_overrides):
    """2 micro-batches of 4 sequences == 1 batch of 8 sequences drawn from the same windows."""
    from keel.data import RandomWindowSampler

    base = tiny_overrides + ["max_steps=3", "schedule.warmup=1", "eval_interval=100", "checkpoint_interval=100", "sample.tokens=0"]
    big = load_config(None, base + ["data.batch_size=8", "grad_accum=1", f"out_dir={tmp_path / 'a'}"])
    small = load_config(None, base + ["data.batch_size=4", "grad_accum=2", f"out_dir={tmp_path / 'b'}"])
    from keel.train import Trainer

    trainers = [Trainer(big, quiet=True), Trainer(small, quiet=True)]
    # Make the large batch hold exactly the two micro-batches' windows.
    micro = trainers[1].task.sampler

    class Joined(RandomWindowSampler):
        def batch(self, index, rank=0, world_size=1):
            a, b = micro.batch(2 * index), micro.batch(2 * index + 1)
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    trainers[0].task.sampler = Joined(micro.tokens, micro.block_size, 8, micro.seed)
    results = [t.fit() for t in trainers]
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in res["history"] if "grad_norm" in r] for res in results]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
