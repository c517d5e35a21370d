"""Cost of `diagnostics.update_ratio_every: 1` per training step, and `keel diagnose --config`'s time per procedure.

1. Update-ratio cost, interleaved step by step: one trainer run measures ||ΔW||/||W|| on every other update
   (`UpdateRatioCallback(every=2)`), so measured and unmeasured steps alternate A B A B in one process. A timing
   callback placed before it marks the start of every step; step i's time is the interval from its start to the
   next one (its snapshot, forward, backward, update, ratios and logging). Reported: the median over pairs of
   (measured step / the unmeasured step after it), min and max of the per-repeat medians. Confirmed by whole runs
   with `update_ratio_every: 1` and off, alternated, from the `time` field of their step records.
2. `keel diagnose --config` on the default workload (`keel train`'s defaults) within its default budget (15 min),
   or `--budget`: wall-clock per procedure, as the command prints it.

    python benchmarks/bench_diagnostics.py [--steps 60] [--repeats 3] [--threads 1] [--task lm digits]
    python benchmarks/bench_diagnostics.py --diagnose [--budget 15m]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_json, write_section  # noqa: E402

from keel.config import load_config  # noqa: E402
from keel.diagnose.update_ratio import UpdateRatioCallback  # noqa: E402
from keel.rundir import RunDir  # noqa: E402
from keel.rundir.metrics import read_metrics  # noqa: E402
from keel.techniques import Callback  # noqa: E402
from keel.train import Trainer  # noqa: E402

WORKLOADS = {"lm": ["recipe=baseline", "sample.tokens=0"], "digits": ["task=digits"]}
QUIET = ["eval_interval=1000000", "checkpoint_interval=1000000"]


class StepTimer(Callback):
    name = "bench_step_timer"

    def __init__(self):
        self.starts: list[float] = []

    def on_step_start(self, trainer) -> None:
        self.starts.append(time.perf_counter())


def interleaved(task: str, steps: int, threads: int) -> dict:
    """One run measuring every other step: median of per-pair ratios (measured / unmeasured)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [*WORKLOADS[task], f"threads={threads}", f"max_steps={steps + 1}", *QUIET,
                                    f"out_dir={Path(tmp) / 'run'}"])
        timer = StepTimer()
        Trainer(config, callbacks=[timer, UpdateRatioCallback(every=2)], quiet=True).fit()
    times = np.diff(timer.starts)  # times[i]: step i
    warm = 6
    ratios = [times[i] / times[i + 1] for i in range(warm, len(times) - 1, 2)]
    return {"ratio": statistics.median(ratios), "measured_ms": float(np.median(times[warm::2]) * 1e3),
            "plain_ms": float(np.median(times[warm + 1::2]) * 1e3), "pairs": len(ratios)}


def unit_cost(task: str, threads: int, repeats: int = 300) -> float:
    """Milliseconds of one measurement by the unit alone (snapshot, then ratios) on the task's model."""
    from keel import tasks
    from keel.diagnose.update_ratio import UpdateRatio

    config = load_config(None, [*WORKLOADS[task], f"threads={threads}"])
    model = tasks.from_config(config).build_model()
    unit = UpdateRatio()
    for _ in range(20):
        unit.snapshot(model.named_parameters())
        unit.ratios(model.named_parameters())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        unit.snapshot(model.named_parameters())
        unit.ratios(model.named_parameters())
        times.append(time.perf_counter() - began)
    return float(np.median(times) * 1e3)


