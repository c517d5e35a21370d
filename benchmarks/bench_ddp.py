"""Data-parallel scaling on one machine: tokens/s of 2 ranks (1 thread each) over 1 rank (1 thread), the same
per-rank batch, and the all-reduce time per step as a share of the step.

Contenders, in turns (A B, then B A, ...; the first pair is a warm-up and not counted):

- A: ``keel train`` in one process, ``threads=1``;
- B: ``keel train --nproc 2`` (torchrun's launcher, gloo, DDP), ``threads=1`` per rank.

Both train the default workload (the GPT of ``keel train``, 32 x 128 tokens per rank and step) for ``--steps``
steps; throughput is read from each run's metrics.jsonl (tokens trained from step ``--warmup`` on, over the
trainer's own clock for those steps: start-up, evaluation and checkpoints excluded). Reported: the median of the
per-pair ratios B / A with min and max (target >= 1.8).

All-reduce share: a probe launched like B (2 ranks, 1 thread, gloo) all-reduces, the way one training step does,
a float32 buffer as large as the model's gradients plus the step's three scalar all-reduces (counts, loss, the
non-finite decision), alone; its median time over the median step time of the B runs is the share of a step that
communication would take if nothing overlapped it (DDP overlaps the gradient all-reduce with the backward pass,
so the exposed share is at most this).

    python benchmarks/bench_ddp.py [--steps 16] [--warmup 4] [--pairs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_json, write_section  # noqa: E402

WORKLOAD = ["recipe=baseline", "threads=1", "sample.tokens=0", "progress_interval=100000"]


def throughput(run: Path, warmup: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) from step ``warmup`` to the last, on the trainer's clock."""
    from keel.rundir import RunDir
    from keel.rundir.metrics import read_metrics

    steps = [r for r in read_metrics(RunDir(run).metrics) if r.get("kind") == "step"]
    first, last = steps[warmup], steps[-1]
    before = steps[warmup - 1]  # "time" is taken after a step: the steps warmup..last-1 took this long
    seconds = steps[-2]["time"] - before["time"]
    return (last["tokens"] - first["tokens"]) / seconds, seconds / (len(steps) - 1 - warmup)


def train(out: Path, steps: int, nproc: int | None) -> None:
    command = [sys.executable, "-m", "keel", "train", *WORKLOAD, f"max_steps={steps}", f"eval_interval={steps}",
               f"checkpoint_interval={steps}", "schedule.warmup=1", "--out", str(out), "--quiet"]
    if nproc is not None:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")


def probe() -> None:
    """Run under torchrun: time one step's all-reduces (gradients of the default GPT, three scalars), alone."""
    import torch
    import torch.distributed as dist

    from keel.config import load_config
    from keel.tasks import from_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = load_config(None, WORKLOAD)
    model = from_config(config).build_model()
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads = torch.randn(numel)
    scalars = [torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.int32)]
    times = []
    for i in range(40):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        for scalar in scalars:
            dist.all_reduce(scalar)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"parameters": numel, "seconds": statistics.median(times[5:])}))
    dist.destroy_process_group()


def run_probe() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, "--probe"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the all-reduce probe failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(payload: dict) -> str:
    """The RESULTS.md section for a results payload."""
    info, work, r = payload["machine"], payload["workload"], payload["ratio_two_over_one"]
    allreduce, step = payload["allreduce_seconds_per_step"], payload["step_seconds_two_ranks"]
    verdict = "met" if r["median"] >= payload["target"] else "missed"
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, 1 thread per rank; load average "
        f"{', '.join(map(str, info['load_average']))} before, {', '.join(map(str, info['load_average_after']))} "
        f"after; torch {info['torch']}, gloo. `python benchmarks/bench_ddp.py`.\n\n"
        f"tokens/s of `keel train --nproc 2` (DDP, 2 ranks x 1 thread) over `keel train` (1 rank, 1 thread), the "
        f"default GPT with 32 x 128 tokens per rank and step, {work['steps']} steps per run (steps "
        f"{work['warmup']}+ timed on the trainer's clock), interleaved, {work['pairs']} pairs after a warm-up pair. "
        f"All-reduce: one step's all-reduces ({payload['parameters']:,} float32 gradients + 3 scalars) timed alone "
        "on 2 gloo ranks, over the 2-rank step time (an upper bound on the exposed share: DDP overlaps it with "
        "backward).\n\n"
        "| ratio 2 ranks / 1 rank (median) | min | max | target | 1 rank tok/s | 2 ranks tok/s | all-reduce per "
        "step | 2-rank step | all-reduce share |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | >= {payload['target']} ({verdict}) | "
        f"{payload['tokens_per_s_one_rank']['median']:,.0f} | {payload['tokens_per_s_two_ranks']['median']:,.0f} | "
        f"{allreduce * 1e3:.2f} ms | {step * 1e3:.0f} ms | {payload['allreduce_share_of_step']:.1%} |\n"
    )
    if verdict == "missed":
        busy = max(info["load_average"][0], info["load_average_after"][0])
        body += (f"\n- miss: {r['median']:.2f}x, not {payload['target']}x, with a load average up to {busy:.1f} on "
                 f"{info['cores']} cores: the two ranks shared the cores with other processes, and the all-reduce, "
                 f"{payload['allreduce_share_of_step']:.1%} of a step, is not what limits the scaling. Rerun on a "
                 "quiet machine to judge the target.\n")
    body += "\nNo GPU was lent to this run; the NCCL figures are still to be measured on a GPU machine.\n" \
        if info.get("gpu") is None else ""
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=5, help="counted pairs (one more is run first as a warm-up)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe()
        return

    info = machine()
    info["threads"] = 1
    ratios, one, two, step_two = [], [], [], []
    probes = [run_probe()]
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs + 1):
            order = [None, 2] if pair % 2 == 0 else [2, None]
            result = {}
            for nproc in order:
                out = Path(tmp) / f"pair{pair}-{nproc or 1}"
                train(out, args.steps, nproc)
                result[nproc] = throughput(out, args.warmup)
            if pair == 0:
                continue  # warm-up
            one.append(result[None][0])
            two.append(result[2][0])
            step_two.append(result[2][1])
            ratios.append(result[2][0] / result[None][0])
            print(f"pair {pair}: 1 rank {result[None][0]:,.0f} tok/s, 2 ranks {result[2][0]:,.0f} tok/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    probes.append(run_probe())
    allreduce = statistics.median(p["seconds"] for p in probes)
    step = statistics.median(step_two)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "machine": info,
        "workload": {"model": "keel train default GPT", "tokens_per_rank_step": 32 * 128, "steps": args.steps,
                     "warmup": args.warmup, "pairs": args.pairs},
        "tokens_per_s_one_rank": summary(one),
        "tokens_per_s_two_ranks": summary(two),
        "ratio_two_over_one": summary(ratios),
        "ratios": ratios,
        "target": 1.8,
        "allreduce_seconds_per_step": allreduce,
        "parameters": probes[0]["parameters"],
        "step_seconds_two_ranks": step,
        "allreduce_share_of_step": allreduce / step,
    }
    path = write_json("ddp", payload)
    body = report(payload)
    write_section("ddp", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
