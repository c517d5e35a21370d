"""Bytes per parameter of the weights, gradients and AdamW state in four storage layouts, counted from real tensors.

The speed article says half-precision weights halve memory. This counts what each layout holds at the optimizer step
of one real update of keel's GPT (nanoGPT-char shape by default, on the CPU): the storages of the parameters, their
gradients, the optimizer state and any master copy, each storage once. Time is not measured.

- ``fp32``: fp32 weights and gradients, fp32 AdamW state (keel's ``precision: fp32`` and ``bf16``: autocast changes
  the activations, not these);
- ``bf16 + fp32 master``: bf16 weights and gradients, an fp32 master copy that AdamW updates (fp32 state), copied
  back to bf16 after each step (Micikevicius et al. 2018); the fp32 gradient of the master is materialised, as
  torch's AdamW needs it;
- ``bf16 weights, fp32 state``: no master; updates land directly in bf16 (they need stochastic rounding to be
  unbiased);
- ``pure bf16``: weights, gradients and AdamW state all bf16 (torch's AdamW keeps its state in the weights' dtype).

It also measures the cost of dropping the master: after one AdamW step at a late-training LR, the share of the
weights the fp32 update changes that keep their old bf16 value (updates below half a bf16 step are rounded away).

    python benchmarks/bench_param_memory.py            # nanoGPT-char shape (6 x 384), writes RESULTS.md
    python benchmarks/bench_param_memory.py --small --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from keel.models.gpt import GPT, GPTConfig  # noqa: E402

VERDICT = ("With AdamW an fp32 master copy never brings weights + gradients + state below fp32's bytes: the master "
           "(4 bytes) and the fp32 moments (8) outweigh what bf16 weights and gradients save (16 bytes at best, with "
           "an update that reads the bf16 gradient without materialising an fp32 one; 20 as torch's AdamW on the "
           "master needs). Only the layouts without a master save memory (12 and 8 bytes), and they round small "
           "updates away (the share above), so they need stochastic rounding or a compensation buffer. keel therefore "
           "keeps fp32 weights and offers no bf16 parameter storage (docs/stability.md, 'Half-precision weights').")
LAYOUTS = ("fp32", "bf16 + fp32 master", "bf16 weights, fp32 state", "pure bf16")
SHAPES = {"nanogpt-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
          "small": dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=32)}


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor and its views count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _batch(config: GPTConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (4, config.block_size), generator=generator)
    return x, torch.roll(x, -1, dims=1)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def measure(layout: str, shape: dict, lr: float = 1e-3) -> dict:
    """Bytes held at the optimizer step of one update in ``layout``: weights, gradients, state, master."""
    torch.manual_seed(0)
    config = GPTConfig(**shape)
    model = GPT(config)
    count = sum(p.numel() for p in model.parameters())
    batch = _batch(config)
    masters: list[torch.Tensor] = []
    if layout == "fp32":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    elif layout == "bf16 + fp32 master":
        masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(masters, lr=lr, foreach=False)
    elif layout == "bf16 weights, fp32 state":
        model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    elif layout == "pure bf16":
        model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    else:
        raise ValueError(f"layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    params = list(model.parameters())
    _loss(model, batch).backward()
    if masters:
        for master, p in zip(masters, params):
            master.grad = p.grad.float()
    if layout == "bf16 weights, fp32 state":  # state in fp32 although the weights are bf16
        for p in params:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                  "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        held = {"state": _storage_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")}
    else:
        optimizer.step()
        held = {"state": _storage_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")}
    held["weights"] = _storage_bytes(params)
    held["gradients"] = _storage_bytes(p.grad for p in params)
    held["master"] = _storage_bytes(masters) + _storage_bytes(m.grad for m in masters)
    total = sum(held.values())
    return {"layout": layout, "parameters": count, "bytes": held, "total": total,
            "bytes_per_parameter": total / count}


def rounded_away(shape: dict, lr: float = 1e-4, steps: int = 1) -> float:
    """Share of the weights an fp32 AdamW update changes whose bf16 value stays the same after it (no master),
    starting from weights as bf16 storage holds them (each rounded to bf16 first)."""
    torch.manual_seed(0)
    config = GPTConfig(**shape)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    for step in range(steps):
        _loss(model, _batch(config, step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = lost = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        same_bf16 = p.detach().to(torch.bfloat16) == before[name].to(torch.bfloat16)
        changed += int(moved.sum())
        lost += int((moved & same_bf16).sum())
    return lost / max(changed, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model (seconds), e.g. for the tests")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and results/ alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    name = "small" if args.small else "nanogpt-char"
    shape = SHAPES[name]
    rows = [measure(layout, shape) for layout in LAYOUTS]
    lost = {lr: rounded_away(shape, lr) for lr in (1e-3, 1e-4, 1e-5)}
    fp32 = rows[0]["total"]
    lines = [f"Counted from the tensors of one AdamW update of keel's GPT ({name}: {rows[0]['parameters']:,} "
             "parameters) on the CPU; each storage once; activations not included.", "",
             "| layout | weights | gradients | master (+ its gradient) | AdamW state | bytes/parameter | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        b, n = row["bytes"], row["parameters"]
        lines.append(f"| {row['layout']} | {b['weights'] / n:.0f} | {b['gradients'] / n:.0f} | {b['master'] / n:.0f} "
                     f"| {b['state'] / n:.0f} | {row['bytes_per_parameter']:.2f} | {row['total'] / fp32:.2f}x |")
    lines += ["", "Share of the weights one fp32 AdamW step changes whose bf16 value it leaves unchanged (what storing "
              "the weights in bf16 without a master loses): " + ", ".join(f"LR {lr:g}: {share:.1%}"
                                                                        for lr, share in lost.items()) + "."]
    lines += ["", VERDICT]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from common import machine, write_json, write_section

        info = machine()
        write_json("param_memory", {"machine": info, "shape": name, "rows": rows,
                                    "rounded_away": {str(k): v for k, v in lost.items()}})
        header = (f"{info['date']}; {info['cpu']}, {info['cores']} cores; torch {info['torch']}. Bytes, not time: "
                  "`python benchmarks/bench_param_memory.py`.\n\n")
        write_section("param_memory", header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
