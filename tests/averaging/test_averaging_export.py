"""What a run exports and reports: OpenNMT-tf's EMA checkpoints, checkpoint averaging at the end of training,
`keel average`'s default weights and its `--eval`, and the weights early stopping exports."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from keel.averaging import average_checkpoints
from keel.cli.main import main
from keel.config import load_config
from keel.train import train
from keel.train.scoring import ValidationScorer

DIGITS = ["task=digits", "device=cpu", "threads=1", "data.batch_size=32", "eval_interval=10", "checkpoint_interval=10"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def evals_of(result):
    return {r["step"]: r for r in result["history"] if "val_loss" in r}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A default run but for OpenNMT-tf's EMA mode: checkpoints (and so the export) hold the EMA weights."""
    run = tmp_path_factory.mktemp("ema") / "run"
    config = load_config(None, DIGITS + ["max_steps=60", "ema.enabled=true", "ema.decay=0.9",
                                         "ema.checkpoint_weights=ema", f"out_dir={run}"])
    return run, train(config)


def test_ema_mode_exports_what_the_checkpoints_hold(ema_run, capsys):
    run, result = ema_run
    final = run / "checkpoints" / "step_00000060"
    exported = load_file(str(run / "model.safetensors"))
    assert same(exported, load_file(str(final / "model.safetensors")))
    assert same(exported, load_file(str(final / "ema.safetensors")))
    assert not same(exported, load_file(str(final / "raw.safetensors")))
    last = evals_of(result)[60]
    assert result["weights"] == "ema" and result["weights_step"] == 60
    assert result["val_loss"] == last["val_loss_ema"] and result["val_accuracy"] == last["val_accuracy_ema"]
    assert result["val_loss_raw"] == last["val_loss"]
    scorer = ValidationScorer.from_config_file(run / "config.yaml")
    assert scorer.loss(run / "model.safetensors") == pytest.approx(result["val_loss"], rel=1e-6)


def test_ema_mode_says_so_in_the_banner_and_the_summary(tmp_path, capsys):
    config = load_config(None, DIGITS + ["max_steps=10", "ema.enabled=true", "ema.checkpoint_weights=ema",
                                         f"out_dir={tmp_path / 'r'}"])
    train(config)
    out = capsys.readouterr().out
    assert "hold the ema weights (ema.checkpoint_weights: ema)" in out
    assert "(ema weights of step 10, exported)" in out


def test_keel_average_defaults_to_what_the_checkpoints_hold(ema_run, tmp_path):
    """docs/averaging.md: with checkpoint_weights: ema, `keel average` averages the EMA weights (OpenNMT-tf)."""
    run, _ = ema_run
    steps = [run / "checkpoints" / f"step_{s:08d}" for s in (50, 60)]
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(run), "--last", "2", "--out", str(out)]) == 0
    assert same(load_file(str(out)), average_checkpoints([s / "ema.safetensors" for s in steps]))
    assert main(["average", str(run), "--last", "2", "--weights", "raw", "--out", str(out)]) == 0
    assert same(load_file(str(out)), average_checkpoints([s / "raw.safetensors" for s in steps]))


def test_the_documented_last_5_works_on_a_default_run(ema_run, tmp_path, capsys):
    run, _ = ema_run  # keep_last left at its default
    assert main(["average", str(run), "--last", "5", "--out", str(tmp_path / "avg.safetensors")]) == 0
    assert "averaged 5 checkpoints" in capsys.readouterr().out


