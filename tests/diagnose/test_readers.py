"""`keel diagnose` / `keel report` readers of other trainers' logs, on synthetic files in the formats Lightning's
CSVLogger and the Hugging Face Trainer write (real runs: tests/integrations/test_diagnose_other_trainers.py)."""

import csv
import json
import math
import sys

import numpy as np
import pytest

from keel.cli.main import main
from keel.diagnose.readers import find_other_run, read_other_run
from keel.diagnose.report import build_report
from keel.diagnose.run import diagnose_run
from keel.errors import KeelError

COLUMNS = ["epoch", "grad_norm", "lr-AdamW", "skipped", "step", "train_loss", "update_ratio/net.0.weight", "val_loss",
           "val_loss_ema"]


def write_csv(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return path / "metrics.csv"


def lightning_rows(losses, evaluate_every=10):
    rows = []
    for step, loss in enumerate(losses):
        rows.append({"step": step, "lr-AdamW": 1e-3})  # LearningRateMonitor writes its own row
        ratio = {"update_ratio/net.0.weight": 1e-3} if step % 5 == 0 else {}
        rows.append({"step": step, "epoch": 0, "train_loss": loss, "grad_norm": 0.5 + 0.01 * step,
                     "skipped": 1 if step >= 7 else 0, **ratio})
        if (step + 1) % evaluate_every == 0:
            rows.append({"step": step, "epoch": 0, "val_loss": loss + 0.1, "val_loss_ema": loss})
    return rows


def test_lightning_csv_rows_become_keels_records(tmp_path):
    write_csv(tmp_path / "lightning_logs" / "version_0", lightning_rows([1.0] * 5))
    newest = write_csv(tmp_path / "lightning_logs" / "version_2", lightning_rows([2.0 - 0.01 * i for i in range(20)]))
    assert find_other_run(tmp_path) == ("lightning-csv", newest)
    records = read_other_run(tmp_path)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(20))
    assert steps[3] == {"kind": "step", "step": 3, "loss": 1.97, "lr": 1e-3, "grad_norm": 0.53}
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals == [{"kind": "eval", "step": 10, "val_loss": pytest.approx(2.01), "val_loss_ema": 1.91},
                     {"kind": "eval", "step": 20, "val_loss": pytest.approx(1.91), "val_loss_ema": 1.81}]
    assert [r["step"] for r in records if r["kind"] == "event"] == [7]  # the skipped count rose at step 7
    ratios = [r for r in records if r["kind"] == "diagnostic"]
    assert [r["step"] for r in ratios] == [0, 5, 10, 15] and ratios[0]["ratios"] == {"net.0.weight": 1e-3}


def test_hf_log_history_becomes_keels_records(tmp_path):
    history = [
        {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-4, "epoch": 0.1, "step": 1},
        {"loss": 1.8, "grad_norm": float("nan"), "learning_rate": 2e-4, "epoch": 0.2, "step": 2},
        {"update_ratio": {"w": 2e-3}, "step": 2},
        {"skipped": 1, "step": 3},
        {"eval_loss": 1.9, "eval_runtime": 0.1, "epoch": 0.2, "step": 2},
        {"eval_loss_ema": 1.7, "step": 2},
        {"train_runtime": 1.0, "train_loss": 1.9, "epoch": 0.2, "step": 2},
    ]
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert find_other_run(tmp_path / "out") == ("hf", tmp_path / "out" / "checkpoint-2" / "trainer_state.json")
    records = read_other_run(tmp_path / "out")
    assert [r for r in records if r["kind"] == "step"] == [
        {"kind": "step", "step": 0, "loss": 2.0, "lr": 1e-4, "grad_norm": 1.5},
        {"kind": "step", "step": 1, "loss": 1.8, "lr": 2e-4, "grad_norm": pytest.approx(math.nan, nan_ok=True)}]
    assert [r for r in records if r["kind"] == "eval"] == [
        {"kind": "eval", "step": 2, "val_loss": 1.9, "val_loss_ema": 1.7}]
    assert [(r["step"], r["event"]) for r in records if r["kind"] == "event"] == [(1, "nonfinite"), (2, "skipped")]
    assert [r["ratios"] for r in records if r["kind"] == "diagnostic"] == [{"w": 2e-3}]


def test_a_diverging_run_in_either_format_is_flagged_unstable(tmp_path):
    n = 60
    losses = [2.0 * 0.99**i for i in range(40)] + [2.0 * 3.0**i for i in range(1, 19)] + [math.inf, math.nan]
    write_csv(tmp_path / "lightning", lightning_rows(losses, evaluate_every=1000))
    history = [{"loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3, "step": i + 1} for i, loss in enumerate(losses)]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert len(losses) == n
    for path in (tmp_path / "lightning", tmp_path / "hf" / "trainer_state.json"):
        diagnosis, raw = diagnose_run(path)
        found = {f.kind: f for f in diagnosis.findings}
        assert raw is None and "instability_sudden" in found, path
        steps = {e["step"] for e in found["instability_sudden"].evidence["events"]}
        assert {58, 59} <= steps and min(steps) >= 40
        assert "clip_threshold" in found  # the gradient-norm reading ran on the logged norms


def test_cli_diagnose_writes_beside_a_trainer_state_and_report_reads_a_lightning_dir(tmp_path, capsys):
    history = [{"loss": 2.0 - 0.01 * i + 0.01 * np.sin(i), "grad_norm": 1.0, "learning_rate": 1e-3, "step": i + 1}
               for i in range(40)]
    (tmp_path / "hf").mkdir()
    state = tmp_path / "hf" / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history}))
    code = main(["diagnose", str(state)])
    out = capsys.readouterr().out
    assert code in (0, 2) and "reading Hugging Face trainer_state.json" in out
    assert json.loads((tmp_path / "hf" / "diagnosis.json").read_text())["findings"]
    write_csv(tmp_path / "lightning", lightning_rows([2.0 - 0.02 * i for i in range(30)]))
    page = build_report([tmp_path / "lightning", tmp_path / "hf"])
    assert page.count("<img") >= 3


def test_bad_logs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    write_csv(tmp_path / "noloss", [{"step": 0, "val_loss": 1.0}])
    with pytest.raises(KeelError, match="holds no training loss.*train_loss"):
        read_other_run(tmp_path / "noloss")
    write_csv(tmp_path / "odd", [{"step": "1e300", "train_loss": 1.0}, {"step": "-3", "train_loss": 1.0},
                                 {"step": "x", "train_loss": 1.0}, {"step": 2, "train_loss": "nan"}])
    assert [r["step"] for r in read_other_run(tmp_path / "odd") if r["kind"] == "step"] == [2]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "trainer_state.json").write_text("{not json")
    assert main(["diagnose", str(tmp_path / "broken")]) == 2
    assert "not a readable trainer_state.json" in capsys.readouterr().err
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1.host").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where the package is not installed
    with pytest.raises(KeelError, match="needs the tensorboard package") as error:
        read_other_run(tmp_path / "tb")
    assert "\n" not in str(error.value)
    keel_run = tmp_path / "keel"
    keel_run.mkdir()
    (keel_run / "metrics.jsonl").write_text("")
    assert find_other_run(keel_run) is None and find_other_run(tmp_path / "nothing") is None
