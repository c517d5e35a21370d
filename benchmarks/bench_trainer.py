"""Per-step overhead of keel's trainer against a hand-written bare PyTorch loop doing the same math, step by step.

For each task (`lm`: the default workload of `keel train`; `digits`: the default digits run) both loops train the
same model on the same batches with AdamW (the same parameter groups; the bare loop uses torch's fastest setting,
`fused=True` where the device has it), linear warmup then cosine, and global-norm clipping at 1.0.

Interleaving is per step: the bare loop's step `i` runs inside the trainer's `on_step_start` event of its step `i`,
so the two alternate A B A B ... in one process and a drift in machine speed hits both alike. Keel's step time is
the interval between two `on_step_start` events minus the bare step inside it (so it includes everything the
trainer does per step: schedule, callbacks, clipping, non-finite checks, logging, counters). Reported: the median
of per-step ratios keel / bare over the counted steps, with min and max of the medians over repeats.

    python benchmarks/bench_trainer.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1] [--task lm digits]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_json, write_section  # noqa: E402

from keel import tasks  # noqa: E402
from keel.config import load_config  # noqa: E402
from keel.optim.param_groups import build_param_groups  # noqa: E402
from keel.techniques import Callback  # noqa: E402
from keel.train import Trainer  # noqa: E402

WORKLOADS = {
    "lm": ["recipe=baseline", "sample.tokens=0"],  # the recipe its bare loop implements
    "digits": ["task=digits"],
}


class BareLoop:
    """nanoGPT-style loop over the task's batches: set LR, forward, backward, clip, step, read the loss."""

    def __init__(self, config):
        torch.manual_seed(config.seed)
        self.task = tasks.from_config(config)
        self.model = self.task.build_model()
        groups = build_param_groups(self.model, weight_decay=0.1)
        fused = {"fused": True} if _has_fused_cpu_adamw() else {"foreach": True}
        self.opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.95), **fused)
        self.total, self.warm = config.max_steps, math.floor(0.05 * config.max_steps + 0.5)

    def lr_at(self, step: int) -> float:
        peak, floor = 2e-3, 2e-4
        if step < self.warm:
            return peak * step / self.warm
        progress = (step - self.warm) / (self.total - self.warm)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

    def step(self, index: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(index)
        batch = self.task.train_batch(index)
        loss = self.task.loss(self.model, batch) / self.task.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # the bare loop reads the loss every step, as any logging loop does


def _has_fused_cpu_adamw() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


class Interleave(Callback):
    """Runs the bare loop's step i inside keel's step i and times both."""

    name = "bench_interleave"

    def __init__(self, bare: BareLoop):
        self.bare, self.index = bare, 0
        self.bare_times: list[float] = []
        self.keel_times: list[float] = []
        self._exit: float | None = None

    def on_step_start(self, trainer) -> None:
        entered = time.perf_counter()
        if self._exit is not None:
            self.keel_times.append(entered - self._exit)
        self.bare.step(self.index)
        self.index += 1
        self._exit = time.perf_counter()
        self.bare_times.append(self._exit - entered)


def one_repeat(task: str, steps: int, threads: int) -> Interleave:
    config = load_config(None, [*WORKLOADS[task], f"threads={threads}"])
    bare = BareLoop(config)
    probe = Interleave(bare)
    with tempfile.TemporaryDirectory() as tmp:
        run = config.model_copy(deep=True)
        run.out_dir = str(Path(tmp) / "run")
        run.eval_interval = run.checkpoint_interval = 10**9  # the step is measured; end-of-run work excluded
        trainer = Trainer(run, callbacks=[probe], quiet=True)
        trainer.config.max_steps = steps  # the schedule keeps the default run's length, as the bare loop does
        trainer.fit()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--task", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for task in args.task:
        medians, bare_ms, keel_ms = [], [], []
        for repeat in range(args.repeats):
            probe = one_repeat(task, args.steps, args.threads)
            # keel_times[i] is keel's step i (between the events of steps i and i + 1); bare_times[i] its partner
            pairs = list(zip(probe.keel_times, probe.bare_times))[args.warmup:]
            ratios = [k / b for k, b in pairs]
            medians.append(statistics.median(ratios))
            bare_ms.append(statistics.median(b for _, b in pairs) * 1e3)
            keel_ms.append(statistics.median(k for k, _ in pairs) * 1e3)
            print(f"{task} repeat {repeat}: bare {bare_ms[-1]:.2f} ms/step, keel {keel_ms[-1]:.2f} ms/step, "
                  f"median per-step ratio {medians[-1]:.4f}", flush=True)
        results[task] = {"ratio_keel_over_bare": summary(medians), "bare_ms_per_step": bare_ms,
                         "keel_ms_per_step": keel_ms}
    info = machine()
    write_json("trainer", {"machine": info, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                           "results": results})
    rows = "".join(
        f"| {task} | {r['ratio_keel_over_bare']['median']:.4f} | {r['ratio_keel_over_bare']['min']:.4f} | "
        f"{r['ratio_keel_over_bare']['max']:.4f} | {(r['ratio_keel_over_bare']['median'] - 1) * 100:+.2f}% | < 1% | "
        f"{statistics.median(r['bare_ms_per_step']):.2f} ms | {statistics.median(r['keel_ms_per_step']):.2f} ms |\n"
        for task, r in results.items())
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {args.threads} thread(s); load average "
        f"{', '.join(map(str, info['load_average']))}; torch {info['torch']}. `python benchmarks/bench_trainer.py`.\n\n"
        "Per-step time of keel's trainer / a hand-written bare loop (same model, batches, AdamW param groups, "
        "warmup+cosine, clipping at 1.0; the bare loop with torch's fused AdamW), interleaved step by step in one "
        f"process: {args.repeats} repeats of {args.steps} steps, the first {args.warmup} excluded; the median "
        "per-step ratio of each repeat, then the median (min, max) over repeats.\n\n"
        "| task | ratio keel / bare (median) | min | max | overhead | target | bare step | keel step |\n"
        "|---|---|---|---|---|---|---|---|\n" + rows
    )
    write_section("trainer", body)
    print(body)


if __name__ == "__main__":
    main()