def test_average_last_n_at_the_end_of_training(tmp_path, capsys):
    run = tmp_path / "run"
    config = load_config(None, DIGITS + ["max_steps=60", "keep_last=2", "average.last=4", f"out_dir={run}"])
    result = train(config, quiet=True)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept[-4:] == [f"step_{s:08d}" for s in (30, 40, 50, 60)]  # keep_last 2 raised to 4
    averaged = load_file(str(run / "averaged.safetensors"))
    expected = average_checkpoints([run / "checkpoints" / name / "model.safetensors" for name in kept[-4:]])
    assert same(averaged, expected)
    report = result["average"]
    assert report["steps"] == [30, 40, 50, 60] and report["file"] == "averaged.safetensors"
    scorer = ValidationScorer.from_config_file(run / "config.yaml")
    assert scorer.loss(run / "averaged.safetensors") == pytest.approx(report["val_loss"], rel=1e-6)
    assert 0 < report["val_accuracy"] <= 1
    # the export stays the trained weights of the last step
    assert same(load_file(str(run / "model.safetensors")), load_file(str(run / "checkpoints" / kept[-1] /
                                                                          "model.safetensors")))


def test_average_eval_of_a_python_api_run_says_why_before_writing(tmp_path, capsys):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = torch.utils.data.TensorDataset(x, y)
    config = load_config(None, ["device=cpu", "threads=1", "max_steps=4", "checkpoint_interval=2", "eval_interval=2",
                                "data.batch_size=16", f"out_dir={tmp_path / 'run'}"])
    train(config, model=nn.Linear(4, 3), train_data=data, val_data=data, quiet=True)
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(tmp_path / "run"), "--last", "2", "--eval", "--out", str(out)]) == 2
    assert not out.exists()  # nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Python API" in err and "--eval" in err


def test_early_stopping_exports_the_weights_it_names_and_reports_them(tmp_path, capsys):
    run = tmp_path / "r"
    config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=400", "eval_interval=10",
                                "checkpoint_interval=1000", "optimizer.lr=3e-2", "schedule.warmup=0",
                                "ema.enabled=true", "ema.decay=0.8", "early_stopping.patience=2",
                                "early_stopping.metric=val_loss_ema", f"out_dir={run}"])
    result = train(config)
    out = capsys.readouterr().out
    evals = evals_of(result)
    best, last = result["best_step"], result["step"]
    assert result["stopped_early"] and best < last
    record = evals[best]
    sets = {"raw": record["val_loss"], "ema": record["val_loss_ema"]}
    name = min(sets, key=sets.get)
    assert result["weights"] == name and result["weights_step"] == best and result["best_weights"] == name
    assert f"best: {name} weights" in out
    folder = run / "checkpoints" / f"step_{best:08d}"
    chosen = load_file(str(folder / ("model.safetensors" if name == "raw" else "ema.safetensors")))
    assert same(load_file(str(run / "model.safetensors")), chosen)
    # the final result is the exported weights'; the last step's is beside it
    assert result["val_loss"] == sets[name]
    suffix = "" if name == "raw" else "_ema"
    assert result["val_accuracy"] == record[f"val_accuracy{suffix}"]
    assert "train_eval_loss" not in result or name == "raw"  # the averages are scored on the validation split only
    assert result["last"]["step"] == last and result["last"]["val_loss"] == evals[last]["val_loss"]
    assert f"final val_loss {sets[name]:.4f}" in out


def test_an_ema_that_never_started_leaves_the_raw_weights_exported(tmp_path, capsys):
    run = tmp_path / "r"
    config = load_config(None, DIGITS + ["max_steps=10", "ema.enabled=true", "ema.start=50",
                                         "ema.checkpoint_weights=ema", f"out_dir={run}"])
    result = train(config)
    assert "ema weights: " in capsys.readouterr().out and result["weights"] == "raw"
    assert same(load_file(str(run / "model.safetensors")), load_file(str(run / "checkpoints" / "step_00000010" /
                                                                          "model.safetensors")))


def test_average_last_says_why_when_it_cannot_average(tmp_path, capsys):
    config = load_config(None, DIGITS + ["max_steps=20", "average.last=3", "average.weights=ema",
                                         f"out_dir={tmp_path / 'r'}"])
    result = train(config)  # no EMA in the checkpoints: the run still ends well
    assert "average.last: 3: nothing averaged (average: " in capsys.readouterr().out
    assert "average" not in result and not (tmp_path / "r" / "averaged.safetensors").exists()
