"""Averaging inside tiny trainings: logged losses, saved weights, skipped steps, exact resume, SWA's LR, snapshots."""

import json

import pytest
import torch
from safetensors.torch import load_file

from keel.averaging import average_checkpoints, resolve_checkpoints, swa_learning_rate
from keel.train.scoring import ValidationScorer
from keel.cli.main import main
from keel.config import load_config
from keel.train import Callback, train
from keel.rundir.metrics import read_metrics
from run_helpers import StopAt  # tests/ is on sys.path

AVERAGES = ["ema.enabled=true", "ema.decay=0.95", "ema.dynamic_decay=true", "polyak.enabled=true",
            "polyak.start=50%", "swa.enabled=true", "swa.start=80", "swa.lr=1e-3", "swa.anneal_steps=10"]


class RecordLR(Callback):
    name = "record_lr"

    def __init__(self):
        self.lrs = {}

    def on_after_backward(self, trainer):
        self.lrs[trainer.state.step] = trainer.optimizer.param_groups[0]["lr"]


def newest_checkpoint(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    from tiny_config import TINY

    run = tmp_path_factory.mktemp("averaged") / "run"
    recorder = RecordLR()
    config = load_config(None, TINY + AVERAGES + [f"out_dir={run}"])
    summary = train(config, callbacks=[recorder], quiet=True)
    return run, summary, recorder


def test_evaluations_log_raw_and_averaged_losses(averaged_run):
    run, summary, _ = averaged_run
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]
    assert all("val_loss_ema" in r for r in evals)
    assert ["val_loss_polyak" in r for r in evals] == [False, True, True]  # the mean starts at 50% (step 60)
    assert ["val_loss_swa" in r for r in evals] == [False, False, True]
    losses = {k: summary[k] for k in ("val_loss", "val_loss_ema", "val_loss_polyak", "val_loss_swa")}
    best = min(losses, key=losses.get)
    assert summary["best_weights"] == ("raw" if best == "val_loss" else best.removeprefix("val_loss_"))


def test_saved_averages_score_as_logged(averaged_run):
    run, summary, _ = averaged_run
    final = newest_checkpoint(run)
    assert {"model.safetensors", "ema.safetensors", "polyak.safetensors", "swa.safetensors"} <= {
        p.name for p in final.iterdir()}
    scorer = ValidationScorer.from_config_file(run / "config.yaml")
    assert scorer.loss(final / "ema.safetensors") == pytest.approx(summary["val_loss_ema"], rel=1e-6)
    assert scorer.loss(final / "model.safetensors") == pytest.approx(summary["val_loss"], rel=1e-6)


def test_swa_phase_sets_its_learning_rate(averaged_run):
    _, _, recorder = averaged_run
    assert recorder.lrs[79] != pytest.approx(1e-3)
    assert recorder.lrs[90] == pytest.approx(1e-3)
    assert recorder.lrs[119] == pytest.approx(1e-3)
    start_lr = recorder.lrs[80]  # the phase starts from the schedule's value at its first step
    assert recorder.lrs[85] == pytest.approx(
        swa_learning_rate(85, start=80, start_lr=start_lr, swa_lr=1e-3, anneal_steps=10, strategy="cos"))


