"""benchmarks/bench_gpu.py: its arithmetic on known inputs, and every section end to end at ``--smoke`` on the CPU
(tiny model, compiled contenders through dynamo's eager backend), results into a temporary folder only."""

import hashlib
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_gpu as bench  # noqa: E402
import bench_recipes  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"


def _run(recipe, lr, losses, step_seconds, tokens_per_step=100, every=10):
    evals = [{"step": i * every, "tokens": i * every * tokens_per_step, "val_loss": loss,
              "train_seconds": i * every * step_seconds} for i, loss in enumerate(losses, 1)]
    return {"recipe": recipe, "lr": lr, "evals": evals}


def test_headline_tunes_the_baseline_and_times_the_fast_recipe_to_its_final_loss():
    runs = [_run("baseline", 1e-3, [3.0, 2.8, 2.6, 2.5], 0.1),
            _run("baseline", 2e-3, [2.9, 2.6, 2.3, 2.2], 0.1),  # the tuned one: target 2.2 at step 40
            _run("baseline", 4e-3, [3.5, 3.4, float("nan"), float("nan")], 0.1),  # diverged
            _run("fast", 2e-2, [2.6, 2.2, 2.0, 1.9], 0.15)]  # 2.2 at step 20, each step 1.5x as long
    table = bench.headline_table(runs)
    assert table["target"] == 2.2 and table["tuned_baseline_lr"] == 2e-3
    assert table["tokens_speedup"] == pytest.approx(2.0)
    assert table["seconds_speedup"] == pytest.approx(4.0 / 3.0)  # 40 x 0.1 s against 20 x 0.15 s
    assert table["fast_over_baseline_tokens_per_second"] == pytest.approx(0.1 / 0.15)
    rows = {(r["recipe"], r["lr"]): r for r in table["rows"]}
    assert rows[("baseline", 4e-3)]["hit"] is None and rows[("baseline", 1e-3)]["hit"] is None
    # the same crossing arithmetic as bench_recipes
    assert rows[("fast", 2e-2)]["hit"] == bench_recipes.crossing(bench.points(runs[3]), 2.2)


def test_newton_schulz_flops_of_gpt2_small_are_the_issues_1_52_tflop():
    hidden = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    assert bench.ns_flops(hidden) / 1e12 == pytest.approx(1.52, abs=0.01)


def test_without_cuda_only_the_smoke_budget_runs():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit):
        bench.main([])


def test_smoke_budget_end_to_end(tmp_path):
    before = hashlib.sha256(RESULTS.read_bytes()).hexdigest()
    bench.main(["--smoke", "--out", str(tmp_path)])
    assert hashlib.sha256(RESULTS.read_bytes()).hexdigest() == before  # no figure of a smoke run in RESULTS.md
    data = json.loads((tmp_path / "gpu.json").read_text())
    body = (tmp_path / "gpu.md").read_text()
    assert set(data["sections"]) == set(bench.SECTIONS) and not data["skipped"] and not data["errors"]
    peak = data["peak"]
    s = data["sections"]

    for name in ("eager", "compiled"):  # tokens/s, the keel / bare ratio and MFU from the timed blocks
        row = s["trainer"][name]
        assert row["compiled"] is (name == "compiled")
        times = row["block_seconds"]
        assert len(times["keel"]) == len(times["bare"]) == data["budget"]["blocks"]
        for who in ("keel", "bare"):
            speed = row["tokens_per_block"] / statistics.median(times[who])
            assert row[f"{who}_tokens_per_second"] == pytest.approx(speed)
            assert row[f"{who}_mfu"] == pytest.approx(row["flops_per_token"] * speed / (peak * 1e12), rel=1e-5)
        ratios = [b / k for k, b in zip(times["keel"], times["bare"])]
        assert row["ratio_keel_over_bare"]["median"] == pytest.approx(statistics.median(ratios))

    tokens_per_step = data["budget"]["batch"] * data["budget"]["model"]["block_size"]
    for precision, row in s["precision"].items():
        assert row["tokens_per_second"] == pytest.approx(tokens_per_step / statistics.median(row["step_seconds"]))

    o = s["optimizers"]
    assert o["bandwidth_bytes_per_second"] == pytest.approx(12 * o["numel"] / o["probe_seconds"])
    names = {r["optimizer"] for r in o["rows"]}
    assert {"adamw", "lion", "ademamix", "muon", "sgd", "adafactor"} <= names
    for row in o["rows"]:
        if row["optimizer"] in bench.BYTES_PER_PARAM:
            expected = bench.BYTES_PER_PARAM[row["optimizer"]] * o["numel"] / (row["step_ms"] / 1e3)
            assert row["eta"] == pytest.approx(expected / o["bandwidth_bytes_per_second"])
    assert {r["path"] for r in o["rows"] if r["optimizer"] == "lion"} == {"compiled", "eager (foreach)"}

    m = s["muon"]
    assert m["steps_ms"] and not m["auto_batched"]  # the CPU: torch's Muon, one matrix at a time
    for run in m["newton_schulz"].values():
        assert run["tflops"] == pytest.approx(m["ns_tflop"] / (run["ms"] / 1e3), rel=1e-6)

    so = s["soap"]
    assert so["soap_over_step"] == pytest.approx(so["batched, auto precision"]["step_ms"] / so["forward_backward_ms"])
    assert so["batched, auto precision"]["path"] == "one matrix at a time"  # the CPU's default: not batched

    h = s["headline"]
    finals = {r["lr"]: r["final"] for r in h["rows"] if r["recipe"] == "baseline"}
    assert h["tuned_baseline_lr"] == min(finals, key=finals.get) and h["target"] == min(finals.values())
    assert len(finals) >= 3 and [r["recipe"] for r in h["rows"]].count("fast") == 1
    for row, run in zip(h["rows"], h["runs"]):
        assert row["hit"] == bench_recipes.crossing(bench.points(run), h["target"])
    for heading in ("### trainer", "### precision", "### optimizer steps", "### Muon", "### SOAP", "### headline"):
        assert heading in body
