"""The trainer on CUDA: mixed precision (autocast, the fp16 loss scaler and its overflow skip), torch's fused kernels,
non-finite skips, loss-spike rollback, SIGKILL and resume bitwise with ``deterministic: true``, and runs that move
between the GPU and the CPU.

Marker ``gpu``: skipped where CUDA is absent (tests/conftest.py); ``python -m pytest -m gpu`` on a GPU machine, or
``bash benchmarks/gpu_check.sh``. Sizes are those of the CPU tests (tests/tiny_config.py) with ``device=cuda``.
"""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.config import load_config
from keel.optim.torch_kernels import choose_kernels
from keel.rundir.metrics import read_metrics
from keel.train import Trainer, train
from tiny_config import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CPU tests' injector and helpers
from run_helpers import Inject, StopAt, assert_bitwise_equal, kill_when_step_reached, same  # noqa: E402

pytestmark = pytest.mark.gpu

ON_GPU = [*(o for o in TINY if o != "device=cpu"), "device=cuda"]
SHORT = ["max_steps=24", "checkpoint_interval=8", "eval_interval=100", "sample.tokens=0", "log_interval=1"]


def gpu_trainer(tmp_path, *overrides, callbacks=(), name="run"):
    config = load_config(None, [*ON_GPU, *SHORT, *overrides])
    return Trainer(config, callbacks=list(callbacks), run_dir=tmp_path / name, quiet=True)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r}


def keel_train(*args):
    return [sys.executable, "-m", "keel.cli.main", "train", *args]


# ------------------------------------------------------------------------------------------ precision and kernels


def test_bf16_autocasts_the_forward_and_trains(tmp_path):
    trainer = gpu_trainer(tmp_path, "precision=bf16", "max_steps=30")
    dtypes = set()
    trainer.model.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    summary = trainer.fit()
    losses = [r["loss"] for r in summary["history"] if "grad_norm" in r]
    assert dtypes == {torch.bfloat16}  # the logits: autocast ran the forward in bf16
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.precision.scaler is None  # bf16 has fp32's exponent range: no loss scaling


def test_fp16_scales_the_loss_and_skips_an_overflowing_update(tmp_path):
    inject = Inject(inf_grad={5})  # an inf gradient at attempt 5: what an fp16 overflow looks like
    trainer = gpu_trainer(tmp_path, "precision=fp16", callbacks=[inject])
    dtypes = set()
    trainer.model.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    scale = trainer.precision.loss_scale
    summary = trainer.fit()
    assert dtypes == {torch.float16}
    skips = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if r.get("event") == "skipped"]
    assert summary["step"] == 24 and summary["skipped"] == len(skips) >= 1
    assert all(r["reason"] == "fp16_overflow" for r in skips) and 5 in [r["step"] for r in skips]
    assert same(inject.snapshots[5], inject.snapshots[6])  # the skipped update changed nothing
    assert trainer.precision.loss_scale == scale * 0.5 ** len(skips)  # backed off once per overflow
    assert math.isfinite(summary["val_loss"])


def test_torch_fused_kernels_are_chosen_on_cuda(tmp_path):
    params = [torch.zeros(4, 4, device="cuda", requires_grad=True)]
    for optimizer in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        assert choose_kernels(optimizer, params) == {"fused": True, "foreach": False}, optimizer
    assert choose_kernels(torch.optim.RMSprop, params) == {"foreach": True}  # no fused kernel: multi-tensor ops
    trainer = gpu_trainer(tmp_path)  # recipe baseline: AdamW
    assert all(group["fused"] is True for group in trainer.optimizer.param_groups)


# ------------------------------------------------------------------------------------------ stability


def test_nonfinite_updates_are_skipped_and_change_nothing_on_cuda(tmp_path):
    inject = Inject(nan_loss={3}, inf_grad={7})
    trainer = gpu_trainer(tmp_path, "ema.enabled=true", "ema.decay=0.9", callbacks=[inject])
    summary = trainer.fit()
    assert summary["step"] == 24 and summary["skipped"] == 2
    for bad in (3, 7):  # weights, optimizer state, EMA, step and LR as before the bad attempt
        assert same(inject.snapshots[bad], inject.snapshots[bad + 1]), bad


def test_a_loss_spike_rolls_back_on_cuda(tmp_path):
    """The rollback reads the checkpoint on the CPU and moves it back: weights, optimizer state and EMA on the GPU
    exactly as they were at the checkpoint."""
    inject = Inject(spike_batches={13})
    trainer = gpu_trainer(tmp_path, "spike.enabled=true", "spike.min_history=5", "spike.window=20",
                          "spike.lr_factor=0.5", "checkpoint_interval=5", "keep_last=3", "ema.enabled=true",
                          "ema.decay=0.9", callbacks=[inject])
    summary = trainer.fit()
    assert summary["step"] == 24 and trainer.state.rollbacks == 1 and inject.spiked == [(13, 13)]
    before, after = inject.snapshots[10], inject.snapshots[14]
    assert after["step"] == 10 and math.isclose(after["lr"], 0.5 * before["lr"], rel_tol=1e-12)
    assert all(same(before[k], after[k]) for k in ("params", "optimizer", "ema"))
    assert all(p.is_cuda for p in after["params"])
    rollback = next(r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if r.get("event") == "rollback")
    assert rollback["checkpoint"] == "step_00000010" and rollback["from_step"] == 13


