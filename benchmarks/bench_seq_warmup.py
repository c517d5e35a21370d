"""Time to target with sequence-length warmup (Li et al. 2022) on keel's LM workload with a 256-token context.

Method: the default LM recipe (byte-level `pydoc`, AdamW 2e-3, betas (0.9, 0.95), weight decay 0.1, cosine with 5%
warmup to a tenth of the peak) with the context raised to 256 and, so that three seeds of every contender fit in
about ten minutes of two shared CPU cores, a smaller model (2 layers, width 96, 4 heads) and batch (16 x 256 tokens)
for `--steps` steps. Contenders, interleaved seed by seed (baseline, warmup keeping tokens, warmup truncating):

- baseline: no warmup;
- warmup, tokens kept: `seq_warmup` from 32 tokens to 256 over the first 30% of the steps, rows cut into chunks so
  every step trains on the same 4,096 tokens (Composer's default);
- warmup, truncated: the same schedule, rows truncated (Li et al.'s implementation), so early steps train on fewer
  tokens.

The target is the baseline's final validation loss of the same seed (8,192 fixed validation tokens, evaluated
every `--eval-interval` steps, always at the full context). For each contender: the steps, tokens and training
seconds (the trainer's clock, evaluations included alike) at the first evaluation at or below the target, as ratios
to the baseline's (median and min-max over seeds), and the final validation loss. The stability row trains every
contender at 2x batch and 2x LR for half the steps (the same tokens), with and without warmup.

Run: python benchmarks/bench_seq_warmup.py [--steps 250] [--seeds 3] [--eval-interval 10]
Writes benchmarks/results/seq_warmup.json and the section "seq_warmup" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, summary, write_json, write_section  # noqa: E402

from keel.config import TrainConfig  # noqa: E402
from keel.train import train  # noqa: E402

MODEL = {"n_layer": 2, "n_embd": 96, "n_head": 4, "block_size": 256}
BATCH, LR = 16, 2e-3
WARMUP = {"enabled": True, "start": 32, "duration": "30%"}
CONTENDERS = {
    "baseline": None,
    "warmup, tokens kept": {**WARMUP, "keep_tokens_per_step": True},
    "warmup, truncated": {**WARMUP, "keep_tokens_per_step": False},
}


def run(warmup: dict | None, steps: int, seed: int, scale: int, eval_interval: int, out: Path) -> dict:
    lr = LR * scale
    raw = {
        "recipe": "baseline", "seed": seed, "max_steps": steps, "eval_interval": eval_interval, "checkpoint_interval": steps,
        "threads": 1, "model": MODEL, "data": {"batch_size": BATCH * scale, "eval_tokens": 8192},
        "optimizer": {"lr": lr}, "schedule": {"name": "cosine", "warmup": "5%", "min_lr": lr / 10},
        "sample": {"tokens": 0}, "out_dir": str(out),
    }
    if warmup is not None:
        raw["seq_warmup"] = warmup
    result = train(TrainConfig.model_validate(raw), quiet=True)
    history = result["history"]
    steps_log = {r["step"]: r for r in history if r.get("kind") == "step"}
    evals = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"],
              "seconds": steps_log[r["step"] - 1]["time"]} for r in history if "val_loss" in r]
    losses = [r["loss"] for r in steps_log.values()]
    return {"evals": evals, "val_loss": result["val_loss"], "seconds": result["time"], "tokens": result["tokens"],
            "max_grad_norm": max(r["grad_norm"] for r in steps_log.values()),
            "max_loss_rise": max((b - a for a, b in zip(losses, losses[1:])), default=0.0)}


def reach(evals: list[dict], target: float) -> dict | None:
    """The first evaluation at or below ``target``."""
    return next((e for e in evals if e["val_loss"] <= target + 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_machine = machine()
    print(f"load average {os.getloadavg()}", flush=True)
    runs: dict[str, list[dict]] = {f"{label} @1x": [] for label in CONTENDERS}
    stability = ("baseline", "warmup, tokens kept")
    runs.update({f"{label} @2x": [] for label in stability})
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for label, warmup in CONTENDERS.items():  # interleaved: every contender once per seed
                out = run(warmup, args.steps, 1337 + seed, 1, args.eval_interval, Path(tmp) / f"{seed}-{len(runs)}-{label}")
                runs[f"{label} @1x"].append(out)
                print(f"seed {seed} {label:22s} 1x val_loss {out['val_loss']:.4f} ({out['seconds']:.0f}s)", flush=True)
        for label in stability:  # one seed at 2x batch and LR, half the steps (same tokens)
            out = run(CONTENDERS[label], args.steps // 2, 1337, 2, max(1, args.eval_interval // 2),
                      Path(tmp) / f"2x-{label}")
            runs[f"{label} @2x"].append(out)
            print(f"2x {label:22s} val_loss {out['val_loss']:.4f} ({out['seconds']:.0f}s)", flush=True)
    data = {"machine": start_machine, "machine_end": machine(), "steps": args.steps, "seeds": args.seeds,
            "eval_interval": args.eval_interval, "model": MODEL, "batch": BATCH, "lr": LR, "warmup": WARMUP,
            "runs": runs}
    data["table"] = table(data)
    body = section(data)
    print(body)
    if not args.no_write:
        write_json("seq_warmup", data)
        write_section("seq_warmup", body)


def table(data: dict) -> list[dict]:
    """Per contender: steps / tokens / seconds to the baseline's final val loss (same seed), as ratios."""
    base = data["runs"]["baseline @1x"]
    targets = [b["val_loss"] for b in base]
    rows = []
    for label, runs in data["runs"].items():
        seeds = range(len(runs))
        hits = [reach(runs[s]["evals"], targets[s]) for s in seeds]
        base_hits = [reach(base[s]["evals"], targets[s]) for s in seeds]
        row = {"contender": label, "final_val_loss": [r["val_loss"] for r in runs],
               "reached": sum(h is not None for h in hits), "n": len(runs),
               "max_grad_norm": [r["max_grad_norm"] for r in runs],
               "max_loss_rise": [r["max_loss_rise"] for r in runs]}
        for key in ("step", "tokens", "seconds"):
            ratios = [h[key] / b[key] for h, b in zip(hits, base_hits) if h is not None]
            row[key] = summary(ratios) if ratios else None
        rows.append(row)
    return rows


