"""What `keel sweep` costs on top of its trials, and what a second local worker buys.

1. **Overhead per trial.** The default workload of `keel train` (the 4-layer, 128-wide byte-level GPT on pydoc,
   batches of 32 x 128 tokens) with a smaller budget (`--steps`, default 60 of its 600 steps; one evaluation, no
   sample), one thread. Each repeat runs, side by side, one `keel train` process (what a user runs by hand) and one
   `keel sweep` process of `--trials` trials. Reported: the sweep's wall time minus the time its trials spent inside
   `keel.train.train` (recorded per trial), per trial, as a share of a trial's train time; split into process start
   (imports, storage, the study: until the first trial starts), Optuna and storage between and around trials, and
   the results (trials.csv, best.yaml, plots) at the end; and the sweep's wall time per trial over the `keel train`
   process's.
2. **Two local workers.** `keel sweep --workers 2` against `--workers 1` (one thread per trial), interleaved, on
   `--parallel-trials` trials of `--parallel-steps` steps of the same workload: trials per hour from the first
   trial's start to the last one's end (the workers' throughput), and end to end (process starts included).

    python benchmarks/bench_sweep.py [--parts overhead parallel] [--steps 60] [--trials 3] [--repeats 3]
                                     [--parallel-steps 30] [--parallel-trials 6] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_keel, summary, write_json, write_section  # noqa: E402



def workload(steps: int) -> dict:
    return {"recipe": "baseline", "max_steps": steps, "eval_interval": steps, "checkpoint_interval": steps, "sample": {"tokens": 0},
            "threads": 1}


def sweep(cwd: Path, name: str, steps: int, trials: int, workers: int) -> dict:
    config = {**workload(steps), "sweep": {"optimizer.lr": "loguniform(1.0e-3, 3.0e-3)"},
              "sweep_options": {"sampler": "random"}}
    (cwd / f"{name}.yaml").write_text(yaml.safe_dump(config))
    wall = run_keel(["sweep", f"{name}.yaml", "--trials", str(trials), "--workers", str(workers), "--out", name], cwd)
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / name / 'study.db'}")
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    return {"wall": wall, "train": [t.user_attrs["train_seconds"] for t in done],
            "in_storage": [(t.datetime_complete - t.datetime_start).total_seconds() for t in done],
            "span": (last - first).total_seconds(), "n": len(done),
            "starts": sorted(t.datetime_start for t in done), "ends": sorted(t.datetime_complete for t in done)}


def overhead(args, root: Path) -> dict:
    rows = []
    for repeat in range(args.repeats):
        (root / "c.yaml").write_text(yaml.safe_dump(workload(args.steps)))
        by_hand = run_keel(["train", "c.yaml", "--out", f"train{repeat}", "--quiet"], root)
        result = sweep(root, f"overhead{repeat}", args.steps, args.trials, 1)
        trained = sum(result["train"])
        per_trial = (result["wall"] - trained) / result["n"]
        inside = statistics.median(s - t for s, t in zip(result["in_storage"], result["train"]))
        gaps = [(b - a).total_seconds() for a, b in zip(result["ends"][:-1], result["starts"][1:])]
        rows.append({"by_hand": by_hand, "wall": result["wall"], "train": result["train"], "per_trial": per_trial,
                     "share": per_trial / statistics.median(result["train"]),
                     "optuna_per_trial": inside + (statistics.median(gaps) if gaps else 0.0),
                     "sweep_over_by_hand": result["wall"] / result["n"] / by_hand})
        print(f"repeat {repeat}: keel train {by_hand:.1f} s; sweep {result['wall']:.1f} s for {result['n']} trials "
              f"(train {', '.join(f'{t:.1f}' for t in result['train'])} s); overhead {per_trial:.2f} s/trial = "
              f"{100 * rows[-1]['share']:.1f}%; load {os.getloadavg()[0]:.2f}", flush=True)
    return {"rows": rows, "share": summary([r["share"] for r in rows]),
            "per_trial": summary([r["per_trial"] for r in rows]),
            "optuna_per_trial": summary([r["optuna_per_trial"] for r in rows]),
            "sweep_over_by_hand": summary([r["sweep_over_by_hand"] for r in rows]),
            "train": summary([t for r in rows for t in r["train"]])}


def parallel(args, root: Path) -> dict:
    pairs = []
    for pair in range(args.pairs):
        one = sweep(root, f"one{pair}", args.parallel_steps, args.parallel_trials, 1)
        two = sweep(root, f"two{pair}", args.parallel_steps, args.parallel_trials, 2)
        pairs.append({"span": two["n"] / two["span"] / (one["n"] / one["span"]),
                      "wall": two["n"] / two["wall"] / (one["n"] / one["wall"]),
                      "one_per_hour": 3600 * one["n"] / one["span"], "two_per_hour": 3600 * two["n"] / two["span"],
                      "load": os.getloadavg()[0]})
        print(f"pair {pair}: 1 worker {pairs[-1]['one_per_hour']:.0f} trials/h, 2 workers "
              f"{pairs[-1]['two_per_hour']:.0f} trials/h: x{pairs[-1]['span']:.2f} (end to end "
              f"x{pairs[-1]['wall']:.2f}); load {pairs[-1]['load']:.2f}", flush=True)
    return {"pairs": pairs, "span": summary([p["span"] for p in pairs]), "wall": summary([p["wall"] for p in pairs])}


def overhead_text(run: dict) -> str:
    info, args, first = run["machine"], run["args"], run["overhead"]
    return (
        f"**Overhead per trial.** {info['date']}; {info['cpu']}, {info['cores']} cores, 1 thread per trial; load "
        f"average {info['load_average']} (end {run['load_average_end']}); torch {info['torch']}. `python "
        f"benchmarks/bench_sweep.py --parts overhead --steps {args['steps']} --trials {args['trials']} --repeats "
        f"{args['repeats']}`. Workload: `keel train`'s default model and data with a smaller budget "
        f"({args['steps']} of its 600 steps, one evaluation, no sample), SQLite storage in the sweep directory, "
        "random sampling.\n\n"
        "| overhead per trial (share of a trial's train time) | min | max | seconds per trial | of which Optuna + "
        "storage | trial train time | sweep wall per trial / one `keel train` process |\n|---|---|---|---|---|---|---|\n"
        f"| {100 * first['share']['median']:.1f}% | {100 * first['share']['min']:.1f}% | "
        f"{100 * first['share']['max']:.1f}% | {first['per_trial']['median']:.2f} s | "
        f"{first['optuna_per_trial']['median']:.3f} s | {first['train']['median']:.1f} s | "
        f"{first['sweep_over_by_hand']['median']:.3f} |\n\n"
        f"Overhead = (sweep wall time - time inside `keel.train.train`) / trials, {args['trials']} trials per sweep: "
        "one process start (Python, torch and Optuna imports, creating the SQLite study) shared by the trials, "
        "Optuna's sampling and the storage's writes around each trial (heartbeat thread included), and the results "
        "at the end (trials.csv, best.yaml, plots). Per-repeat shares: "
        + ", ".join(f"{100 * r['share']:.1f}%" for r in first["rows"]) + ".\n"
    )


def parallel_text(run: dict) -> str:
    info, args, second = run["machine"], run["args"], run["parallel"]
    s, w = second["span"], second["wall"]
    return (
        f"**Two local workers.** {info['date']}; {info['cpu']}, {info['cores']} cores, 1 thread per trial; load "
        f"average {info['load_average']} (end {run['load_average_end']}); torch {info['torch']}. `python "
        f"benchmarks/bench_sweep.py --parts parallel --parallel-steps {args['parallel_steps']} --parallel-trials "
        f"{args['parallel_trials']} --pairs {args['pairs']}`: {args['parallel_trials']} trials of "
        f"{args['parallel_steps']} steps of the same workload per sweep, `--workers 2` against `--workers 1`, "
        f"{args['pairs']} interleaved pairs.\n\n"
        "| 2 workers / 1 worker, trials per hour (workers' span) | min | max | end to end (process starts included) "
        "| target |\n|---|---|---|---|---|\n"
        f"| x{s['median']:.2f} | x{s['min']:.2f} | x{s['max']:.2f} | x{w['median']:.2f} [{w['min']:.2f}, "
        f"{w['max']:.2f}] | >= x1.8 |\n\n"
        "Per pair (load average at its end): " + ", ".join(f"x{p['span']:.2f} ({p['load']:.2f})"
                                                           for p in second["pairs"]) + ".\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["overhead", "parallel"], default=["overhead", "parallel"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel-steps", type=int, default=30)
    parser.add_argument("--parallel-trials", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    for part in args.parts:
        info = machine()
        info["threads"] = 1
        with tempfile.TemporaryDirectory(prefix="keel-bench-sweep-") as tmp:
            result = overhead(args, Path(tmp)) if part == "overhead" else parallel(args, Path(tmp))
        run = {"machine": info, "load_average_end": [round(x, 2) for x in os.getloadavg()], "args": vars(args),
               part: result}
        write_json(f"sweep_{part}", run)
    texts = []
    for part, text in (("overhead", overhead_text), ("parallel", parallel_text)):
        path = Path(__file__).resolve().parent / "results" / f"sweep_{part}.json"
        if path.exists():
            texts.append(text(json.loads(path.read_text())))
    body = "\n".join(texts) + (
        "\nThe machine is shared (2 cores with other sessions' builds and tests): the load average is printed with each "
        "figure. A second worker can only double the throughput when a second core is free.\n")
    write_section("sweep", body)
    print(body)


if __name__ == "__main__":
    main()
