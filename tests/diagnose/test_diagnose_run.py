"""`keel diagnose RUN_DIR` on synthetic run directories: each finding, its evidence, and bad input."""

import json
import math

import numpy as np
import pytest

from keel.cli.main import main
from keel.config import dump_config, load_config
from keel.diagnose.findings import read_diagnosis
from keel.diagnose.run import diagnose_run
from keel.rundir.metrics import MetricsLog

RNG = np.random.default_rng(0)


def make_run(path, losses, *, lrs=None, evals=(), events=(), norms=None, clipped=None, overrides=(),
             ratios=()):
    n = len(losses)
    config = load_config(None, ["task=digits", f"max_steps={n}", *overrides])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(config))
    lrs = lrs if lrs is not None else [1e-3] * n
    norms = norms if norms is not None else list(0.5 + 0.1 * RNG.random(n))
    clipped = clipped if clipped is not None else [False] * n
    log = MetricsLog(path / "metrics.jsonl")
    for i in range(n):
        log.write({"step": i, "tokens": 32 * i, "lr": lrs[i], "loss": float(losses[i]), "grad_norm": float(norms[i]),
                   "clipped": clipped[i], "skipped": 0, "time": 0.01 * i})
    for record in [*evals, *events, *ratios]:
        log.write(record)
    log.close()
    return path


def kinds(diagnosis):
    return {f.kind: f for f in diagnosis.findings}


def check_evidence(diagnosis):
    for finding in diagnosis.findings:
        assert finding.evidence, finding.kind
        assert any("step" in key for key in finding.evidence), (finding.kind, finding.evidence)
        assert finding.recommendation


def test_lr_too_low(tmp_path):
    n = 400
    losses = 2.3 - 1.0 * np.arange(n) / n + 0.01 * RNG.standard_normal(n)
    diagnosis, _ = diagnose_run(make_run(tmp_path / "r", losses, overrides=["optimizer.lr=1e-4"]))
    found = kinds(diagnosis)
    assert "lr_too_low" in found
    assert found["lr_too_low"].changes == {"optimizer.lr": 3e-4}
    check_evidence(diagnosis)


def test_fast_fall_then_plateau_at_constant_lr(tmp_path):
    n = 400
    losses = 1.0 + 1.3 * np.exp(-np.arange(n) / 10) + 0.01 * RNG.standard_normal(n)
    run = make_run(tmp_path / "r", losses, overrides=["schedule.name=constant", "optimizer.lr=0.1"],
                   lrs=[0.1] * n)
    found = kinds(diagnose_run(run)[0])
    assert "lr_too_high_plateau" in found
    assert found["lr_too_high_plateau"].changes["schedule"]["name"] == "cosine"


def test_kink_where_the_lr_decays_while_still_falling(tmp_path):
    n = 600
    t = np.arange(n)
    losses = 2.3 - 0.001 * t - np.where(t >= 300, 0.4, 0.0) + 0.005 * RNG.standard_normal(n)
    lrs = [0.1 if i < 300 else 0.01 for i in range(n)]
    found = kinds(diagnose_run(make_run(tmp_path / "r", losses, lrs=lrs))[0])
    assert found["decay_too_early"].evidence["decay_step"] == 300
    assert found["decay_too_early"].evidence["lr_before"] == 0.1


def _evals(val, train, every=50):
    return [{"step": every * (i + 1), "val_loss": v, "train_eval_loss": t} for i, (v, t) in enumerate(zip(val, train))]


def test_overfitting(tmp_path):
    losses = 2.3 * np.exp(-np.arange(300) / 100) + 0.1
    val = [1.5, 1.0, 0.8, 0.85, 0.95, 1.1]
    train = [1.4, 0.9, 0.6, 0.4, 0.25, 0.1]
    found = kinds(diagnose_run(make_run(tmp_path / "r", losses, evals=_evals(val, train)))[0])
    assert found["overfitting"].evidence["best_step"] == 150
    assert found["overfitting"].changes == {"early_stopping.patience": 3}


def test_underfitting_against_ln_c(tmp_path):
    losses = 2.31 - 0.05 * np.arange(300) / 300
    val, train = [2.29, 2.28, 2.27], [2.28, 2.27, 2.26]
    found = kinds(diagnose_run(make_run(tmp_path / "r", losses, evals=_evals(val, train, 100)))[0])
    assert found["underfitting"].evidence["ln(num_classes)"] == pytest.approx(math.log(10))


def test_train_longer_when_both_still_improve(tmp_path):
    losses = 2.3 * np.exp(-np.arange(400) / 300) + 0.1
    val = [1.8, 1.5, 1.3, 1.1, 1.0, 0.9, 0.8, 0.7]
    train = [1.7, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6]
    found = kinds(diagnose_run(make_run(tmp_path / "r", losses, evals=_evals(val, train)))[0])
    assert found["train_longer"].changes == {"max_steps": 800}
    assert "overfitting" not in found


