"""Per-step overhead of keel's trainer against a hand-written bare PyTorch loop doing the same math.

Both run the default workload (the GPT and data of `keel train`), AdamW with the same parameter groups, linear
warmup then cosine, global-norm clipping at 1.0, on the same batches. Contenders alternate in one process, the
order flipping each pair (bare keel, keel bare, ...); each turn builds its run, trains `--steps` steps and the per-step time is taken
from step `--warmup` to the last (setup, evaluation and checkpoints excluded: they are not per-step work).
Reported: the median of per-pair ratios keel / bare with min and max. Peak memory: each contender alone in a
fresh subprocess, peak resident set size (ru_maxrss) after the same number of steps.

    python benchmarks/bench_trainer.py [--steps 40] [--repeats 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_json, write_section  # noqa: E402

from keel.config import load_config  # noqa: E402
from keel.data import RandomWindowSampler, load_tokens  # noqa: E402
from keel.models import GPT, GPTConfig, lm_loss_sum  # noqa: E402


def bare_loop(config, steps: int, warmup_skip: int) -> float:
    """nanoGPT-style loop: set LR, forward, backward, clip, step. Returns seconds per step after warm-up."""
    torch.manual_seed(config.seed)
    data = load_tokens(config.data.source, config.data.val_fraction)
    sampler = RandomWindowSampler(data.train, config.model.block_size, config.data.batch_size, config.seed)
    model = GPT(GPTConfig(vocab_size=256, **config.model.model_dump()))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95))
    total, warm, peak, floor = config.max_steps, math.floor(0.05 * config.max_steps), 2e-3, 2e-4

    def lr_at(step):
        if step < warm:
            return peak * step / warm
        progress = (step - warm) / (total - warm)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

    for step in range(steps):
        if step == warmup_skip:
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = sampler.batch(step)
        loss = lm_loss_sum(model(x), y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the bare loop also reads the loss every step, as a logging loop does
    return (time.perf_counter() - start) / (steps - warmup_skip)


def keel_loop(config, steps: int, warmup_skip: int) -> float:
    from keel.train import train

    with tempfile.TemporaryDirectory() as tmp:
        config = config.model_copy(deep=True)
        config.out_dir = str(Path(tmp) / "run")
        config.max_steps = steps
        config.eval_interval = config.checkpoint_interval = 10**9  # measured: the step; end-of-run work excluded
        result = train(config, quiet=True)
    times = {r["step"]: r["time"] for r in result["history"] if "grad_norm" in r}
    return (times[steps - 1] - times[warmup_skip - 1]) / (steps - warmup_skip)


def memory_child(kind: str, steps: int) -> None:
    config = load_config(None, [f"max_steps={steps}", "schedule.warmup=1", "sample.tokens=0"])
    torch.set_num_threads(1)
    (bare_loop if kind == "bare" else keel_loop)(config, steps, 1)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", choices=["bare", "keel"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.steps)
        return
    torch.set_num_threads(args.threads)
    # The default workload, with the schedule over the default run length (its shape does not change the cost).
    config = load_config(None, ["sample.tokens=0", f"threads={args.threads}"])
    bare_times, keel_times, ratios = [], [], []
    for repeat in range(args.repeats):
        # Alternate which contender goes first (A B, B A, ...) so a drift in machine speed cancels out.
        if repeat % 2 == 0:
            bare = bare_loop(config, args.steps, args.warmup)
            ours = keel_loop(config, args.steps, args.warmup)
        else:
            ours = keel_loop(config, args.steps, args.warmup)
            bare = bare_loop(config, args.steps, args.warmup)
        bare_times.append(bare)
        keel_times.append(ours)
        ratios.append(ours / bare)
        print(f"repeat {repeat}: bare {bare * 1e3:.1f} ms/step, keel {ours * 1e3:.1f} ms/step, ratio {ours / bare:.4f}")
    memory = {}
    for kind in ("bare", "keel"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--steps", "10"],
                             capture_output=True, text=True, check=True).stdout
        memory[kind] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    stats = summary(ratios)
    info = machine()
    payload = {"machine": info, "steps": args.steps, "repeats": args.repeats, "ratio_keel_over_bare": stats,
               "bare_s_per_step": bare_times, "keel_s_per_step": keel_times, "peak_rss_mb": memory}
    write_json("trainer", payload)
    overhead = (stats["median"] - 1) * 100
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {args.threads} thread(s); load average "
        f"{', '.join(map(str, info['load_average']))}; torch {info['torch']}. `python benchmarks/bench_trainer.py`.\n\n"
        "Per-step time of `keel train`'s loop / a hand-written bare loop with the same model, data, AdamW, "
        "warmup+cosine and clipping on the default workload, interleaved, "
        f"{args.repeats} pairs of {args.steps} steps (first {args.warmup} excluded).\n\n"
        "| ratio keel / bare (median) | min | max | overhead | target | peak RSS bare | peak RSS keel |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {stats['median']:.4f} | {stats['min']:.4f} | {stats['max']:.4f} | {overhead:+.2f}% | < 1% | "
        f"{memory['bare']:.0f} MB | {memory['keel']:.0f} MB |\n\n"
        "Peak RSS is each contender alone in a fresh process (both import the same modules) after 10 steps: "
        "the trainer holds no copy of the model, gradients or optimizer state beyond what the bare loop holds, "
        "so with no technique enabled the target is equality.\n"
    )
    write_section("trainer", body)
    print(body)


if __name__ == "__main__":
    main()
