"""Gradient clipping and the non-finite check against the memory-bandwidth floor and against torch's own.

Run: python benchmarks/bench_clip.py [--shapes nanogpt-char gpt2-small] [--repeats 9]

Method (benchmarks/BENCHMARKS.md): one thread; the contenders run in interleaved turns after a warm-up. Clipping
by global norm moves about 12 bytes per fp32 parameter (read for the norm, read and write to scale), the same as
one `a.lerp_(b, w)` over as many elements, which serves as the bandwidth probe of the same footprint:
eta = probe time / clip time. Ratios are per turn, reported as median (min-max).

Contenders: keel.grad.clip_by_global_norm vs torch.nn.utils.clip_grad_norm_(foreach=True), both scaling the
gradients every call; keel.grad.grads_are_finite (one fused max-abs reduction) vs the common per-tensor
loop `all(torch.isfinite(g).all() for g in grads)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, timed, write_section  # noqa: E402

from keel.grad import clip_by_global_norm, grads_are_finite
from keel.models import GPT, GPTConfig

HERE = Path(__file__).resolve().parent
SHAPES = {
    "nanogpt-char": dict(vocab_size=65, n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-small": dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def parameters_with_grads(shape: str) -> list[torch.nn.Parameter]:
    model = GPT(GPTConfig(**SHAPES[shape], dropout=0.0, bias=True))
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def bench_shape(shape: str, repeats: int) -> dict:
    params = parameters_with_grads(shape)
    grads = [p.grad for p in params]
    n = sum(g.numel() for g in grads)
    a, b = torch.randn(n), torch.randn(n)
    # Both contenders always scale the gradients (by min(1, threshold / norm), computed on the device), so every
    # turn does the same work whether or not the norm is still above the threshold.
    threshold = 1.0

    contenders = {
        "probe": lambda: a.lerp_(b, 0.5),
        "keel_clip": lambda: float(clip_by_global_norm(params, threshold)),
        "torch_clip": lambda: float(torch.nn.utils.clip_grad_norm_(params, threshold, foreach=True)),
        "keel_finite": lambda: grads_are_finite(params),
        "loop_finite": lambda: all(bool(torch.isfinite(g).all()) for g in grads),
    }
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for turn in range(repeats):
        order = list(contenders) if turn % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(timed(contenders[name]))
    per_turn = lambda f: [f(i) for i in range(repeats)]  # noqa: E731
    return {
        "parameters": n,
        "keel_clip_eta": summary(per_turn(lambda i: times["probe"][i] / times["keel_clip"][i])),
        "torch_clip_eta": summary(per_turn(lambda i: times["probe"][i] / times["torch_clip"][i])),
        "keel_clip_speedup_vs_torch": summary(per_turn(lambda i: times["torch_clip"][i] / times["keel_clip"][i])),
        "finite_speedup_vs_loop": summary(per_turn(lambda i: times["loop_finite"][i] / times["keel_finite"][i])),
        "floor_gb_s": 12 * n / statistics.median(times["probe"]) / 1e9,
    }


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["nanogpt-char"], choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {name: bench_shape(name, args.repeats) for name in args.shapes}
    info = machine()
    payload = {"machine": info, "results": results}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "clip.json").write_text(json.dumps(payload, indent=1))

    rows = "\n".join(
        f"| {name} | {r['parameters']:,} | {fmt(r['keel_clip_eta'])} | {fmt(r['torch_clip_eta'])} | "
        f"{fmt(r['keel_clip_speedup_vs_torch'])} | {fmt(r['finite_speedup_vs_loop'])} | {r['floor_gb_s']:.1f} |"
        for name, r in results.items()
    )
    load = ", ".join(str(x) for x in info["load_average"])
    body = (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {info['threads']} thread; load average {load}; "
        f"torch {info['torch']}. `python benchmarks/bench_clip.py`.\n\n"
        "Clipping by global norm (fp32, clipping every turn), median (min-max) over interleaved turns. eta = "
        "bandwidth floor (one `lerp_` over as many elements, 12 bytes/parameter) / clip time; speedup = "
        "`torch.nn.utils.clip_grad_norm_(foreach=True)` time / keel time. Non-finite check: the per-tensor loop "
        "`all(torch.isfinite(g).all() ...)` time / `keel.grad.grads_are_finite` time.\n\n"
        "| shape | parameters | keel clip eta | torch clip eta | keel clip speedup vs torch | "
        "finite-check speedup vs loop | floor GB/s |\n|---|---|---|---|---|---|---|\n" + rows + "\n"
    )
    write_section("clip", body)
    print(body)


if __name__ == "__main__":
    main()
