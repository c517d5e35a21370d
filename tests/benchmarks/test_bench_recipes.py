"""benchmarks/bench_recipes.py: the time-to-target arithmetic on known curves, the step-by-step interleaving, and
the whole benchmark end to end at ``--budget smoke`` (a real ``keel sweep`` per recipe, real training runs)."""

import json
import math
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_recipes as bench  # noqa: E402


def _run(arm, seed, horizon, losses, step_seconds=0.1, variants=("", "+ema", "+avg"), group=None, lr=1e-3,
         every=10, ema_share=0.0):
    """A fake seeded run: evaluations every `every` steps with the given losses (the EMA and the checkpoint
    average 0.01 and 0.02 above)."""
    evals = []
    for i, loss in enumerate(losses, 1):
        step = i * every
        evals.append({"step": step, "tokens": step * 100, "val_loss": loss, "val_loss_ema": loss + 0.01,
                      "train_seconds": step * step_seconds * (1 + ema_share),
                      "ema_seconds": step * step_seconds * ema_share})
    avg = [{"step": e["step"], "val_loss_avg": e["val_loss"] + 0.02, "avg_seconds": 0.0} for e in evals]
    return {"arm": arm, "seed": seed, "horizon": horizon, "lr": lr, "variants": list(variants), "evals": evals,
            "avg": avg, "group": group or f"g{seed}-{horizon}"}


def test_crossing_interpolates_between_evaluations():
    points = [{"step": 10, "tokens": 100, "seconds": 1.0, "loss": 3.0},
              {"step": 20, "tokens": 200, "seconds": 2.0, "loss": 2.0}]
    assert bench.crossing(points, 2.5) == {"step": 15.0, "tokens": 150.0, "seconds": 1.5}
    assert bench.crossing(points, 3.5) == {"step": 10, "tokens": 100, "seconds": 1.0}
    assert bench.crossing(points, 1.9) is None


def test_curve_counts_the_ema_update_only_for_the_ema_rows():
    run = _run("baseline", 0, 1.0, [3.0, 2.0], step_seconds=1.0, ema_share=0.5)
    assert [p["seconds"] for p in bench.curve(run, "")] == [10.0, 20.0]
    assert [p["seconds"] for p in bench.curve(run, "+ema")] == [15.0, 30.0]
    assert [p["loss"] for p in bench.curve(run, "+avg")] == pytest.approx([3.02, 2.02])


def test_table_speedups_targets_gaps_and_time_bases():
    base = [3.0, 2.6, 2.3, 2.1]  # target: 2.1 at step 40
    fast = [2.8, 2.1, 1.9, 1.8]  # reaches 2.1 at step 20: 2x
    slow = [3.2, 3.0, 2.9, 2.8]  # never: 0.7 above
    runs = []
    for seed in range(3):
        runs += [_run("baseline", seed, 1.0, base), _run("fast", seed, 1.0, fast, step_seconds=0.2),
                 _run("slow", seed, 1.0, slow)]
        # a half-horizon group that ran on a machine twice as slow: its time base is put back through its baseline
        runs += [_run("baseline", seed, 0.5, base[:2], step_seconds=0.2), _run("fast", seed, 0.5, [2.9, 2.0],
                                                                               step_seconds=0.4)]
    rows, targets = bench.table(runs, 3)
    assert targets == {0: 2.1, 1: 2.1, 2: 2.1}
    by = {r["recipe"]: r for r in rows}
    assert by["baseline"]["speedup"]["step"]["median"] == pytest.approx(1.0)
    assert by["baseline"]["speedup"]["seconds"]["median"] == pytest.approx(1.0)
    fast_row = by["fast"]
    assert fast_row["reached"] == 3
    # full horizon: step 20; half horizon: 2.9 -> 2.0 (steps 10, 20) crosses 2.1 at 10 + 10 * 0.8 / 0.9
    hit = 10 + 10 * 0.8 / 0.9
    assert fast_row["speedup"]["step"]["median"] == pytest.approx(40 / hit)
    assert fast_row["speedup"]["tokens"]["median"] == pytest.approx(40 / hit)
    # seconds: 0.4 s/step in a group whose baseline took 0.2 s/step -> 0.2 s/step on the reference's time base;
    # the reference baseline: 0.1 s/step, 40 steps
    assert fast_row["speedup"]["seconds"]["median"] == pytest.approx(4.0 / (hit * 0.2))
    assert by["slow"]["reached"] == 0 and by["slow"]["speedup"]["tokens"] is None
    assert by["slow"]["gap"] == pytest.approx([0.7, 0.7, 0.7])
    assert by["fast +avg"]["reached"] == 3  # 0.02 above: still crosses, later
    assert by["fast +avg"]["speedup"]["step"]["median"] < fast_row["speedup"]["step"]["median"]
    winner = bench.robust_winner(rows, 3)
    assert winner["recipe"] == "fast"
    assert "not reached (best +0.700)" in bench.section({
        "machine": {"date": "d", "cpu": "c", "cores": 2, "load_average": [0, 0, 0], "torch": "t"},
        "machine_end": {"load_average": [0, 0, 0]}, "budget": bench.BUDGETS["smoke"], "budget_name": "smoke",
        "seeds": 3, "table": rows, "target_median": 2.1, "minutes": 1, "plot": "recipes.png"})


