"""Helpers that test folders share (imported by name: tests/ is on sys.path through its conftest.py, like
tiny_config): ``keel train`` as a subprocess command, a run's logged losses and final weights, the bitwise comparison
of two runs, SIGKILL at a step, and callbacks that stop a run (``StopAt``) or corrupt chosen updates (``Inject``)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from keel.rundir.metrics import read_metrics
from keel.train import Callback


def keel_train(*args):
    return [sys.executable, "-m", "keel.cli.main", "train", *args]


def train_losses(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    name = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


def assert_bitwise_equal(run_a: Path, run_b: Path):
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert train_losses(run_a) == train_losses(run_b)
    val_a = [r["val_loss"] for r in read_metrics(run_a / "metrics.jsonl") if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(run_b / "metrics.jsonl") if "val_loss" in r]
    assert val_a == val_b


def kill_when_step_reached(cmd, run: Path, step: int, timeout: float = 60.0, env=None) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any(r.get("step", -1) >= step for r in read_metrics(metrics)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {step}: {proc.stderr.read().decode()}"


class StopAt(Callback):
    name = "stop_at"

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        self.should_stop = trainer.state.step >= self.step


def snapshot(trainer):
    ema = next((cb for cb in trainer.callbacks if cb.name == "ema"), None)
    return {
        "step": trainer.state.step,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "optimizer": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for s in trainer.optimizer.state.values()],
        "ema": [t.clone() for t in ema.unit.state_dict()["shadow"].values()] if ema is not None else None,
    }


def same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class Inject(Callback):
    """Corrupts chosen update attempts (counted from 0, skipped ones included) and snapshots the state before each."""

    name = "inject"

    def __init__(self, nan_loss=(), inf_grad=(), spike_batches=(), inf_loss=(), nan_grad=()):
        self.nan_loss, self.inf_grad, self.spike_batches = set(nan_loss), set(inf_grad), set(spike_batches)
        self.inf_loss, self.nan_grad = set(inf_loss), set(nan_grad)
        self.attempt, self.snapshots, self.spiked = -1, [], []
        self._hooked = False

    def on_run_start(self, trainer):
        if not self._hooked:
            trainer.model.register_forward_hook(self._forward_hook)
            self._hooked = True
        self.trainer = trainer

    def on_step_start(self, trainer):
        self.attempt += 1
        self.snapshots.append(snapshot(trainer))

    def _forward_hook(self, module, inputs, output):
        if not module.training:
            return None
        if self.attempt in self.nan_loss:
            return output * float("nan")
        if self.attempt in self.inf_loss:
            return output * float("inf")
        batch = self.trainer.state.batch_index - self.trainer.config.grad_accum  # this update's first micro-batch
        if batch in self.spike_batches:
            self.spiked.append((self.trainer.state.step, batch))
            noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output)
            return output + 40.0 * noise
        return None

    def on_after_backward(self, trainer):
        if self.attempt in self.inf_grad:
            next(trainer.model.parameters()).grad.view(-1)[0] = float("inf")
        if self.attempt in self.nan_grad:
            list(trainer.model.parameters())[-1].grad.view(-1)[-1] = float("nan")
