"""keel's Lightning callbacks on a real Lightning Trainer (tiny float64 model, CPU): the same LR and EMA as keel's own
trainer, exact resume from Lightning's checkpoints, and each technique doing what its unit does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from integration_helpers import (
    FROZEN_OPTIMIZER,
    Batches,
    assert_close_tensors,
    assert_trains_from_the_unfreeze_step,
    keel_config,
    keel_run,
    make_net,
)
from torch import nn

L = pytest.importorskip("lightning")

from keel.errors import KeelError  # noqa: E402
from keel.integrations.lightning import (  # noqa: E402
    EMA,
    CheckpointAverage,
    Clip,
    GradNorm,
    NonFinite,
    SWA,
    Polyak,
    SeqLenWarmup,
    SpikeRollback,
    UpdateRatio,
    applied_steps,
    keel_scheduler,
)
from keel.integrations.scheduler import KeelLRScheduler  # noqa: E402
from lightning_run import KILL_STEPS, Recorder, Regression, kill_run  # noqa: E402
from keel.schedules import cosine_decay, from_config, warmup  # noqa: E402


def fit(module, steps, callbacks, tmp_path, *, ckpt_path=None, logger=False, start=0, batches=None, **options):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), log_every_n_steps=1,
                        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint)
                                                 for c in callbacks), **options)
    loader = torch.utils.data.DataLoader(Batches(batches or steps - start, start), batch_size=None)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_keel_scheduler_is_lightnings_config_for_a_schedule_object_or_a_mapping():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    config = keel_scheduler(optimizer, {"name": "cosine", "warmup": 5, "min_lr": 0.0}, total_steps=20)
    assert set(config) == {"scheduler", "interval"} and config["interval"] == "step"
    scheduler = config["scheduler"]
    assert isinstance(scheduler, KeelLRScheduler) and isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    expected = warmup(cosine_decay(0.1, 15, min_lr=0.0), 5)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [expected(s) for s in range(20)]
    other = keel_scheduler(torch.optim.SGD([param], lr=0.1), expected)["scheduler"]
    assert other.optimizer.param_groups[0]["lr"] == expected(0)
    with pytest.raises(KeelError, match="total_steps"):
        keel_scheduler(optimizer, {"name": "cosine"})


def test_lightning_with_keels_callbacks_matches_keel_train(tmp_path):
    """Same model, data order and settings: the LR of every update and the EMA (OpenNMT-tf's dynamic decay) equal
    keel train's in float64 (rel 1e-10), and so do the final weights."""
    steps = 12
    config = keel_config(steps, tmp_path / "keel", ema={"enabled": True, "decay": 0.99, "dynamic_decay": True})
    net = make_net()
    expected = keel_run(config, net)

    module = Regression(make_net(), config)
    recorder, ema = Recorder(), EMA(0.99, dynamic_decay=True)
    fit(module, steps, [ema, Clip(max_norm=1.0), recorder], tmp_path / "lightning")
    assert recorder.steps == list(range(steps))
    assert recorder.lrs == pytest.approx(expected["lrs"], rel=1e-12, abs=0)
    assert ema.unit.num_updates == steps
    assert_close_tensors(ema.unit.averaged_state_dict(), expected["ema"], prefix="net.")
    for got, want in zip(module.net.parameters(), expected["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_resume_from_a_lightning_checkpoint_is_exact(tmp_path):
    """fit(ckpt_path=...) continues with the same EMA, LR schedule, clip window and weights as a run never stopped;
    the checkpoint's state_dict holds the EMA weights, the raw ones ride in the callback's state."""
    steps, stop = 10, 6
    config = keel_config(steps, tmp_path / "unused", schedule={"name": "cosine", "warmup": 2, "min_lr": 0.0})

    def callbacks(every):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1)
        return [EMA(0.9, dynamic_decay=True), Clip("percentile", window=8, calibration_steps=2), Recorder(),
                checkpoint]

    whole = Regression(make_net(), config)
    straight = callbacks(100)
    fit(whole, steps, straight, tmp_path / "a")

    first = Regression(make_net(), config)
    fit(first, stop, callbacks(stop), tmp_path / "b")
    checkpoint = tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved["callbacks"]["keel_ema"]) == {"num_updates", "shadow", "raw"}
    ema_weights = saved["callbacks"]["keel_ema"]["shadow"]
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in ema_weights.items())

    resumed_module = Regression(make_net(), config)
    resumed = callbacks(100)
    fit(resumed_module, steps, resumed, tmp_path / "c", ckpt_path=str(checkpoint), start=stop)
    assert resumed[0].unit.num_updates == steps
    for (name, a), b in zip(straight[0].unit.shadow.items(), resumed[0].unit.shadow.values()):
        assert torch.equal(a, b), name
    for a, b in zip(whole.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)
    assert resumed[2].lrs == straight[2].lrs[stop:]
    assert list(resumed[1].clipper.norms) == list(straight[1].clipper.norms)


