"""Convergence of every registered optimizer on keel's default LM workload, at its documented default LR.

Method: the default run config (4-layer GPT, width 128, context 128, batch 32, byte-level `pydoc` corpus) trained
for the same number of steps with each optimizer at its registry defaults (`keel.optim.names()`), a cosine schedule
with 5% warmup decaying to a tenth of the optimizer's LR, one thread. Also the default recipe (AdamW 2e-3, betas
(0.9, 0.95), weight decay 0.1) as the baseline. Reported: the validation loss each reaches at equal steps (mean
and spread over seeds) and wall time relative to AdamW at its default LR in the same run. Default LRs are starting points,
not tuned values; the table says how far each gets without tuning.

Run: python benchmarks/bench_optim_convergence.py [--steps 200] [--seeds 1] [--names lion,soap,...]
Writes benchmarks/results/optim_convergence.json and a subsection of "## optimizers" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_optim import machine, write_subsection  # noqa: E402

import keel.optim as ko  # noqa: E402
from keel.config import DEFAULT_OPTIMIZER, TrainConfig  # noqa: E402
from keel.train import train  # noqa: E402

HEADING = "### convergence on the default LM at each default LR (CPU, one thread)"


def run(optimizer: dict, steps: int, seed: int, out_dir: Path) -> dict:
    lr = float(optimizer["lr"])
    config = TrainConfig.model_validate(
        {
            "recipe": "baseline",
            "seed": seed,
            "max_steps": steps,
            "eval_interval": steps,
            "checkpoint_interval": steps,
            "threads": 1,
            "optimizer": optimizer,
            "schedule": {"name": "cosine", "warmup": "5%", "min_lr": lr / 10},
            "sample": {"tokens": 0},
            "out_dir": str(out_dir),
        }
    )
    start = time.perf_counter()
    result = train(config, quiet=True)
    return {"val_loss": result["val_loss"], "train_loss": result["train_loss"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--names", default=",".join(ko.names()))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", action="store_true", help="rewrite the RESULTS.md table from the saved JSON")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads((HERE / "results" / "optim_convergence.json").read_text())
        write_subsection(HERE / "RESULTS.md", HEADING, section(data))
        return
    torch.set_num_threads(1)
    contenders = {"baseline (default recipe)": dict(DEFAULT_OPTIMIZER)}
    for name in args.names.split(","):
        contenders[name] = {"name": name, "lr": ko.get(name).lr}
    results: dict = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for label, optimizer in contenders.items():  # interleaved over seeds
                out = run(optimizer, args.steps, 1337 + seed, Path(tmp) / f"{label.split()[0]}-{seed}")
                results[label].append(out)
                print(f"seed {seed} {label:28s} val_loss {out['val_loss']:.4f} ({out['seconds']:.0f}s)", flush=True)
    data = {"machine": machine(), "steps": args.steps, "seeds": args.seeds, "contenders": contenders,
            "results": results}
    body = section(data)
    print(body)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "optim_convergence.json").write_text(json.dumps(data, indent=2) + "\n")
        write_subsection(HERE / "RESULTS.md", HEADING, body)


def section(data: dict) -> str:
    m = data["machine"]
    reference = "adamw" if "adamw" in data["results"] else "baseline (default recipe)"
    base = data["results"][reference]
    lines = [
        f"`python benchmarks/bench_optim_convergence.py --steps {data['steps']} --seeds {data['seeds']}` — "
        f"{m['date']}, {m['cpu']}, {m['cores']} cores, 1 thread, load average {m['load_average']}, torch {m['torch']}. "
        f"Default LM workload, {data['steps']} steps each, cosine schedule (5% warmup, floor lr/10); validation loss "
        f"(mean, and min-max over seeds); wall time relative to {reference} in the same run (includes evaluation).",
        "",
        f"| optimizer | lr | val loss | time / {reference} |",
        "|---|---|---|---|",
    ]
    for label, runs in data["results"].items():
        losses = [r["val_loss"] for r in runs]
        spread = f" ({min(losses):.3f}-{max(losses):.3f})" if len(losses) > 1 else ""
        ratio = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(runs, base))
        lr = data["contenders"][label]["lr"]
        lines.append(f"| {label} | {lr:g} | {statistics.mean(losses):.3f}{spread} | {ratio:.2f} |")
    lines += [""] + [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
