"""The Tuning Playbook's procedures of `keel diagnose --config` on a synthetic model of training (tests/diagnose/
synthetic.py): every probe is a closed-form function of its LR schedule, so each finding is produced on purpose,
deterministically and in a fraction of a second: the best LR at the edge of stability, the 2x probe's two verdicts,
the warmup search at 10x and 100x the lowest unstable LR, the comparison of the warmups with the baseline by best
checkpoint, a longer run for a long warmup, a warmup not found, clipping harder, and --schedule constant."""

import math

import pytest

from keel.cli.main import main
from keel.config import load_config
from keel.diagnose.active import Plan, Session, best_checkpoint, constant_schedule
from keel.diagnose.findings import read_diagnosis
from keel.diagnose.probes import Display, ProbeResult
from synthetic import Synthetic, run_session

# A stable config (momentum-free SGD at a constant LR, no clipping) on the synthetic model: its LR sweep finds the
# best LR, 0.0316, next to an infeasible 0.1, and 10x / 100x that lowest unstable LR need warmups of 10 / 100 steps.
STABLE = {"task": "digits", "max_steps": 1000, "optimizer": {"name": "sgd", "lr": 0.03},
          "schedule": {"name": "constant"}, "clip": {"mode": "none"}}


def kinds(diagnosis):
    return {f.kind: f for f in diagnosis.findings}


def test_best_lr_at_the_edge_of_stability_and_the_2x_probe_verdicts(tmp_path):
    session = run_session(STABLE, tmp_path / "a")
    found = kinds(session.diagnosis)
    edge = found["lr_at_edge_of_stability"]
    assert edge.evidence["best_lr"] == pytest.approx(0.0316) and edge.evidence["next_infeasible_lr"] == 0.1
    # 2x lr* diverges at once: early instability, seen because the probe evaluates every step
    early = found["early_instability"]
    assert early.evidence["evaluated_every_step"] and early.evidence["early"]
    assert early.evidence["lr"] == pytest.approx(2 * session.lr_star)
    assert "instability_probe" not in found and 2 * session.lr_star in session.unstable_lrs
    # a model that tolerates a little more: 2x lr* trains, the probe says so
    found = kinds(run_session(STABLE, tmp_path / "b", Synthetic(edge=0.26)).diagnosis)
    assert found["instability_probe"].severity == "info" and "early_instability" not in found
    assert found["instability_probe"].evidence["steps_run"] == 500  # Plan().instability_steps, every step evaluated


def test_warmup_search_at_10x_and_100x_then_compared_with_the_baseline_by_best_checkpoint(tmp_path):
    session = run_session(STABLE, tmp_path / "out")
    searched = {w["factor"]: w for w in session.results["warmup"]}
    assert searched[10]["base_lr"] == pytest.approx(0.632) and searched[10]["found"] == 10
    assert searched[100]["base_lr"] == pytest.approx(6.32) and searched[100]["found"] == 100
    assert [t["warmup"] for t in searched[100]["tried"]] == [10, 100]  # from the warmup 10x needed, up
    compare = session.results["compare"]
    assert compare["baseline"]["best_step"] == 200  # the config run: 200 steps, evaluated every 50
    rows = {r["factor"]: r for r in compare["candidates"]}
    assert rows[10]["steps_run"] == 200 + 10 and rows[100]["steps_run"] == 200 + 100  # the warmup prepended
    assert rows[10]["changes"] == {"optimizer.lr": 0.632, "schedule.warmup": 10, "max_steps": 1010}
    # both higher LRs train, but neither beats the baseline's best checkpoint: recommended.yaml keeps the LR
    found = kinds(session.diagnosis)
    assert "warmup_unlocks_lr" not in found and found["warmup_no_gain"].evidence["reference_best_step"] == 200
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.optimizer["lr"] == 0.03 and config.max_steps == 1000


