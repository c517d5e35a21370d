"""keel sweep with real components: Optuna on SQLite with two local worker processes, failed trials recorded as data,
--resume, a killed worker's trial retried once (SQLite, and PostgreSQL on a throwaway cluster), the presets."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

import keel  # noqa: E402
from keel.cli.main import main  # noqa: E402
from keel.config import load_config  # noqa: E402

SRC = str(Path(keel.__file__).resolve().parents[1])
DIGITS = {"task": "digits", "max_steps": 30, "eval_interval": 10, "checkpoint_interval": 10, "device": "cpu",
          "threads": 1}


def write_config(path: Path, sweep: dict, options: dict | None = None, **changes) -> Path:
    config = {**DIGITS, **changes, "sweep": sweep}
    if options:
        config["sweep_options"] = options
    path.write_text(yaml.safe_dump(config))
    return path


def read_trials(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def test_two_local_workers_share_a_sqlite_study(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {"optimizer.lr": "loguniform(1e-3, 3e-2)",
                                                "optimizer.weight_decay": [0.0, 1e-4]}, {"sampler": "random"})
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--trials", "4", "--workers", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[worker 0] trial" in printed and "[worker 1] trial" in printed
    rows = read_trials(out / "trials.csv")
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2, 3]
    assert all(r["state"] == "complete" for r in rows)
    assert len({r["worker"] for r in rows}) == 2  # both processes ran trials
    run_dirs = [out / r["run_dir"] for r in rows]
    assert len(set(run_dirs)) == 4 and all((d / "model.safetensors").is_file() for d in run_dirs)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    trained = load_config(out / "best.yaml")  # keel train accepts it as it is
    assert trained.optimizer["lr"] == pytest.approx(float(best["optimizer.lr"]))
    assert "sweep:" not in (out / "best.yaml").read_text() and "sweep_options:" not in (out / "best.yaml").read_text()
    for name in ("objective_optimizer.lr.png", "objective_optimizer.weight_decay.png", "history.png",
                 "importances.png"):
        assert (out / name).stat().st_size > 1000, name


def test_a_users_task_is_searched_in_worker_processes(tmp_path, monkeypatch):
    tasks_dir = str(Path(__file__).resolve().parents[1] / "tasks")
    monkeypatch.syspath_prepend(tasks_dir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SRC, tasks_dir, os.environ.get("PYTHONPATH", "")]))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "user_task:make", "max_steps": 20, "eval_interval": 10, "device": "cpu",
                                      "threads": 1, "sweep": {"task_args.hidden": [8, 16]}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--workers", "2", "--out", str(out)]) == 0
    rows = read_trials(out / "trials.csv")
    assert sorted(r["task_args.hidden"] for r in rows) == ["16", "8"] and all(r["state"] == "complete" for r in rows)
    assert "val_accuracy" in (out / rows[0]["run_dir"] / "metrics.jsonl").read_text()


def test_failed_trials_are_recorded_with_their_reason_and_plotted(tmp_path, capsys):
    # lr 50 diverges; a CNN width of 2000 is one the digits task refuses when it is built; the rest trains
    config = write_config(tmp_path / "c.yaml", {"optimizer.lr": [1e-2, 50.0], "task_args.width": [16, 2000]},
                          max_steps=20)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    rows = {(float(r["optimizer.lr"]), int(r["task_args.width"])): r for r in read_trials(out / "trials.csv")}
    assert len(rows) == 4
    assert rows[(1e-2, 16)]["state"] == "complete"
    assert rows[(50.0, 16)]["state"] == "failed"
    assert any(word in rows[(50.0, 16)]["reason"] for word in ("diverged", "non-finite", "nan", "NaN"))
    for lr in (1e-2, 50.0):
        assert rows[(lr, 2000)]["state"] == "failed"
        assert "task_args.width: 2000; allowed: an int from 1 to 1024" in rows[(lr, 2000)]["reason"]
    assert "failed:" in capsys.readouterr().out
    assert (out / "objective_optimizer.lr.png").is_file() and (out / "best.yaml").is_file()


def test_resume_continues_the_study(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"optimizer.lr": "loguniform(1e-3, 3e-2)"}, {"sampler": "random"},
                          max_steps=10)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--trials", "2", "--out", str(out)]) == 0
    assert main(["sweep", str(config), "--trials", "2", "--out", str(out)]) == 2  # not over an existing sweep
    assert main(["sweep", "--resume", str(out), "--trials", "3"]) == 0
    rows = read_trials(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2] and all(r["state"] == "complete" for r in rows)


def test_a_bad_storage_url_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {"optimizer.lr": [1e-3]})
    assert main(["sweep", str(config), "--storage", "nosuchdb://x", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--storage nosuchdb://x" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------- killed worker


def kill_one_worker_mid_trial(tmp_path: Path, storage: str) -> None:
    """Two keel sweep processes (as on two machines) share the study; one is SIGKILLed during a trial. The other
    finishes: the killed trial is failed after two missed heartbeats and retried once; every completed trial is in
    the storage exactly once, and every run directory that completed belongs to a complete trial."""
    config = write_config(tmp_path / "c.yaml", {"optimizer.lr": "loguniform(1e-3, 3e-2)"},
                          {"sampler": "random", "heartbeat_interval": 1}, max_steps=150, eval_interval=50,
                          checkpoint_interval=50)
    command = [sys.executable, "-m", "keel.cli.main", "sweep", str(config), "--trials", "4", "--storage", storage,
               "--study", "shared"]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in "ab"}
    procs = {name: subprocess.Popen([*command, "--out", str(tmp_path / name)], env=env(), stdout=logs[name],
                                    stderr=subprocess.STDOUT) for name in "ab"}
    try:
        killed = None
        deadline = time.time() + 240
        while killed is None and time.time() < deadline:
            for run in sorted((tmp_path / "a" / "trials").glob("trial_*")):
                metrics = run / "metrics.jsonl"
                if metrics.is_file() and metrics.stat().st_size > 0 and not (run / "model.safetensors").exists():
                    procs["a"].send_signal(signal.SIGKILL)
                    killed = int(run.name.removeprefix("trial_"))
                    break
            time.sleep(0.05)
        assert killed is not None, "process a never ran a trial"
        assert procs["a"].wait(timeout=30) == -signal.SIGKILL
        assert procs["b"].wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for handle in logs.values():
            handle.close()

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    stale = next(t for t in trials if t.number == killed)
    assert stale.state == optuna.trial.TrialState.FAIL and "fail_reason" not in stale.user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == stale.params
    finished_dirs = {p.parent for p in tmp_path.glob("[ab]/trials/trial_*/model.safetensors")}
    expected = {tmp_path / ("a" if (tmp_path / "a" / t.user_attrs["run_dir"]).exists() else "b") / t.user_attrs["run_dir"]
                for t in complete}
    assert finished_dirs == expected  # nothing completed twice, nothing completed lost
    rows = {int(r["number"]): r for r in read_trials(tmp_path / "b" / "trials.csv")}
    assert rows[killed]["state"] == "failed" and f"retried as trial {retries[0].number}" in rows[killed]["reason"]


def test_a_killed_worker_loses_no_completed_trial_sqlite(tmp_path):
    kill_one_worker_mid_trial(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def test_a_killed_worker_loses_no_completed_trial_postgresql(tmp_path, postgresql_url):
    kill_one_worker_mid_trial(tmp_path, postgresql_url)


# ---------------------------------------------------------------------------------------- presets


def test_preset_coarse_to_fine(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {}, {"budget": 8, "refine_trials": 2}, max_steps=24, eval_interval=8,
                          checkpoint_interval=8)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--preset", "coarse-to-fine", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("stage 1/4 lr", "stage 2/4 grid", "stage 3/4 refine", "stage 4/4 final"):
        assert title in printed
    lr_rows = read_trials(out / "lr" / "trials.csv")
    assert sorted(float(r["optimizer.lr"]) for r in lr_rows) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert all(r["steps"] == "8" for r in lr_rows if r["state"] == "complete")
    grid_rows = read_trials(out / "grid" / "trials.csv")
    assert len(grid_rows) == 9 and {float(r["optimizer.weight_decay"]) for r in grid_rows} == {1e-4, 1e-5, 0.0}
    assert len(read_trials(out / "refine" / "trials.csv")) == 2
    final = load_config(out / "best.yaml")
    assert final.max_steps == 24 and final.schedule["name"] == "constant"
    assert len(read_trials(out / "trials.csv")) == 4 + 9 + 2 + 1
    assert "stage 2/4 grid" in (out / "summary.txt").read_text()


def _synthetic_trials(monkeypatch):
    """Trials scored by a formula instead of trained (the stages' logic is under test, not training): the loss is
    lowest at LR 10^-1.8 and without weight decay, and a full-length run scores 0.5 lower than a short one."""
    import math

    from keel.sweep import results, study

    def score(stage, params, run_dir, callback, number):
        config = study.trial_config(stage, params)
        lr, wd = float(config.optimizer["lr"]), float(config.optimizer["weight_decay"])
        short = config.max_steps < 24
        return {"step": config.max_steps, "val_loss": (math.log10(lr) + 1.8) ** 2 + 10 * wd + 0.5 * short}

    monkeypatch.setattr(study, "_train_trial", score)
    monkeypatch.setattr(results, "plot_stage", lambda stage, study, rows: [])


def test_preset_coarse_to_fine_carries_survivors_and_repeats_rounds(tmp_path, capsys, monkeypatch):
    """The notes' step 5, the best few configs trained longer without decay, and step 7, go back to step 5:
    --survivors 2 carries two configs from each stage to the next, --repeats 2 runs refine + final twice."""
    _synthetic_trials(monkeypatch)
    config = write_config(tmp_path / "c.yaml", {}, {"budget": 8, "refine_trials": 3}, max_steps=24)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--preset", "coarse-to-fine", "--survivors", "2", "--repeats", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("stage 1/6 lr", "stage 2/6 grid", "stage 3/6 refine", "stage 4/6 final", "stage 5/6 refine",
                  "stage 6/6 final"):
        assert title in printed
    # the two best decades (1e-2, 1e-1) each bring their half-decade neighbours into the grid
    grid = read_trials(out / "grid" / "trials.csv")
    assert {float(r["optimizer.lr"]) for r in grid} == {0.00316, 0.01, 0.0316, 0.1, 0.316} and len(grid) == 15

    def best_two(rows):
        done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["val_loss"]))
        return [(float(r["optimizer.lr"]), float(r["optimizer.weight_decay"])) for r in done[:2]]

    def trained(rows):
        return sorted((float(r["optimizer.lr"]), float(r["optimizer.weight_decay"])) for r in rows)

    # the two best of each round's refined search are each trained for the whole run, without decay
    for refine, final in (("refine", "final"), ("refine-2", "final-2")):
        finals = read_trials(out / final / "trials.csv")
        assert trained(finals) == sorted(best_two(read_trials(out / refine / "trials.csv")))
        assert all(r["state"] == "complete" and r["steps"] == "24" for r in finals)
    # the second round refines around the best long runs of the first (two of them: a range spanning both)
    stage = yaml.safe_load((out / "refine-2" / "stage.yaml").read_text())
    (low, high), = [sorted(p[0] for p in best_two(read_trials(out / "final" / "trials.csv")))]
    assert stage["space"]["optimizer.lr"] == f"loguniform({low / 2:.6g}, {high * 2:.6g})"
    # best.yaml: the best of the four long runs, at a constant LR
    longs = read_trials(out / "final" / "trials.csv") + read_trials(out / "final-2" / "trials.csv")
    winner = min(longs, key=lambda r: float(r["val_loss"]))
    best = load_config(out / "best.yaml")
    assert best.optimizer["lr"] == pytest.approx(float(winner["optimizer.lr"]))
    assert best.max_steps == 24 and best.schedule["name"] == "constant"
    assert len(read_trials(out / "trials.csv")) == 4 + 15 + 3 + 2 + 3 + 2
    # a resumed sweep that is complete trains nothing again (the chosen points are queued once)
    assert main(["sweep", "--resume", str(out)]) == 0
    assert len(read_trials(out / "final-2" / "trials.csv")) == 2 and len(read_trials(out / "trials.csv")) == 29


def test_preset_restarts_continues_the_best_seed_with_a_plain_resume(tmp_path, capsys):
    from keel.rundir.metrics import read_metrics

    config = write_config(tmp_path / "c.yaml", {}, {"budget": "25%", "seeds": 3}, max_steps=32, eval_interval=8,
                          checkpoint_interval=8)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--preset", "restarts", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "median of 3 seeds" in printed and "continued to step 32" in printed
    rows = read_trials(out / "seeds" / "trials.csv")
    assert sorted(int(r["seed"]) for r in rows) == [1337, 1338, 1339] and all(r["steps"] == "8" for r in rows)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    # the continued run equals the same seed trained to the end uninterrupted
    continued = [r for r in read_metrics(out / "seeds" / best["run_dir"] / "metrics.jsonl") if r["kind"] == "step"]
    straight = load_config(out / "best.yaml")
    assert straight.seed == int(best["seed"]) and straight.max_steps == 32
    from keel.train import train

    reference = train(straight, run_dir=tmp_path / "straight", quiet=True)
    assert [r["loss"] for r in continued] == [r["loss"] for r in reference["history"] if r["kind"] == "step"]