def whole_runs(task: str, steps: int, threads: int, every: int | None) -> float:
    """Median seconds per step of one run, from the `time` field of its step records (first 5 steps left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"diagnostics.update_ratio_every={every}"] if every else []
        config = load_config(None, [*WORKLOADS[task], f"threads={threads}", f"max_steps={steps}", *QUIET, *extra,
                                    f"out_dir={Path(tmp) / 'run'}"])
        Trainer(config, quiet=True).fit()
        stamps = [r["time"] for r in read_metrics(RunDir(Path(tmp) / "run").metrics) if r["kind"] == "step"]
    return float(np.median(np.diff(stamps)[5:]))


def bench_update_ratio(args) -> None:
    """Measure the tasks asked for; results of other tasks from an earlier run are kept (each row says when and
    under what load it was measured)."""
    import json

    from common import HERE

    torch.set_num_threads(args.threads)
    path = HERE / "results" / "diagnostics.json"
    results = json.loads(path.read_text()).get("results", {}) if path.exists() else {}
    for task in args.task:
        load_before = [round(x, 2) for x in os.getloadavg()]
        steps = args.steps * (5 if task == "digits" else 1)  # a digits step is ~40x shorter: more pairs
        medians, measured, plain, runs = [], [], [], []
        for repeat in range(args.repeats):
            r = interleaved(task, steps, args.threads)
            medians.append(r["ratio"])
            measured.append(r["measured_ms"])
            plain.append(r["plain_ms"])
            on = whole_runs(task, steps, args.threads, 1)
            off = whole_runs(task, steps, args.threads, None)
            runs.append(on / off)
            print(f"{task} repeat {repeat}: interleaved ratio {r['ratio']:.4f} ({r['measured_ms']:.2f} vs "
                  f"{r['plain_ms']:.2f} ms/step, {r['pairs']} pairs); whole runs every=1 / off {on / off:.4f}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        info = machine()
        results[task] = {"interleaved_ratio": summary(medians), "whole_run_ratio": summary(runs),
                         "unit_ms": unit_cost(task, args.threads),
                         "measured_ms": measured, "plain_ms": plain, "steps": steps, "repeats": args.repeats,
                         "threads": args.threads, "date": info["date"], "load_before": load_before,
                         "load_after": info["load_average"]}
    info = machine()
    write_json("diagnostics", {"machine": info, "results": results})
    rows = "".join(
        f"| {task} | {r['interleaved_ratio']['median']:.4f} | {r['interleaved_ratio']['min']:.4f} | "
        f"{r['interleaved_ratio']['max']:.4f} | {(r['interleaved_ratio']['median'] - 1) * 100:+.2f}% | "
        f"{r['whole_run_ratio']['median']:.4f} [{r['whole_run_ratio']['min']:.4f}, {r['whole_run_ratio']['max']:.4f}] "
        f"| < 5% | {statistics.median(r['plain_ms']):.2f} ms | "
        f"{r.get('unit_ms', math.nan):.3f} ms ({r.get('unit_ms', math.nan) / statistics.median(r['plain_ms']):.1%}) | "
        f"{r['steps']} x {r['repeats']} | {r['date']}; "
        f"{', '.join(map(str, r['load_before']))} -> {', '.join(map(str, r['load_after']))} |\n"
        for task, r in sorted(results.items()))
    body = (
        f"{info['cpu']}, {info['cores']} cores, {args.threads} thread(s); torch {info['torch']}. "
        "`python benchmarks/bench_diagnostics.py [--task lm digits] [--steps 60] [--repeats 3]`.\n\n"
        "Per-step time with `diagnostics.update_ratio_every: 1` (snapshot of the weights, ||ΔW||/||W|| of every "
        "weight matrix, one metrics record) / without. Interleaved: measured and unmeasured steps alternate within "
        "one run (first 6 steps left out); the median of per-pair ratios of each repeat, min and max over the "
        "repeats. Whole runs: every=1 and off alternated, median step time from the step records' `time` field; "
        "minutes apart, so load drift on a shared machine spreads them far more than the interleaved pairs.\n\n"
        "The unit alone: one snapshot and one ratio computation on the workload's model, timed apart from "
        "training (median of 300), and its share of the unmeasured step's median time.\n\n"
        "| workload | interleaved ratio (median) | min | max | overhead | whole runs every=1 / off [min, max] | "
        "target | step without | unit alone (share of a step) | steps x repeats | date; load average before -> "
        "after |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + rows
        + "".join(f"\n- miss: {task}: {(r['interleaved_ratio']['median'] - 1) * 100:+.1f}% per step at every=1, "
                  f"over the 5% target. The unit costs {r.get('unit_ms', math.nan):.2f} ms per measurement "
                  "(a fixed cost of a few foreach calls and one record, whatever the model), which is a larger "
                  "share of a step this short; on a loaded machine a slightly longer step is also preempted more "
                  "often. `update_ratio_every: 10` divides the cost by ten.\n"
                  for task, r in sorted(results.items()) if r["interleaved_ratio"]["median"] > 1.05))
    write_section("diagnostics: update-ratio cost", body)


def bench_diagnose(args) -> None:
    from keel.diagnose.active import DEFAULT_BUDGET, diagnose_config, parse_budget
    from keel.diagnose.probes import Display

    budget = parse_budget(args.budget or DEFAULT_BUDGET)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        session = diagnose_config({}, Path(tmp) / "out", budget, target="default workload", display=Display())
        wall = time.perf_counter() - started
    diagnosis = session.diagnosis
    info = machine()
    info["load_average_before"] = load_before
    results = session.results
    sweep = results.get("sweep", {})
    counts = {
        "overfit steps": results.get("overfit", {}).get("steps_run"),
        "config run steps": results.get("config", {}).get("steps_run"),
        "sweep runs x steps": f"{len(sweep.get('points', []))} x {sweep.get('steps')}",
        "instability (2x) steps": len(results.get("instability", {}).get("steps", [])),
        "5x/10x steps": [j.get("steps_run") for j in results.get("jumps", [])],
        "warmup runs": sum(len(w["tried"]) for w in results.get("warmup", [])),
    }
    write_json("diagnose", {"machine": info, "budget": budget, "wall": wall, "timings": diagnosis.timings,
                            "counts": counts, "findings": [f.kind for f in diagnosis.findings],
                            "skipped": [s.line() for s in diagnosis.skipped]})
    rows = "".join(f"| {name} | {seconds:.1f} s | {seconds / wall:.1%} |\n"
                   for name, seconds in diagnosis.timings.items())
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, probes on 1 thread; load average "
        f"{', '.join(map(str, load_before))} (start), {', '.join(map(str, info['load_average']))} (end); torch "
        f"{info['torch']}. `python benchmarks/bench_diagnostics.py --diagnose "
        f"--budget {args.budget or DEFAULT_BUDGET}` "
        f"(= `keel diagnose --config` on the default workload).\n\n"
        f"Wall clock {wall:.0f} s of a {budget:.0f} s budget (target: at most 15 min on 2 CPU cores).\n\n"
        "| procedure | wall clock | share |\n|---|---|---|\n" + rows
        + f"| total | {wall:.1f} s | |\n\nWhat the budget bought: "
        + "; ".join(f"{k} {v}" for k, v in counts.items())
        + ". Skipped: " + ("; ".join(s.line() for s in diagnosis.skipped) or "none") + ".\n")
    write_section("diagnostics: keel diagnose --config on the default workload", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--task", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--diagnose", action="store_true", help="time keel diagnose --config instead")
    parser.add_argument("--budget", default=None, help="budget of --diagnose (default: keel diagnose's, 15m)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    if args.diagnose:
        bench_diagnose(args)
    else:
        bench_update_ratio(args)


if __name__ == "__main__":
    main()
