"""`keel diagnose --config`: the acceptance cases (an unstable config is flagged and a warmup found for it; a healthy
config is not flagged), other tasks, and bad input. The procedures run shortened (a small Plan) to stay quick."""

import json

import pytest
import torch

from keel.cli.main import main
from keel.config import load_config
from keel.diagnose.active import Plan, diagnose_config, parse_budget
from keel.diagnose.findings import read_diagnosis
from keel.diagnose.probes import Display, ProbeTask, take_examples
from keel.errors import KeelError
from keel import tasks

TINY = {"recipe": "baseline", "device": "cpu", "threads": 1,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {"batch_size": 8, "eval_tokens": 4096}, "eval_interval": 50}
# No warmup, momentum SGD at an LR well above its stable range (0.5; 1e-1 trains), no clipping: it diverges early.
UNSTABLE = {**TINY, "max_steps": 200, "optimizer": {"name": "momentum", "lr": 0.5}, "schedule": {"name": "constant"},
            "clip": {"mode": "none"}}
HEALTHY = {**TINY, "max_steps": 200, "optimizer": {"lr": 3e-3}, "schedule": {"warmup": 10, "min_lr": 3e-4}}
SHORT = Plan(overfit_steps=(100, 30), config_steps=(120, 20), range_steps=(40, 20), sweep_steps=(40, 20),
             instability_steps=(80, 40), jump_steps=(40, 20))


def kinds(diagnosis):
    return {f.kind: f for f in diagnosis.findings}


def _quiet():
    return Display(enabled=False)


def test_unstable_config_is_flagged_and_a_warmup_makes_it_train(tmp_path):
    torch.set_num_threads(1)
    session = diagnose_config(UNSTABLE, tmp_path / "out", budget=300, plan=SHORT, display=_quiet())
    found = kinds(session.diagnosis)
    unstable = found["unstable_config"]
    assert unstable.severity == "error" and unstable.evidence["step"] < 120
    warmup = found["warmup"]
    assert warmup.evidence["base_lr"] == 0.5 and warmup.evidence["warmup_steps"] == 10
    assert found["recommended_verified"].evidence["steps_run"] == 120
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.schedule["warmup"] == 10 and config.max_steps == 210 and config.optimizer["lr"] == 0.5
    written = read_diagnosis(tmp_path / "out")
    assert {f.kind for f in written.findings} == set(found)
    assert all(f.evidence for f in written.findings)
    assert (tmp_path / "out" / "probes").is_dir()
    assert (tmp_path / "out" / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_healthy_config_is_not_flagged(tmp_path):
    torch.set_num_threads(1)
    session = diagnose_config(HEALTHY, tmp_path / "out", budget=300, plan=SHORT, display=_quiet())
    found = kinds(session.diagnosis)
    assert "config_stable" in found and "unstable_config" not in found
    assert not [f for f in session.diagnosis.findings if f.severity == "error"]
    assert found["initial_loss"].severity == "info"  # ln(256) at initialisation
    assert found["overfit_one_batch"].severity == "info"
    sweep = found["lr_sweep"].evidence
    assert sweep["lr_low"] <= sweep["lr_star"] <= sweep["lr_high"]
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.optimizer["lr"] == 3e-3 and config.schedule["warmup"] == 10


@pytest.mark.slow
def test_runs_on_another_task(tmp_path):
    torch.set_num_threads(1)
    raw = {"task": "digits", "device": "cpu", "threads": 1, "max_steps": 150}
    plan = Plan(overfit_steps=(60, 20), config_steps=(40, 20), range_steps=(30, 20), sweep_steps=(20, 20),
                instability_steps=(40, 40), jump_steps=(20, 20), verify=False)
    session = diagnose_config(raw, tmp_path / "out", budget=300, plan=plan, display=_quiet())
    found = kinds(session.diagnosis)
    assert found["initial_loss"].evidence["num_classes"] == 10
    assert "lr_sweep" in found and "config_stable" in found
    assert json.loads((tmp_path / "out" / "diagnosis.json").read_text())["source"] == "config"


def test_probe_task_trains_on_one_batch_and_cuts_evaluations():
    config = load_config(None, ["task=digits"])
    base = tasks.from_config(config)
    batch = take_examples(base.train_batch(0), 3)
    assert [tuple(t.shape) for t in batch] == [(3, 1, 8, 8), (3,)]
    probe = ProbeTask(base, base.build_model(), one_batch=batch, val_batches=2)
    assert probe.train_batch(7) is batch and list(probe.eval_batches("train")) == [batch]
    assert len(list(probe.eval_batches("val"))) == 2
    assert probe.build_model() is not probe.build_model()  # each probe starts from a copy
    assert take_examples({"x": torch.zeros(4, 2), "n": 5}, 2)["x"].shape == (2, 2)


def test_budget_syntax():
    assert parse_budget("15m") == 900 and parse_budget("90s") == 90 and parse_budget("1m30s") == 90
    assert parse_budget("1h") == 3600 and parse_budget(12) == 12
    for bad in ("", "abc", "0", "-5"):
        with pytest.raises(KeelError, match="--budget"):
            parse_budget(bad)


def _write(path, raw):
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def test_budget_too_small_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    config = _write(tmp_path / "c.yaml", HEALTHY)
    assert main(["diagnose", "--config", str(config), "--budget", "1s", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "too small" in err and "--budget" in err
    assert not (tmp_path / "out" / "diagnosis.json").exists()
    assert main(["diagnose", "--config", str(config), "--budget", "soon"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["diagnose", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_run_too_short_for_the_warmup_search_writes_a_partial_diagnosis(tmp_path, capsys):
    config = _write(tmp_path / "c.yaml", {**HEALTHY, "max_steps": 60, "schedule": {"warmup": 5, "min_lr": 3e-4}})
    out = tmp_path / "out"
    assert main(["diagnose", "--config", str(config), "--budget", "20s", "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1
    assert "warmup search" in captured.err and "max_steps >= 100" in captured.err
    assert "where the time went" in captured.out
    diagnosis = read_diagnosis(out)
    assert any(s.procedure == "warmup search" for s in diagnosis.skipped)
    assert "config_stable" in kinds(diagnosis)
    assert load_config(out / "recommended.yaml").max_steps == 60


@pytest.mark.slow
@pytest.mark.parametrize("raw, unstable", [(UNSTABLE, True), (HEALTHY, False)])
def test_full_plan_on_tiny_configs(tmp_path, raw, unstable):
    torch.set_num_threads(1)
    session = diagnose_config(raw, tmp_path / "out", budget=600, display=_quiet())
    found = kinds(session.diagnosis)
    assert ("unstable_config" in found) == unstable
    if unstable:
        assert found["warmup"].evidence["base_lr"] == 0.5