def test_average_and_ensemble_commands_on_a_run(averaged_run, tmp_path, capsys):
    run, summary, _ = averaged_run
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(run), "--last", "2", "--weights", "ema", "--out", str(out), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "averaged 2 checkpoints" in text and "(average)" in text
    expected = average_checkpoints([p / "ema.safetensors" for p in sorted((run / "checkpoints").glob("step_*"))][-2:])
    loaded = load_file(str(out))
    for name, value in expected.items():
        assert torch.equal(loaded[name], value)

    # an ensemble of identical members equals the member
    member = str(newest_checkpoint(run) / "model.safetensors")
    assert main(["ensemble", member, member, member, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ensemble_val_loss"] == pytest.approx(result["members"][0]["val_loss"], abs=1e-12)
    assert result["members"][0]["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["gain"] == pytest.approx(0.0, abs=1e-12)


class Poison(Callback):
    """Makes the gradients of chosen update attempts infinite, so the fp16 loss scaler skips them."""

    name = "poison"

    def __init__(self, attempts):
        self.attempts, self.count, self.checked = set(attempts), 0, 0
        self.shadow = None

    def on_step_start(self, trainer):
        if self.shadow is not None:  # the update before was skipped: the EMA must be as it was
            ema = next(cb for cb in trainer.callbacks if cb.name == "ema").unit
            assert all(torch.equal(ema.shadow[k], v) for k, v in self.shadow.items())
            self.checked += 1
            self.shadow = None

    def on_after_backward(self, trainer):
        self.count += 1
        if self.count in self.attempts:
            for p in trainer.model.parameters():
                p.grad.fill_(float("inf"))
            ema = next(cb for cb in trainer.callbacks if cb.name == "ema").unit
            self.shadow = {k: v.clone() for k, v in ema.shadow.items()}


def test_skipped_updates_do_not_touch_the_ema(tmp_path, tiny_overrides):
    config = load_config(None, tiny_overrides + ["max_steps=16", "precision=fp16", "ema.enabled=true",
                                                 "ema.dynamic_decay=true", f"out_dir={tmp_path / 'run'}"])
    poison = Poison({5, 6, 11})
    from keel.train.loop import Trainer

    trainer = Trainer(config, callbacks=[poison], quiet=True)
    summary = trainer.fit()
    assert summary["skipped"] == 3 and poison.checked == 3
    ema = next(cb for cb in trainer.callbacks if cb.name == "ema").unit
    assert ema.num_updates == 16  # one per applied update, none for the skipped ones


def assert_same_files(a, b, names):
    for name in names:
        fa, fb = load_file(str(a / name)), load_file(str(b / name))
        assert fa.keys() == fb.keys()
        for key in fa:
            assert torch.equal(fa[key], fb[key]), (name, key)


@pytest.mark.parametrize("mode", ["raw", "ema"], ids=["ema-beside-raw", "opennmt-ema-weights"])
def test_resume_is_exact(tmp_path, tiny_overrides, mode):
    overrides = tiny_overrides + ["ema.enabled=true", "ema.decay=0.9", "ema.dynamic_decay=true",
                                  f"ema.checkpoint_weights={mode}", "polyak.enabled=true", "polyak.start=30",
                                  "max_steps=60", "eval_interval=20", "checkpoint_interval=20"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(load_config(None, overrides + [f"out_dir={reference}"]), quiet=True)
    train(load_config(None, overrides + [f"out_dir={resumed}"]), callbacks=[StopAt(40)], quiet=True)
    assert newest_checkpoint(resumed).name == "step_00000040"
    train(load_config(None, overrides + [f"out_dir={resumed}"]), run_dir=resumed, resume=True, quiet=True)

    files = ["model.safetensors", "ema.safetensors", "polyak.safetensors"]
    if mode == "ema":
        files.append("raw.safetensors")
    assert_same_files(newest_checkpoint(reference), newest_checkpoint(resumed), files)
    evals = [[(r["step"], r["val_loss"], r.get("val_loss_ema"), r.get("val_loss_polyak"))
              for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r] for run in (reference, resumed)]
    assert evals[0] == evals[1]
    if mode == "ema":  # OpenNMT-tf's mode: the checkpoint's weights are the averaged ones
        final = newest_checkpoint(reference)
        assert_same_pairs = load_file(str(final / "model.safetensors")), load_file(str(final / "ema.safetensors"))
        for key, value in assert_same_pairs[0].items():
            assert torch.equal(value, assert_same_pairs[1][key])
        assert resolve_checkpoints([reference], last=1, weights="raw")[0].name == "raw.safetensors"  # truly raw
        assert resolve_checkpoints([reference], last=1)[0].name == "model.safetensors"  # default: what it holds


def test_snapshot_ensemble_with_cosine_restarts(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides + ["schedule={name: cosine_restarts, period: 30, min_lr: 1e-4, warmup: 0}",
                                  "snapshot.enabled=true", f"out_dir={run}"]
    train(load_config(None, overrides), quiet=True)
    snapshots = sorted((run / "snapshots").glob("step_*.safetensors"))
    assert [p.name for p in snapshots] == [f"step_{s:08d}.safetensors" for s in (30, 60, 90, 120)]
    final = load_file(str(newest_checkpoint(run) / "model.safetensors"))
    last = load_file(str(snapshots[-1]))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert main(["ensemble", str(run / "snapshots"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["members"]) == 4
    losses = [m["val_loss"] for m in result["members"]]
    # the mean of distributions is never worse than the mean member loss (Jensen)
    assert result["ensemble_val_loss"] <= sum(losses) / len(losses) + 1e-12


def test_config_errors_name_the_key(tmp_path, tiny_overrides):
    from keel.errors import KeelError

    with pytest.raises(KeelError, match="ema"):
        load_config(None, tiny_overrides + ["ema.dynamic_decay=true", "ema.half_life=100"])
    with pytest.raises(KeelError, match="ema.decy"):
        load_config(None, tiny_overrides + ["ema.decy=0.9"])
    config = load_config(None, tiny_overrides + ["snapshot.enabled=true", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(KeelError, match="snapshot.cycle"):
        train(config, quiet=True)
