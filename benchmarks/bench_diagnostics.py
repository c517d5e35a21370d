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
from keel.rundir.metrics import read_metrics  # noqa: E402
from keel.techniques import Callback  # noqa: E402
from keel.train import Trainer  # noqa: E402

WORKLOADS = {"lm": ["sample.tokens=0"], "digits": ["task=digits"]}
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


def whole_runs(task: str, steps: int, threads: int, every: int | None) -> float:
    """Median seconds per step of one run, from the `time` field of its step records (first 5 steps left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"diagnostics.update_ratio_every={every}"] if every else []
        config = load_config(None, [*WORKLOADS[task], f"threads={threads}", f"max_steps={steps}", *QUIET, *extra,
                                    f"out_dir={Path(tmp) / 'run'}"])
        Trainer(config, quiet=True).fit()
        stamps = [r["time"] for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if r["kind"] == "step"]
    return float(np.median(np.diff(stamps)[5:]))


def bench_update_ratio(args) -> None:
    torch.set_num_threads(args.threads)
    results = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    for task in args.task:
        medians, measured, plain, runs = [], [], [], []
        for repeat in range(args.repeats):
            r = interleaved(task, args.steps, args.threads)
            medians.append(r["ratio"])
            measured.append(r["measured_ms"])
            plain.append(r["plain_ms"])
            on = whole_runs(task, args.steps, args.threads, 1)
            off = whole_runs(task, args.steps, args.threads, None)
            runs.append(on / off)
            print(f"{task} repeat {repeat}: interleaved ratio {r['ratio']:.4f} ({r['measured_ms']:.2f} vs "
                  f"{r['plain_ms']:.2f} ms/step, {r['pairs']} pairs); whole runs every=1 / off {on / off:.4f}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        results[task] = {"interleaved_ratio": summary(medians), "whole_run_ratio": summary(runs),
                         "measured_ms": measured, "plain_ms": plain}
    info = machine()
    info["load_average_before"] = load_before
    write_json("diagnostics", {"machine": info, "steps": args.steps, "repeats": args.repeats, "results": results})
    rows = "".join(
        f"| {task} | {r['interleaved_ratio']['median']:.4f} | {r['interleaved_ratio']['min']:.4f} | "
        f"{r['interleaved_ratio']['max']:.4f} | {(r['interleaved_ratio']['median'] - 1) * 100:+.2f}% | "
        f"{r['whole_run_ratio']['median']:.4f} [{r['whole_run_ratio']['min']:.4f}, {r['whole_run_ratio']['max']:.4f}] "
        f"| < 5% | {statistics.median(r['plain_ms']):.2f} ms |\n" for task, r in results.items())
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {args.threads} thread(s); load average "
        f"{', '.join(map(str, load_before))} (start), {', '.join(map(str, info['load_average']))} (end); torch "
        f"{info['torch']}. `python benchmarks/bench_diagnostics.py --steps {args.steps} --repeats {args.repeats}`.\n\n"
        "Per-step time with `diagnostics.update_ratio_every: 1` (snapshot of the weights, ||ΔW||/||W|| of every "
        "weight matrix, one metrics record) / without. Interleaved: measured and unmeasured steps alternate within "
        f"one run ({args.steps} steps, first 6 left out; median of per-pair ratios; min and max over {args.repeats} "
        "repeats). Whole runs: every=1 and off alternated, median step time from the step records' `time` field.\n\n"
        "| workload | interleaved ratio (median) | min | max | overhead | whole runs every=1 / off [min, max] | "
        "target | step without |\n|---|---|---|---|---|---|---|---|\n" + rows)
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
    counts = {
        "overfit steps": results.get("overfit", {}).get("steps_run"),
        "config run steps": results.get("config", {}).get("steps_run"),
        "sweep runs x steps": f"{len(results.get('sweep', {}).get('points', []))} x {results.get('sweep', {}).get('steps')}",
        "instability (2x) steps": len(results.get("instability", {}).get("steps", [])),
        "5x/10x steps": [j.get("steps_run") for j in results.get("jumps", [])],
        "warmup runs": sum(len(w["tried"]) for w in results.get("warmup", [])),
    }
    write_json("diagnose", {"machine": info, "budget": budget, "wall": wall, "timings": diagnosis.timings,
                            "counts": counts, "findings": [f.kind for f in diagnosis.findings],
                            "skipped": [s.line() for s in diagnosis.skipped]})
    rows = "".join(f"| {name} | {seconds:.1f} s | {seconds / wall:.1%} |\n" for name, seconds in diagnosis.timings.items())
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, probes on 1 thread; load average "
        f"{', '.join(map(str, load_before))} (start), {', '.join(map(str, info['load_average']))} (end); torch "
        f"{info['torch']}. `python benchmarks/bench_diagnostics.py --diagnose --budget {args.budget or DEFAULT_BUDGET}` "
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