def test_gradient_norms_and_clipping(tmp_path):
    n = 100
    norms = list(np.linspace(0.5, 5.0, n))
    clipped = [bool(v > 1.0) for v in norms]
    found = kinds(diagnose_run(make_run(tmp_path / "r", np.linspace(2.3, 1.0, n), norms=norms, clipped=clipped))[0])
    finding = found["clipping_most_updates"]
    assert finding.evidence["p90"] == pytest.approx(np.percentile(norms, 90))
    assert finding.evidence["clipped_fraction"] > 0.5
    assert finding.changes == {"clip.mode": "norm", "clip.max_norm": float(f"{np.percentile(norms, 90):.2g}")}
    few = kinds(diagnose_run(make_run(tmp_path / "q", np.linspace(2.3, 1.0, n), norms=norms))[0])
    assert "clip_threshold" in few and "clipping_most_updates" not in few


def test_update_ratios_outside_the_healthy_band(tmp_path):
    ratios = [{"kind": "diagnostic", "step": s, "diagnostic": "update_ratio",
               "ratios": {"a.weight": 1e-3, "b.weight": 1e-6, "c.weight": 0.2}} for s in range(0, 100, 10)]
    found = kinds(diagnose_run(make_run(tmp_path / "r", np.linspace(2.3, 1.0, 100), ratios=ratios))[0])
    assert found["update_ratio_low"].evidence["b.weight"] == 1e-6
    assert found["update_ratio_high"].evidence["c.weight"] == 0.2
    assert "a.weight" not in found["update_ratio_low"].evidence


def test_instability_events_early_and_sudden(tmp_path):
    n = 500
    losses = list(2.3 * np.exp(-np.arange(n) / 200) + 0.2 + 0.01 * RNG.standard_normal(n))
    losses[400] = 5.0  # a spike the detector finds in the log
    events = [{"step": 3, "event": "skipped", "reason": "nonfinite_loss", "loss": math.nan},
              {"step": 250, "event": "rollback", "from_step": 260}]
    diagnosis, _ = diagnose_run(make_run(tmp_path / "r", losses, events=events))
    found = kinds(diagnosis)
    assert [e["step"] for e in found["instability_early"].evidence["events"]] == [3]
    assert {e["step"] for e in found["instability_sudden"].evidence["events"]} == {250, 400}
    assert found["instability_early"].changes["schedule.warmup"] >= 25
    check_evidence(diagnosis)


