"""log.mlflow and log.wandb: a keel train run and sweep trials log config, metrics and artifacts to a local MLflow
store and to W&B in offline mode; nothing leaves the machine. Skipped when the package is not installed."""

import os

import pytest

from keel.cli.main import main
from keel.config import load_config
from keel.train import train

DIGITS = ["task=digits", "max_steps=12", "eval_interval=6", "checkpoint_interval=6", "device=cpu", "threads=1"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root (./mlruns) lands here


def test_mlflow_gets_config_metrics_and_artifacts_of_a_run_and_of_sweep_trials(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("optuna")
    from mlflow import MlflowClient

    summary = train(load_config(None, [*DIGITS, "log.mlflow=true"]), run_dir=tmp_path / "run", quiet=True)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("keel")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["task"] == "digits" and run.data.params["max_steps"] == "12"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(12))
    assert run.data.metrics["val_loss"] == pytest.approx(summary["val_loss"])
    assert run.data.tags["keel.best_checkpoint"].endswith("checkpoints/step_00000012")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss.png", "config.yaml"}

    # sweep trials: one tracked run each, tagged with the study and the trial; a failed trial ends as FAILED
    (tmp_path / "c.yaml").write_text("task: digits\ndevice: cpu\nmax_steps: 6\neval_interval: 6\nlog: {mlflow: true}\n"
                                     "sweep: {optimizer.lr: [1.0e-2, 1.0e+4]}\n")
    assert main(["sweep", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "sweep")]) == 0
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`keel.study` = 'sweep'")
    assert sorted(r.data.tags["keel.trial"] for r in trials) == ["0", "1"]
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED"]


def wandb_records(path):
    """The records of a W&B offline file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records are
    checksum (4 bytes), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last) and data."""
    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # the block's tail is padding
            position += room
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        if kind == 0 and length == 0:
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending += chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_has_config_metrics_and_files(tmp_path):
    pytest.importorskip("wandb")
    summary = train(load_config(None, [*DIGITS, "log.wandb=true"]), run_dir=tmp_path / "run", quiet=True)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    files = {p.name for p in (offline / "files").iterdir()}
    assert {"loss.png", "keel-config.yaml"} <= files
    from wandb.proto import wandb_internal_pb2

    history, config = [], {}
    for data in wandb_records(next(offline.glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or ".".join(item.nested_key): item.value_json for item in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
    assert config["task"] == '"digits"'
    losses = [h for h in history if "loss" in h]
    assert len(losses) == 12
    assert float([h for h in history if "val_loss" in h][-1]["val_loss"]) == pytest.approx(summary["val_loss"])


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("no mlflow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    assert main(["train", "log.mlflow=true"]) == 2
    assert "log.mlflow: turned on, but the mlflow package is not installed" in capsys.readouterr().err