def test_reference_only_runs_set_a_time_base_but_are_no_row():
    runs = [_run("baseline", 0, 1.0, [3.0, 2.0]), _run("combo", 0, 1.0, [2.0, 1.9], group="c", step_seconds=0.3),
            {**_run("baseline", 0, 1.0, [3.0, 2.0], group="c", step_seconds=0.3), "reference_only": True}]
    rows, _ = bench.table(runs, 1)
    assert [r["recipe"] for r in rows if not r["variant"]] == ["baseline", "combo"]
    combo = next(r for r in rows if r["recipe"] == "combo")
    assert combo["speedup"]["seconds"]["median"] == pytest.approx(combo["speedup"]["step"]["median"])


def test_combinations_pair_the_best_optimizer_with_the_best_decay():
    def row(arm, tokens):
        return {"arm": arm, "variant": "", "speedup": {"tokens": {"median": tokens}}}

    rows = [row("baseline", 1.0), row("muon", 1.3), row("lion", 0.9), row("wsd", 1.2), row("sqrt decay", 1.1),
            row("seq warmup", 1.05)]
    assert bench.combinations(rows) == {"muon + wsd": ("muon", "wsd", False),
                                        "muon + wsd + seq warmup": ("muon", "wsd", True)}
    rows = [row("baseline", 1.0), row("muon", 0.9), row("wsd", 1.2), row("seq warmup", 0.9)]
    assert bench.combinations(rows) == {}  # adamw + wsd is the wsd arm itself


def test_baton_gives_turns_round_robin_until_each_thread_is_done():
    baton, order = bench.Baton(3), []
    steps = {0: 2, 1: 4, 2: 3}

    def worker(i):
        baton.wait(i)
        try:
            for _ in range(steps[i]):
                baton.pass_on(i)
                baton.wait(i)
                order.append(i)
        finally:
            baton.pass_on(i, done=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert order == [0, 1, 2, 0, 1, 2, 1, 2, 1]  # each init in turn first, then one step each in turn


def test_smoke_budget_end_to_end(tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("matplotlib")
    data = bench.main(["--budget", "smoke", "--workers", "1", "--arms", "wsd", "--no-combinations",
                       "--out", str(tmp_path), "--no-write"])
    saved = json.loads((tmp_path / "recipes.json").read_text())
    assert (tmp_path / "recipes.png").stat().st_size > 10_000
    assert "| baseline | " in (tmp_path / "recipes.md").read_text()
    assert [r["recipe"] for r in saved["table"]] == ["baseline", "baseline +ema", "baseline +avg", "wsd", "wsd +ema",
                                                     "wsd +avg"]
    grid = bench.lr_grid(bench.OPTIMIZERS["adamw"][1], bench.BUDGETS["smoke"]["lr_points"])
    for name in ("baseline", "wsd"):
        assert {t["lr"] for t in data["tuned"][name]["trials"]} == set(grid)  # every grid point was a sweep trial
        assert set(data["tuned"][name]["best_lr"].values()) <= set(grid)
        for variant, lr in data["tuned"][name]["best_lr"].items():  # the best of the sweep, per variant
            assert lr == min(data["tuned"][name]["trials"], key=lambda t: t["loss"][variant])["lr"]
    base = data["table"][0]
    assert base["speedup"]["tokens"]["median"] == pytest.approx(1.0)
    assert math.isfinite(data["targets"][0]) and data["targets"][0] == pytest.approx(base["final"][0])
    for row in data["table"]:
        assert (row["reached"] == 1) != bool(row["gap"])  # reached, or how close it came