def test_a_warmup_that_unlocks_a_better_higher_lr_goes_into_recommended_yaml(tmp_path):
    slow = {**STABLE, "optimizer": {"name": "sgd", "lr": 0.001}}  # stable, but far below what the model takes
    session = run_session(slow, tmp_path / "out")
    unlocks = kinds(session.diagnosis)["warmup_unlocks_lr"]
    assert unlocks.changes == {"optimizer.lr": 0.632, "schedule.warmup": 10, "max_steps": 1010}
    assert unlocks.evidence["best_val_loss"] < unlocks.evidence["reference_best_val_loss"]
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.optimizer["lr"] == 0.632 and config.schedule["warmup"] == 10 and config.max_steps == 1010
    assert read_diagnosis(tmp_path / "out").changes["optimizer.lr"] == 0.632
    assert kinds(session.diagnosis)["recommended_verified"].evidence["steps_run"] == 200


def test_an_unstable_config_gets_the_warmup_its_lr_needs_and_a_longer_run(tmp_path):
    # LR 0.8 at once diverges; a warmup of 10 is too short for it, 20 (10% of the run) is enough
    unstable = {**STABLE, "max_steps": 200, "optimizer": {"name": "sgd", "lr": 0.8}}
    session = run_session(unstable, tmp_path / "out", plan=Plan(verify=False))
    found = kinds(session.diagnosis)
    assert found["unstable_config"].severity == "error"
    assert found["warmup"].evidence["warmup_steps"] in (10, 20)  # (the last warmup finding: 10x)
    ours = next(w for w in session.results["warmup"] if w["factor"] is None)
    assert [t["status"] for t in ours["tried"]] == ["diverged", "stable"] and ours["found"] == 20
    lengthen = found["lengthen_run"]
    assert lengthen.evidence["fraction"] == 0.1 and lengthen.changes == {"max_steps": 220}
    # 100x the lowest unstable LR (2x lr*) is out of reach of every warmup up to 10% of the run
    missing = found["warmup_not_found"]
    assert missing.evidence["base_lr"] == pytest.approx(100 * 2 * session.lr_star, rel=1e-2)
    assert missing.evidence["results"] == {"10": "diverged", "20": "diverged"}
    assert "warmup_unlocks_lr" not in found  # 10x (0.632) trains with a warmup, but is below your LR
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.schedule["warmup"] == 20 and config.max_steps == 220 and config.optimizer["lr"] == 0.8


def test_100x_is_not_searched_when_10x_found_no_warmup(tmp_path):
    short = {**STABLE, "max_steps": 100, "optimizer": {"name": "sgd", "lr": 0.8}}  # warmups up to 10 steps only
    session = run_session(short, tmp_path / "out", Synthetic(tau=20), plan=Plan(verify=False))  # warmup helps less
    assert [w["factor"] for w in session.results["warmup"]] == [None, 10]
    assert all(w["found"] is None for w in session.results["warmup"])
    assert load_config(tmp_path / "out" / "recommended.yaml").optimizer["lr"] == pytest.approx(session.lr_star,
                                                                                                rel=0.05)
    skipped = [s for s in session.diagnosis.skipped if "100x" in s.procedure]
    assert len(skipped) == 1 and not skipped[0].bad_input
    assert "warmup comparison" not in {s.procedure for s in session.diagnosis.skipped}


def _config_run(steps=42, spike_at=40):
    """A constructed config run: large norms for 10 steps, then small; a spike and a blow-up at ``spike_at``."""
    result = ProbeResult("config", None, steps)
    for t in range(spike_at + 2):
        norm = 3.0 if t < 10 else 6.0 if t == spike_at else 0.5
        loss = math.nan if t == spike_at + 1 else 5.0 * math.exp(-t / 20)
        result.steps.append(t)
        result.losses.append(loss)
        result.lrs.append(0.1)
        result.norms.append(norm)
        result.clipped.append(norm > 2.0)
        result.step_times.append(1e-3 * t)
    result.unstable_error, result.stopped = True, "3 consecutive non-finite losses"
    result.records = [{"kind": "step", "step": s, "loss": v, "lr": 0.1, "grad_norm": g, "clipped": c}
                      for s, v, g, c in zip(result.steps, result.losses, result.norms, result.clipped)]
    return result


@pytest.mark.parametrize("clip, expected", [({"mode": "norm", "max_norm": 2.0}, 1.0),
                                            ({"mode": "none"}, 3.0)])