def test_swa_sets_keel_trains_lr_phase(tmp_path):
    """SWA with its own LR: from the phase start the LR anneals from the schedule's to swa.lr, update by update as
    keel train applies it, and the mean counts the updates of the phase."""
    steps, start = 10, 6
    swa = {"start": start, "lr": 0.01, "anneal_steps": 2, "bn_update": False, "evaluate": False}
    config = keel_config(steps, tmp_path / "keel", swa={"enabled": True, **swa})
    expected = keel_run(config, make_net())
    recorder, average = Recorder(), SWA(**swa, apply_at_end=False)
    fit(Regression(make_net(), config), steps, [average, Clip(max_norm=1.0), recorder], tmp_path / "lightning")
    assert recorder.lrs == pytest.approx(expected["lrs"], rel=1e-12, abs=0)
    assert recorder.lrs[-1] == pytest.approx(0.01) and average.unit.num_updates == steps - start


class FirstLayer(L.Callback):
    """The first layer's weight after every update."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append(pl_module.net[0].weight.detach().clone())


def test_unfreeze_at_trains_the_frozen_layer_from_that_step_as_keel_train(tmp_path):
    """optimizer.freeze with optimizer.unfreeze_at through keel_optimizers: the first layer trains from update
    unfreeze_at on, and the weights equal keel train's; a resume past the unfreeze step trains it at once."""
    steps, stop = 8, 5
    config = keel_config(steps, tmp_path / "keel", optimizer=FROZEN_OPTIMIZER)
    expected = keel_run(config, make_net())

    module, first = Regression(make_net(), config), FirstLayer()
    initial = module.net[0].weight.detach().clone()
    fit(module, steps, [Clip(max_norm=1.0), first], tmp_path / "lightning")
    assert_trains_from_the_unfreeze_step(first.weights, initial)
    for got, want in zip(module.net.parameters(), expected["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop,
                                                     save_top_k=-1)
    fit(Regression(make_net(), config), stop, [Clip(max_norm=1.0), checkpoint], tmp_path / "first")
    resumed = Regression(make_net(), config)
    fit(resumed, steps, [Clip(max_norm=1.0)], tmp_path / "resumed", start=stop,
        ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt"))
    for a, b in zip(module.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_skips_the_update_and_holds_schedule_and_ema(tmp_path):
    steps = 8
    config = keel_config(steps, tmp_path / "unused")
    module = Regression(make_net(), config, poison={3: float("nan"), 4: float("inf")})
    recorder, guard, ema = Recorder(), NonFinite(max_consecutive_skips=3), EMA(0.9)
    fit(module, steps, [recorder, guard, ema], tmp_path / "run")
    assert guard.skipped == 2 and guard.steps_not_applied == 2
    assert recorder.steps == [0, 1, 2, 3, 3, 3, 4, 5]  # keel's step stands still over the skipped updates
    schedule = from_config(config.schedule, base_lr=0.05, total_steps=steps)
    assert recorder.lrs == pytest.approx([schedule(s) for s in recorder.steps], rel=1e-12)
    assert ema.unit.num_updates == steps - 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_stops_after_too_many_skips_naming_the_checkpoint(tmp_path):
    config = keel_config(6, tmp_path / "unused")
    module = Regression(make_net(), config, poison={s: float("nan") for s in range(2, 6)})
    with pytest.raises(KeelError, match="2 consecutive updates skipped.*no checkpoint was written"):
        fit(module, 6, [NonFinite(max_consecutive_skips=2)], tmp_path)


def test_spike_rollback_restores_the_snapshot_and_scales_the_lr(tmp_path):
    steps = 14
    config = keel_config(steps, tmp_path / "unused", schedule={"name": "constant"})
    module = Regression(make_net(), config, poison={10: 50.0})
    recorder, spike, ema = Recorder(), SpikeRollback(window=20, min_history=4, every=4, lr_factor=0.5), EMA(0.9)
    after = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            after.setdefault(applied_steps(trainer), []).append(
                ({k: v.clone() for k, v in pl_module.state_dict().items()}, ema.unit.num_updates))

    fit(module, steps, [recorder, spike, ema, Watch()], tmp_path)
    assert spike.rollbacks == 1 and spike.events[0]["step"] == 10 and spike.events[0]["to_step"] == 8
    assert recorder.steps == [*range(11), 8, 9, 10]  # back to the snapshot of step 8, and on from there
    (first, updates), (again, updates_again) = after[8]
    assert updates == updates_again == 8
    assert all(torch.equal(first[k], again[k]) for k in first)  # weights and EMA as they were at step 8
    assert recorder.lrs[11:] == pytest.approx([0.5 * 0.05] * 3)


def test_clip_percentile_after_warmup_logs_grad_norm(tmp_path):
    steps = 8
    config = keel_config(steps, tmp_path / "unused", schedule={"name": "cosine", "warmup": 3, "min_lr": 0.0})
    clip = Clip("percentile", percentile=50.0, window=4, calibration_steps=2, start_after_warmup=True)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="log")
    trainer = fit(Regression(make_net(), config), steps, [clip], tmp_path, logger=logger)
    assert clip.clipper.warmup_steps == 3 and len(clip.clipper.norms) == 4
    text = (tmp_path / "log" / "version_0" / "metrics.csv").read_text()
    assert "grad_norm" in text.splitlines()[0] and "clipped" in text.splitlines()[0]
    assert trainer.global_step == steps


def test_clip_refuses_lightnings_own_clipping_grad_norm_logs_beside_it(tmp_path):
    config = keel_config(4, tmp_path / "unused")
    with pytest.raises(KeelError, match=r"gradient_clip_val: 0\.5 in the Lightning Trainer clips after keel's Clip"):
        fit(Regression(make_net(), config), 4, [Clip(max_norm=1.0)], tmp_path, gradient_clip_val=0.5)
    trainer = fit(Regression(make_net(), config), 4, [GradNorm()], tmp_path, gradient_clip_val=0.5)
    assert trainer.global_step == 4


def test_update_ratio_and_grad_norm_are_logged(tmp_path):
    config = keel_config(6, tmp_path / "unused")
    ratio = UpdateRatio(every=2)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="log")
    fit(Regression(make_net(), config), 6, [ratio, GradNorm()], tmp_path, logger=logger)
    assert set(ratio.last) == {"net.0.weight", "net.2.weight"} and all(v > 0 for v in ratio.last.values())
    header = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "update_ratio/net.0.weight" in header and "grad_norm" in header


def test_checkpoint_average_at_fit_end_is_the_mean_of_the_last_snapshots(tmp_path):
    config = keel_config(8, tmp_path / "unused")
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    module = Regression(make_net(), config)
    average = CheckpointAverage(every=2, last=3, dirpath=tmp_path / "avg")
    fit(module, 8, [Watch(), average], tmp_path)
    assert [p.name for p in sorted((tmp_path / "avg").glob("step_*"))] == [
        "step_00000004.safetensors", "step_00000006.safetensors", "step_00000008.safetensors"]
    for name, value in module.state_dict().items():
        mean = (seen[4][name] + seen[6][name] + seen[8][name]) / 3
        torch.testing.assert_close(value, mean, rtol=1e-12, atol=1e-14)
    assert (tmp_path / "avg" / "averaged.safetensors").is_file()


class Tokens(L.LightningModule):
    """A character model over (inputs, targets) token rows: what sequence-length warmup cuts."""

    def __init__(self, lengths: list[tuple[int, int]]):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)
        self.lengths = lengths

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.lengths.append((x.shape[1], int((y != -100).sum())))
        logits = self.head(self.embed(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_seq_len_warmup_cuts_batches_in_place_keeping_every_token(tmp_path):
    rows = torch.randint(0, 32, (6 * 2, 33))
    data = [[rows[2 * i:2 * i + 2, :-1], rows[2 * i:2 * i + 2, 1:]] for i in range(6)]  # list batches, as collate
    lengths = []
    warm = SeqLenWarmup(start=8, duration=4)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[warm])
    trainer.fit(Tokens(lengths), torch.utils.data.DataLoader(data, batch_size=None))
    assert [n for n, _ in lengths] == [8, 8, 16, 24, 32, 32]
    assert all(targets == 2 * 32 for _, targets in lengths)  # tokens per step kept exactly
    with pytest.raises(KeelError, match="tuple batch cannot be changed"):
        warm.on_train_batch_start(SimpleNamespace(global_step=0, callbacks=[]), None, (rows[:2, :-1], rows[:2, 1:]), 0)


def test_an_epoch_is_lightnings_count_of_updates(tmp_path):
    """10 batches with 4 accumulated: Lightning steps after batches 4, 8 and the epoch's last, 3 updates an epoch
    (not 10 // 4)."""
    steps = 5
    config = keel_config(steps, tmp_path / "unused")
    polyak, ema = Polyak(start="1ep", evaluate=False), EMA(0.9, half_life="2ep", evaluate=False)
    fit(Regression(make_net(), config), steps, [polyak, ema], tmp_path, batches=10, accumulate_grad_batches=4)
    assert polyak.start == 3 and polyak.unit.num_updates == steps - 3
    assert ema.unit.half_life == 6


def test_bad_arguments_are_one_line_keel_errors():
    with pytest.raises(KeelError, match="decay"):
        EMA(decay=1.5)
    with pytest.raises(KeelError, match="mode"):
        Clip("sometimes")
    with pytest.raises(KeelError, match="max_consecutive_skips"):
        NonFinite(0)
    with pytest.raises(KeelError, match="checkpoint_weights"):
        EMA(0.9, checkpoint_weights="both")


@pytest.mark.slow
def test_sigkill_then_resume_from_the_last_checkpoint_continues_with_the_same_ema(tmp_path):
    """A real process killed with SIGKILL at step 10, resumed from last.ckpt (step 9, mid-epoch; the loader is
    resumable): the EMA, its update count and the weights equal an uninterrupted run's, bitwise."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("lightning_run.py")
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "10"],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9

    resumed, resumed_ema = kill_run(str(tmp_path / "killed"), ckpt_path=str(last))
    whole, whole_ema = kill_run(str(tmp_path / "whole"))
    assert resumed_ema.unit.num_updates == whole_ema.unit.num_updates == KILL_STEPS
    for name, value in whole_ema.unit.shadow.items():
        assert torch.equal(resumed_ema.unit.shadow[name], value), name
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_callbacks_skip_average_clip_and_resume(tmp_path):
    """On CUDA (float64): the EMA shadow lives beside the weights, a NaN update is skipped, and a resume from
    Lightning's checkpoint continues with the same EMA as a run never stopped."""
    steps, stop = 10, 6
    config = keel_config(steps, tmp_path / "unused")

    def run(max_steps, ckpt_path=None, start=0, every=100):
        module = Regression(make_net(), config, poison={3: float("nan")})
        callbacks = [Recorder(), NonFinite(), EMA(0.9, dynamic_decay=True), Clip("percentile", window=8,
                     calibration_steps=2), UpdateRatio(2),
                     L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1)]
        trainer = L.Trainer(max_steps=max_steps, accelerator="gpu", devices=1, logger=False, callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        loader = torch.utils.data.DataLoader(Batches(max_steps - start, start), batch_size=None)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, callbacks

    whole, straight = run(steps)
    assert straight[0].steps == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8] and straight[1].skipped == 1
    assert all(t.device.type == "cuda" for t in straight[2].unit.shadow.values())
    run(stop, every=stop)
    resumed_module, resumed = run(steps, ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt"), start=stop)
    assert resumed[2].unit.num_updates == straight[2].unit.num_updates == steps - 1
    for name, value in straight[2].unit.shadow.items():
        torch.testing.assert_close(resumed[2].unit.shadow[name], value, rtol=1e-12, atol=1e-12)
    for a, b in zip(whole.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert resumed[0].lrs == straight[0].lrs[stop:]