def test_cli_writes_diagnosis_and_a_trainable_recommended_config(tmp_path, tiny_overrides, capsys):
    from keel.train import train

    run = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "max_steps=60", "eval_interval=20", "sample.tokens=0",
                             f"out_dir={run}"]), quiet=True)
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert (run / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"
    assert "evidence:" in out and "recommendation:" in out
    diagnosis = read_diagnosis(run)
    assert diagnosis.source == "run" and diagnosis.findings
    raw = json.loads((run / "diagnosis.json").read_text())
    assert {"kind", "severity", "evidence", "recommendation"} <= set(raw["findings"][0])
    recommended = run / "recommended.yaml"
    config = load_config(recommended, ["max_steps=15", "eval_interval=15", f"out_dir={tmp_path / 'again'}"])
    assert config.out_dir == str(tmp_path / "again")
    assert main(["train", str(recommended), "max_steps=15", "eval_interval=15", "sample.tokens=0",
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["diagnose", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    short = make_run(tmp_path / "short", [2.3, 2.2, 2.1, 2.0, 1.9])
    assert main(["diagnose", str(short)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning curves" in err and "at least 20" in err
    assert (short / "diagnosis.json").is_file()  # the partial diagnosis is written
    assert {s.procedure for s in read_diagnosis(short).skipped} >= {"learning curves", "gradient norms"}


def test_recommended_config_of_a_python_api_run_says_how_to_use_it(tmp_path, capsys):
    """A run made with keel.train(model=...) records task: python, which keel train cannot rebuild: the file says
    so at its top and how to use it, and the way it names works."""
    import torch
    from torch import nn

    from keel.train import train

    torch.manual_seed(0)
    x = torch.randn(128, 4)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    run = tmp_path / "run"
    config = load_config(None, ["max_steps=30", "eval_interval=10", "threads=1", "data.batch_size=16",
                                f"out_dir={run}"])
    train(config, model=nn.Linear(4, 2), train_data=data, val_data=data, quiet=True)
    assert main(["diagnose", str(run)]) == 0
    capsys.readouterr()
    text = (run / "recommended.yaml").read_text()
    head = text[:text.index("\ntask: python")]
    assert "keel train cannot rebuild" in head and "train(load_config('recommended.yaml'), task=your_task)" in head
    assert "task: package.module:factory" in head
    assert main(["train", str(run / "recommended.yaml")]) == 2  # as the file says
    assert "task: 'python'" in capsys.readouterr().err
    again = train(load_config(run / "recommended.yaml", ["max_steps=5", f"out_dir={tmp_path / 'again'}"]),
                  model=nn.Linear(4, 2), train_data=data, val_data=data, quiet=True)
    assert again["step"] == 5


def _unstable_while_clipping(path, norms, overrides, lrs=None):
    n = len(norms)
    losses = list(2.3 * np.exp(-np.arange(n) / 100) + 0.2)
    events = [{"step": 200, "event": "rollback", "from_step": 210}, {"step": 250, "event": "skipped",
                                                                     "reason": "nonfinite_loss", "loss": math.nan}]
    return kinds(diagnose_run(make_run(path, losses, norms=norms, events=events, lrs=lrs,
                                       overrides=["optimizer.lr=0.01", *overrides]))[0])


def test_clip_harder_when_instability_persists_with_clipping(tmp_path):
    """The Playbook: "if we try gradient clipping and the instability issues remain, we can try it harder"; the
    new threshold is the 90th percentile of the unclipped norms, or half the old one when it is already tighter,
    and a lower LR instead of a clip that would clip over half of the updates."""
    n = 300
    norms = list(np.linspace(0.5, 1.5, n))
    found = _unstable_while_clipping(tmp_path / "a", norms, ["clip.mode=norm", "clip.max_norm=2.0"])
    p90 = float(f"{np.percentile(norms, 90):.2g}")
    harder = found["clip_harder"]
    assert harder.changes == {"clip.mode": "norm", "clip.max_norm": p90} and p90 < 2.0
    assert harder.evidence["rule"] == "p90" and [e["step"] for e in harder.evidence["events"]] == [200, 250]
    assert "clip.max_norm" not in found["instability_sudden"].changes  # never a looser clip while clipping
    # the threshold is already below the 90th percentile: half of it (20% of the norms are large)
    tail = [0.2] * 240 + [3.0] * 60
    found = _unstable_while_clipping(tmp_path / "b", tail, ["clip.max_norm=2.0"])
    assert found["clip_harder"].changes == {"clip.mode": "norm", "clip.max_norm": 1.0}
    assert found["clip_harder"].evidence["rule"] == "half"
    # every update clipped already: a tighter clip is "a strange way of reducing the learning rate"
    found = _unstable_while_clipping(tmp_path / "c", list(np.linspace(1.5, 2.5, n)), ["clip.max_norm=1.0"])
    assert found["clip_harder"].changes == {"optimizer.lr": 0.005}
    # online percentile clipping: halfway to the median
    found = _unstable_while_clipping(tmp_path / "d", norms, ["clip.mode=percentile", "clip.calibration_steps=50"])
    assert found["clip_harder"].changes == {"clip.mode": "percentile", "clip.percentile": 70.0}
    # no clipping: no clip_harder; the sudden instability's remedy is clipping at the 90th percentile
    found = _unstable_while_clipping(tmp_path / "e", norms, ["clip.mode=none"])
    assert "clip_harder" not in found and found["instability_sudden"].changes["clip.max_norm"] == p90
    # clipping only after a warmup that outlasts the events: they did not happen while clipping
    lrs = [0.01 * min(1.0, (i + 1) / 280) for i in range(n)]
    found = _unstable_while_clipping(tmp_path / "f", norms, ["clip.start_after_warmup=true", "schedule.warmup=280"],
                                     lrs=lrs)
    assert "clip_harder" not in found
    # percentile clipping still calibrating when the events came: not while clipping either, so the sudden
    # instability's remedy still says to clip at the 90th percentile, from the start
    found = _unstable_while_clipping(tmp_path / "g", norms, ["clip.mode=percentile", "clip.calibration_steps=280"])
    assert "clip_harder" not in found and found["instability_sudden"].changes["clip.max_norm"] == p90


# ---------------------------------------------------------------------------------------------- hostile logs


def _edit_step_record(run, number, values):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in lines:
        if record.get("kind") == "step" and record["step"] == number:
            record.update(values)
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in lines))


@pytest.mark.parametrize("values", [{"step": "five"}, {"loss": "x"}, {"loss": True}, {"grad_norm": [1]},
                                    {"step": 5.5}, {"loss": 10**400}])
def test_a_record_that_is_not_numbers_is_one_line_and_exit_2(tmp_path, capsys, values):
    run = make_run(tmp_path / "r", list(np.linspace(2.3, 1.0, 40)))
    _edit_step_record(run, 5, values)
    assert main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err
    key = next(iter(values))
    assert err.count("\n") == 1 and f"metrics record 6 (step): {key} is" in err and "Traceback" not in err


def test_losses_and_gradient_norms_of_1e308_are_diagnosed_and_reported(tmp_path, capsys):
    n = 60
    run = make_run(tmp_path / "r", [1e308] * n, norms=[1e308] * n, lrs=[1e-3] * n,
                   evals=[{"kind": "eval", "step": s, "val_loss": 1e308, "train_eval_loss": 1e308}
                          for s in (20, 40, 60)])
    assert main(["diagnose", str(run)]) == 0
    assert (run / "grad_norm.png").stat().st_size > 1000
    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 1000


@pytest.mark.parametrize("out", [".", "", "RUN"])
def test_report_out_a_directory_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, out):
    run = make_run(tmp_path / "r", list(np.linspace(2.3, 1.0, 40)))
    monkeypatch.chdir(tmp_path)
    out = str(run) if out == "RUN" else out
    assert main(["report", str(run), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory; allowed: the path of the HTML file" in err