def test_an_unstable_config_that_clips_already_is_told_to_clip_harder(tmp_path, clip, expected):
    """Its 90th percentile (3.0) is above its threshold (2.0): the Playbook's P90 rule would loosen the clip;
    clipping harder halves it (1.0 clips 26% of these updates). Without clipping, the P90 rule."""
    raw = {**STABLE, "optimizer": {"name": "sgd", "lr": 0.1}, "clip": clip}
    session = Synthetic().attach(Session(raw, tmp_path / "out", budget=600, plan=Plan(verify=False),
                                         display=Display(enabled=False)))
    session.probe = lambda name, **options: _config_run()
    session.setup()
    session.config_run()
    session.recommend()
    found = kinds(session.diagnosis)
    assert session.changes["clip.max_norm"] == expected
    if clip["mode"] == "norm":
        harder = found["clip_harder"]
        assert harder.evidence["rule"] == "half" and harder.evidence["new_max_norm"] == 1.0
        assert harder.evidence["events"][0]["step"] == 41
    else:
        assert "clip_harder" not in found


def test_schedule_constant_runs_the_procedures_at_a_constant_lr_and_recommends_it(tmp_path):
    cosine = {**STABLE, "schedule": {"name": "cosine", "warmup": 10, "min_lr": 0.003}}
    session = run_session(cosine, tmp_path / "out", schedule="constant")
    lrs = session.results["config"]["curve_lrs"]
    assert lrs[0] == 0.0 and set(lrs[10:]) == {0.03}  # the config's warmup, then constant
    found = kinds(session.diagnosis)["schedule_last"]
    assert found.evidence["your_schedule"]["name"] == "cosine" and found.evidence["used"]["name"] == "constant"
    text = (tmp_path / "out" / "recommended.yaml").read_text()
    assert "--schedule constant" in text.split("\nrecipe:")[0]
    config = load_config(tmp_path / "out" / "recommended.yaml")
    assert config.schedule["name"] == "constant" and config.schedule["warmup"] == 10
    # the default keeps your schedule
    default = run_session(cosine, tmp_path / "default")
    assert default.results["config"]["curve_lrs"][-1] < 0.03 and "schedule_last" not in kinds(default.diagnosis)
    assert load_config(tmp_path / "default" / "recommended.yaml").schedule["name"] == "cosine"


def test_constant_schedule_keeps_the_warmup():
    assert constant_schedule({"name": "cosine", "warmup": "5%", "min_lr": 1e-4}) == {"name": "constant",
                                                                                      "warmup": "5%"}
    assert constant_schedule({"name": "warmup", "steps": 100, "schedule": {"name": "exponential", "rate": 0.99}}) \
        == {"name": "constant", "warmup": 100}
    assert constant_schedule({"name": "step", "step_size": 10}) == {"name": "constant"}


def test_best_checkpoint_is_the_lowest_evaluation_not_the_last():
    result = ProbeResult("p", 0.1, 30)
    result.evals = [{"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.0}, {"step": 30, "val_loss": 2.5},
                    {"step": 31, "val_loss": math.nan}]
    assert best_checkpoint(result) == (20, 2.0)
    assert best_checkpoint(ProbeResult("q", 0.1, 1)) is None


def test_schedule_option_goes_with_config_only(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["diagnose", str(tmp_path / "run"), "--schedule", "constant"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--schedule" in err


def test_schedule_option_reaches_the_session(tmp_path, monkeypatch, capsys):
    import yaml

    from keel.diagnose import active
    from keel.diagnose.findings import Diagnosis

    seen = {}

    def fake(raw, out, budget, **options):
        seen.update(options)
        return type("S", (), {"diagnosis": Diagnosis("config", "c.yaml")})()

    monkeypatch.setattr(active, "diagnose_config", fake)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(STABLE))
    assert main(["diagnose", "--config", str(config), "--schedule", "constant", "--out", str(tmp_path / "o")]) == 0
    assert seen["schedule"] == "constant"
    assert main(["diagnose", "--config", str(config), "--out", str(tmp_path / "p")]) == 0
    assert seen["schedule"] == "config"