# ------------------------------------------------------------------------------------------ exact resume


def test_sigkill_at_random_steps_then_resume_is_bitwise_with_deterministic(tmp_path):
    """deterministic: true on CUDA: killed twice and resumed, the run ends bitwise equal to an uninterrupted one
    (weights, every logged loss, every evaluation). Every run is its own process, as after a real crash."""
    overrides = [*ON_GPU, "deterministic=true", "max_steps=200", "checkpoint_interval=13", "eval_interval=50",
                 "keep_last=2", "model.dropout=0.1", "sample.tokens=0"]
    seed = int(os.environ.get("KEEL_TEST_SEED", random.randrange(10**6)))  # rerun a failure with this seed
    draw = random.Random(seed)
    kills = [draw.randrange(10, 80)]
    kills.append(draw.randrange(kills[0] + 40, 180))  # far enough apart that the first kill lands before it
    print(f"KEEL_TEST_SEED={seed}: SIGKILL at steps {kills}")
    reference = tmp_path / "reference"
    done = subprocess.run(keel_train(*overrides, "--out", str(reference), "--quiet"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "killed"
    kill_when_step_reached(keel_train(*overrides, "--out", str(run), "--quiet"), run, kills[0], timeout=300)
    kill_when_step_reached(keel_train("--resume", str(run), "--quiet"), run, kills[1], timeout=300)
    done = subprocess.run(keel_train("--resume", str(run)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from step_" in done.stdout
    assert_bitwise_equal(reference, run)


# No dropout: the CPU and the CUDA generators draw different masks, so only a run without randomness in its steps
# follows the same trajectory on both devices. fp32 without TF32: precision auto would be bf16 on the GPU and fp32
# on the CPU, and TF32 matmuls round differently from the CPU's.
PORTABLE = [*ON_GPU, "max_steps=30", "checkpoint_interval=10", "eval_interval=10", "keep_last=5", "sample.tokens=0",
            "ema.enabled=true", "ema.decay=0.9", "precision=fp32", "tf32=false"]


def optimizer_devices(trainer) -> set[str]:
    return {t.device.type for s in trainer.optimizer.state.values() for k, t in s.items()
            if torch.is_tensor(t) and k != "step"}


def _stop_at_20_then_resume_on(tmp_path, first: str, then: str, capsys):
    """An uninterrupted run on ``first``, and one stopped at step 20 there and resumed on ``then``."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = train(load_config(None, [*PORTABLE, f"device={first}", f"out_dir={reference}"]), quiet=True)
    train(load_config(None, [*PORTABLE, f"device={first}", f"out_dir={run}"]), callbacks=[StopAt(20)], quiet=True)
    capsys.readouterr()
    trainer = Trainer(load_config(None, [*PORTABLE, f"device={then}", f"out_dir={run}"]), run_dir=run, resume=True)
    summary = trainer.fit()
    out = capsys.readouterr().out
    assert summary["step"] == 30 and "resumed from step_00000020" in out
    expected, got = step_losses(reference), step_losses(run)
    assert expected.keys() == got.keys() == set(range(30))
    # Before the move, the same run on the same device (within rounding: without deterministic: true, two CUDA runs
    # may differ in the last bits); at step 20 the same weights and batch on the other device, kernels' rounding
    # apart; at the end, the same trajectory within float32 drift.
    assert [got[s] for s in range(21)] == pytest.approx([expected[s] for s in range(21)], rel=1e-4)
    assert summary["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=2e-2)
    return trainer, out


def test_a_run_checkpointed_on_the_gpu_resumes_on_the_cpu(tmp_path, capsys):
    trainer, out = _stop_at_20_then_resume_on(tmp_path, "cuda", "cpu", capsys)
    assert "checkpoint step_00000020 was written on cuda:0: read on the CPU" in out and "moved to cpu" in out
    assert out.count("the checkpoint's CUDA generator state is ignored") == 1
    assert optimizer_devices(trainer) == {"cpu"}
    ema = next(cb for cb in trainer.callbacks if cb.name == "ema")
    assert {t.device.type for t in ema.unit.shadow.values()} == {"cpu"}


def test_a_run_checkpointed_on_the_cpu_resumes_on_the_gpu(tmp_path, capsys):
    trainer, out = _stop_at_20_then_resume_on(tmp_path, "cpu", "cuda", capsys)
    assert "checkpoint step_00000020 was written on cpu: read on the CPU" in out and "moved to cuda" in out
    assert out.count("the checkpoint holds no CUDA generator state") == 1
    assert optimizer_devices(trainer) == {"cuda"}
    ema = next(cb for cb in trainer.callbacks if cb.name == "ema")
    assert {t.device.type for t in ema.unit.shadow.values()} == {"cuda"}