def _ratio(cell: dict | None) -> str:
    if cell is None:
        return "not reached"
    if cell["n"] == 1:
        return f"{cell['median']:.2f}"
    return f"{cell['median']:.2f} [{cell['min']:.2f}, {cell['max']:.2f}]"


def section(data: dict) -> str:
    m, end = data["machine"], data["machine_end"]
    lines = [
        f"`python benchmarks/bench_seq_warmup.py --steps {data['steps']} --seeds {data['seeds']}` — {m['date']}, "
        f"{m['cpu']}, {m['cores']} cores, 1 thread, load average {m['load_average']} (end {end['load_average']}), "
        f"torch {m['torch']}.",
        "",
        f"Default LM recipe on `pydoc` with context 256 and, to fit the shared CPUs, a smaller model (2 layers, width "
        f"96) and batch ({data['batch']} x 256 tokens), {data['steps']} steps; seq_warmup from {data['warmup']['start']} "
        f"to 256 tokens over the first {data['warmup']['duration']} of the steps. Target: the baseline's final "
        f"validation loss of the same seed (evaluated every {data['eval_interval']} steps at the full context). "
        "Ratios to the baseline at that target: median [min, max] over seeds; seconds are the trainer's clock "
        "(evaluations included alike). The 2x rows train at twice the batch and LR for half the steps (one seed); "
        "their ratios are to the 1x baseline's steps, tokens and seconds.",
        "",
        "| contender | reached target | steps / baseline | tokens / baseline | seconds / baseline | final val loss | "
        "max grad norm | largest loss rise between steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["table"]:
        losses = row["final_val_loss"]
        spread = f" [{min(losses):.3f}, {max(losses):.3f}]" if len(losses) > 1 else ""
        lines.append(
            f"| {row['contender']} | {row['reached']}/{row['n']} | {_ratio(row['step'])} | {_ratio(row['tokens'])} | "
            f"{_ratio(row['seconds'])} | {statistics.median(losses):.4f}{spread} | "
            f"{statistics.median(row['max_grad_norm']):.2f} | {statistics.median(row['max_loss_rise']):.3f} |")
    lines += [""] + [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
