"""keel on one GPU: the trainer against bare loops, precision, every optimizer's step, Muon, SOAP, and the recipes
headline in wall-clock, at GPT-2-small shapes. One command, under 8 minutes on an H200.

Sections (each measured side by side in one process, contenders in turns; see ../shared/BENCHMARKS.md):

1. **trainer**: `keel train recipe=baseline` (AdamW, clipping, bf16) against a bare nanoGPT-style loop on the same
   model, batches and optimizer, eager and with `torch.compile` (keel's `compile: true`): tokens/s and MFU. The
   bare loop's blocks of steps run inside keel's run between its own blocks (A B A B ...), the first steps
   (compilation, autotuning) untimed; every block starts and ends with a device synchronisation.
2. **precision**: the bare eager loop in fp32, fp32 with TF32 matmuls, and bf16 autocast: tokens/s.
3. **optimizers**: every registered optimizer's step at GPT-2-small shapes (163M parameters with a 50,304-token
   vocabulary, gradients random), keel's Lion and AdEMAMix compiled and eager, Muon batched and one matrix at a
   time; eta = minimum bytes / step time / the bandwidth of a `lerp_` probe over as many elements (12 bytes each).
4. **muon**: keel's Muon step against `torch.optim.Muon` on the 48 hidden matrices, and the Newton-Schulz
   iterations alone, stacked by shape against one matrix at a time (their TFLOP/s).
5. **soap**: SOAP on the 12 blocks (85M): the step averaged over one preconditioner period (one refresh) against
   the model's forward and backward at the training batch; the batched TF32 path against the per-parameter one.
6. **headline**: `recipe=fast` against `recipe=baseline` with the baseline's peak LR tuned over `lrs` (>= 3 points),
   all runs interleaved step by step (`bench_recipes.Baton`), on the byte-level `stdlib` corpus: tokens and
   training seconds to the tuned baseline's final validation loss (`bench_recipes.crossing`). Goal: >= 3x less
   wall-clock.

MFU = model FLOPs per token (`Task.flops_per_token`: 6N + 12 L d T, N counting every matrix parameter including the
output head) x tokens/s / the GPU's dense bf16 peak (`keel.train.performance`; `--peak-tflops` otherwise).

Run:  python benchmarks/bench_gpu.py                    (on a GPU: writes the "GPU" section of RESULTS.md and
                                                         benchmarks/results/gpu.json)
      python benchmarks/bench_gpu.py --smoke --out DIR  (a tiny budget on the CPU: every section's arithmetic end to
                                                         end in seconds; writes gpu.json and gpu.md into DIR only)
Options: --sections trainer,precision,... (a subset), --minutes 8 (a section expected to end later is skipped and
listed), --peak-tflops P.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_recipes import Baton, crossing  # noqa: E402
from common import machine, summary, write_json, write_section  # noqa: E402

#: Run in this order (the headline and the trainer first: they matter most if time runs short).
SECTIONS = ("trainer", "headline", "muon", "optimizers", "soap", "precision")
#: Rough seconds each section takes on an H200 with cold torch.compile caches (three compiles of GPT-2 small in
#: "trainer", two of the optimizers' update in "optimizers"): a section that would end past --minutes is skipped.
EXPECTED_SECONDS = {"trainer": 150, "headline": 90, "muon": 20, "optimizers": 100, "soap": 60, "precision": 30}
GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024}
BUDGETS = {
    "gpu": {"model": GPT2, "batch": 16, "vocab": 50304, "warmup": 5, "block": 10, "blocks": 3,
            "precision_block": 4, "optimizer_steps": 10, "soap_frequency": 10, "train_tokens": 20_000_000,
            "headline": {"steps": 300, "eval_interval": 20, "eval_tokens": 131072, "lrs": [1e-3, 2e-3, 4e-3],
                         "source": "stdlib"},
            "peak": None, "compile_backend": None},
    "smoke": {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16}, "batch": 2, "vocab": 256,
              "warmup": 1, "block": 2, "blocks": 2, "precision_block": 1, "optimizer_steps": 1, "soap_frequency": 2,
              "train_tokens": 50_000,
              "headline": {"steps": 12, "eval_interval": 4, "eval_tokens": 256, "lrs": [1e-3, 2e-3, 4e-3],
                           "source": "pydoc", "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
                           "batch": 4},
              "peak": 0.05, "compile_backend": "eager"},
}
#: Minimum bytes an update reads and writes per float32 parameter (BENCHMARKS.md; torch's rules as bench_optim.py).
BYTES_PER_PARAM = {"sgd": 12, "momentum": 20, "nesterov": 20, "rmsprop": 20, "adam": 28, "adamw": 28, "nadam": 28,
                   "radam": 28, "lion": 20, "ademamix": 36}
#: The figures issue 21 measured on an H200 (torch 2.11) before this work, shown beside the new ones.
BEFORE = {
    "bare eager tokens/s": 509e3, "bare compiled tokens/s": 609e3, "keel baseline tokens/s": 487e3,
    "keel fast tokens/s": 280e3, "keel muon step ms": 27.6, "torch muon step ms": 26.1, "lion eta": 0.50,
    "ademamix eta": 0.67, "fused adamw eta": 0.90, "soap step ms": 137.0, "fp32 tokens/s": 75e3,
    "tf32 tokens/s": 202e3, "bf16 tokens/s": 484e3, "headline seconds speedup": 1.34, "headline tokens speedup": 9.4,
}
TARGETS = {"keel eager / bare eager": 0.99, "keel compiled / bare compiled": 0.97, "muon step ms": 4.0,
           "fast / baseline tokens/s": 0.9, "lion eta": 0.85, "ademamix eta": 0.85, "soap / fwd+bwd": 1.0,
           "headline seconds speedup": 3.0}


# ---- clocks and devices ------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of `fn` over `repeats` back-to-back calls, the device synchronised before and after (so a
    call's launches overlap the previous call's kernels as in training)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def gpu_info() -> dict | None:
    """The GPU, its driver, CUDA and torch versions (BENCHMARKS.md: recorded with every GPU figure)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__}


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """torch.compile with `backend` (the smoke budget's "eager": the wiring without a compiler's minute)."""
    if backend is None:
        yield
        return
    real = torch.compile

    def compile_with(model=None, **options):
        options["backend"] = backend
        return real(model, **options) if model is not None else real(**options)

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = real


def free_memory() -> None:
    """Between contenders on a GPU: collect and give back cached blocks (the next one needs the memory)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def token_folder(root: Path, vocab: int, tokens: int) -> Path:
    """A folder with random train.bin / val.bin uint16 tokens (BENCHMARKS.md: random data, never zeros)."""
    folder = root / f"tokens-{vocab}"
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for name, size in (("train.bin", tokens), ("val.bin", max(tokens // 20, 100_000))):
        generator.integers(0, vocab, size=size, dtype=np.uint16).tofile(folder / name)
    return folder


# ---- the keel run and the bare loop ------------------------------------------------------------------------------

def lm_config(budget: dict, data: Path, device: torch.device, run_dir: Path, **changes):
    from keel.config import TrainConfig

    raw = {"recipe": "baseline", "max_steps": 10**6, "eval_interval": 10**9, "checkpoint_interval": 10**9,
           "device": device.type, "model": dict(budget["model"]), "sample": {"tokens": 0},
           "data": {"source": str(data), "vocab_size": budget["vocab"], "batch_size": budget["batch"],
                    "eval_tokens": budget["batch"] * budget["model"]["block_size"]},
           "progress_interval": 10**9, "out_dir": str(run_dir), "precision": "bf16", "compile": False,
           "mfu_peak_tflops": budget["peak"]}
    for key, value in changes.items():
        raw[key] = value
    return TrainConfig.model_validate(raw)


class BareLoop:
    """A hand-written nanoGPT-style step on the task's model and batches: set the LR, forward under autocast, backward,
    clip at 1.0, torch's fused AdamW (keel's parameter groups), read the loss. `precision`: bf16 (with TF32 for
    what autocast leaves in float32, as keel's defaults), fp32 (full float32) or tf32 (float32 on TF32 cores)."""

    def __init__(self, config, device: torch.device, precision: str = "bf16", compiled: bool = False) -> None:
        from keel import tasks
        from keel.optim.param_groups import build_param_groups

        torch.manual_seed(config.seed)
        self.task, self.device, self.precision = tasks.from_config(config), device, precision
        self.model = self.task.build_model().to(device)
        self.forward = torch.compile(self.model) if compiled else self.model
        groups = build_param_groups(self.model, weight_decay=0.1)
        self.opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.95), fused=True)
        self.index = 0
        self.tokens_per_step = config.data.batch_size * config.model.block_size

    def step(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (self.index + 1) / 100)
        x, y = self.task.train_batch(self.index)
        self.index += 1
        count = self.task.count((x, y))
        if self.device.type == "cuda":
            x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        tf32 = contextlib.nullcontext()
        if self.device.type == "cuda":
            from keel.precision import cuda_tf32

            tf32 = cuda_tf32(self.precision != "fp32")  # bf16 as keel's default: TF32 for what stays float32
        with tf32:
            with autocast:
                loss = self.task.loss(self.forward, (x, y)) / count
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # a logging loop reads its loss every step, as keel does

    def flops_per_token(self) -> float | None:
        return self.task.flops_per_token(self.model)


class _Done(Exception):
    """Raised by the turns callback when keel's last timed block ends: no end-of-run evaluation or checkpoint."""


def keel_against_bare(config, bare: BareLoop, budget: dict, device: torch.device) -> dict:
    """keel's trainer and `bare` in turns: `blocks` blocks of `block` steps each, after `warmup` untimed steps."""
    from keel.techniques import Callback
    from keel.train import Trainer

    warmup, block, blocks = budget["warmup"], budget["block"], budget["blocks"]
    times = {"keel": [], "bare": []}

    class Turns(Callback):
        name = "bench_turns"
        started: float | None = None

        def on_step_start(self, trainer) -> None:
            step = trainer.state.step
            if step == 0:
                for _ in range(warmup):
                    bare.step()
            if step < warmup or (step - warmup) % block:
                return
            synchronize(device)
            if self.started is not None:
                times["keel"].append(time.perf_counter() - self.started)
            if len(times["keel"]) == blocks:
                raise _Done
            times["bare"].append(timed(lambda: [bare.step() for _ in range(block)], device))
            self.started = time.perf_counter()

    trainer = Trainer(config, callbacks=[Turns()], quiet=True)
    try:
        trainer.fit()
    except _Done:
        pass
    tokens = config.data.batch_size * config.model.block_size * block
    flops = trainer.task.flops_per_token(trainer.model)
    out = {"compiled": trainer.compiled, "flops_per_token": flops, "tokens_per_block": tokens,
           "block_seconds": times, "ratio_keel_over_bare": summary([b / k for k, b in zip(times["keel"],
                                                                                           times["bare"])])}
    for who in ("keel", "bare"):
        out[f"{who}_tokens_per_second"] = tokens / statistics.median(times[who])
    del trainer
    free_memory()
    return out


def add_mfu(row: dict, flops: float | None, peak: float | None) -> None:
    for who in ("keel", "bare"):
        key = f"{who}_tokens_per_second"
        if key in row:
            row[f"{who}_mfu"] = mfu(flops, row[key], peak)


def mfu(flops_per_token: float | None, tokens_per_second: float, peak: float | None) -> float | None:
    from keel.train.performance import mfu as keel_mfu

    return keel_mfu(flops_per_token, round(tokens_per_second * 1e6), 1e6, peak)


# ---- sections ----------------------------------------------------------------------------------------------------

def section_trainer(ctx: dict) -> dict:
    budget, device, root = ctx["budget"], ctx["device"], ctx["root"]
    out = {}
    with compile_backend(budget["compile_backend"]):
        for name, compiled in (("eager", False), ("compiled", True)):
            config = lm_config(budget, ctx["data"], device, root / f"trainer-{name}", compile=compiled)
            bare = BareLoop(config, device, "bf16", compiled=compiled)
            row = keel_against_bare(config, bare, budget, device)
            add_mfu(row, row["flops_per_token"], ctx["peak"])
            out[name] = row
            del bare
            free_memory()
            ctx["say"](f"trainer {name}: keel {row['keel_tokens_per_second']:,.0f} tokens/s, bare "
                       f"{row['bare_tokens_per_second']:,.0f}, keel / bare {row['ratio_keel_over_bare']['median']:.3f}")
    return out


def section_precision(ctx: dict) -> dict:
    budget, device = ctx["budget"], ctx["device"]
    config = lm_config(budget, ctx["data"], device, ctx["root"] / "precision")
    loops = {p: BareLoop(config, device, p) for p in ("fp32", "tf32", "bf16")}
    for loop in loops.values():
        for _ in range(budget["warmup"]):
            loop.step()
    times = {p: [] for p in loops}
    for _ in range(budget["blocks"]):
        for p, loop in loops.items():
            times[p].append(timed(loop.step, device, budget["precision_block"]))
    out = {p: {"tokens_per_second": ctx["tokens_per_step"] / statistics.median(t), "step_seconds": t}
           for p, t in times.items()}
    for p in out:
        out[p]["over_fp32"] = summary([a / b for a, b in zip(times["fp32"], times[p])])
    ctx["say"]("precision: " + ", ".join(f"{p} {r['tokens_per_second']:,.0f} tokens/s" for p, r in out.items()))
    del loops
    free_memory()
    return out


def _gpt_with_gradients(budget: dict, device: torch.device, blocks_only: bool = False):
    from keel.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=budget["vocab"], **budget["model"])).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if blocks_only:
        return model, list(model.blocks.parameters())
    return model, list(model.parameters())


def _probe(params: list[torch.Tensor], device: torch.device, repeats: int) -> tuple[float, float]:
    """A `lerp_` over as many float32 elements as `params` hold: (seconds, bytes per second at 12 bytes each)."""
    numel = sum(p.numel() for p in params)
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    a.lerp_(b, 0.5)
    seconds = statistics.median(timed(lambda: a.lerp_(b, 0.5), device, repeats) for _ in range(3))
    del a, b
    return seconds, 12 * numel / seconds


def section_optimizers(ctx: dict) -> dict:
    import keel.optim as ko
    from keel.optim.multi_tensor import _make_list_update

    budget, device, steps = ctx["budget"], ctx["device"], ctx["budget"]["optimizer_steps"]
    model, params = _gpt_with_gradients(budget, device)
    numel = sum(p.numel() for p in params)
    probe_seconds, bandwidth = _probe(params, device, steps)
    variants = [(name, {}) for name in ko.names() if name != "soap"]
    variants += [("lion", {"fused": True}), ("lion", {"fused": False}), ("ademamix", {"fused": True}),
                 ("ademamix", {"fused": False}), ("muon", {"batched": False})]
    rows = []
    for name, options in variants:
        if name == "muon" and not hasattr(torch.optim, "Muon"):
            continue
        restore = None
        if budget["compile_backend"] and options.get("fused"):  # smoke: the fused rule uncompiled
            cls = ko.Lion if name == "lion" else ko.AdEMAMix
            restore = (cls, cls._compiled)
            cls._compiled = _make_list_update(cls._update_tensor)
        opt = ko.create(name, model, **options)
        first = timed(opt.step, device)  # includes a compile where there is one
        seconds = statistics.median(timed(opt.step, device, steps) for _ in range(3))
        path = _path_of(opt)
        row = {"optimizer": name, "options": options, "path": path, "step_ms": seconds * 1e3,
               "first_step_s": first, "numel": numel}
        if name in BYTES_PER_PARAM:
            row["eta"] = BYTES_PER_PARAM[name] * numel / seconds / bandwidth
        rows.append(row)
        if restore is not None:
            restore[0]._compiled = restore[1]
        del opt
        free_memory()
        ctx["say"](f"optimizer {name} {options or ''} ({path}): {seconds * 1e3:.2f} ms"
                   + (f", eta {row['eta']:.2f}" if "eta" in row else ""))
    for name in ("lion", "ademamix"):
        fused = _row(rows, name, {"fused": True})
        eager = _row(rows, name, {"fused": False})
        if fused and eager and eager["step_ms"] > fused["step_ms"]:
            fused["steps_to_repay_compile"] = fused["first_step_s"] / ((eager["step_ms"] - fused["step_ms"]) / 1e3)
    del model, params
    free_memory()
    return {"numel": numel, "probe_seconds": probe_seconds, "bandwidth_bytes_per_second": bandwidth, "rows": rows}


def _path_of(opt) -> str:
    """Which implementation a keel optimizer runs: compiled / eager, batched / one at a time, fused / foreach."""
    if hasattr(opt, "_use_fused"):
        return "compiled" if opt._use_fused() else "eager (foreach)"
    if hasattr(opt, "uses_batched"):
        return "batched" if opt.uses_batched() else "one matrix at a time"
    group = opt.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "per-tensor loop"


def _row(rows: list[dict], name: str, options: dict) -> dict | None:
    return next((r for r in rows if r["optimizer"] == name and r["options"] == options), None)


def ns_flops(shapes: list[tuple[int, int]], steps: int = 5) -> float:
    """FLOPs of `steps` quintic Newton-Schulz iterations on matrices of `shapes` (rows <= cols after a transpose):
    per iteration X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n)."""
    total = 0.0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def section_muon(ctx: dict) -> dict:
    import keel.optim as ko
    from keel.optim.muon import muon_split, newton_schulz

    if not hasattr(torch.optim, "Muon"):
        return {"skipped": "torch.optim.Muon needs torch >= 2.9"}
    budget, device, steps = ctx["budget"], ctx["device"], ctx["budget"]["optimizer_steps"]
    model, _ = _gpt_with_gradients(budget, device)
    label = muon_split(model)
    hidden = [p for n, p in model.named_parameters() if label(n, p) == "muon"]
    contenders = {"keel muon (hybrid, auto)": ko.create("muon", model),
                  "keel muon (hybrid, one matrix at a time)": ko.create("muon", model, batched=False),
                  "keel muon (hidden matrices only, auto)": ko.MuonWithAdamW([{"params": hidden, "kind": "muon"}]),
                  "torch.optim.Muon (hidden matrices only)": torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01)}
    for opt in contenders.values():
        opt.step()
    times = {name: [] for name in contenders}
    for _ in range(3):
        for name, opt in contenders.items():
            times[name].append(timed(opt.step, device, steps))
    out = {"matrices": len(hidden), "steps_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
           "auto_batched": contenders["keel muon (hybrid, auto)"].uses_batched()}
    # the iterations alone: stacks by shape (tall ones transposed) against one matrix at a time
    grads = [p.grad.bfloat16() for p in hidden]
    shapes = [tuple(g.shape) for g in grads]
    stacks: dict[tuple, list] = {}
    for g in grads:
        stacks.setdefault(tuple(sorted(g.shape)), []).append(g.mT if g.shape[0] > g.shape[1] else g)
    stacked = [torch.stack(v) for v in stacks.values()]
    zeropower = getattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz", None)
    runs = {"stacked by shape (keel)": lambda: [newton_schulz(s) for s in stacked]}
    if zeropower is not None:
        runs["one matrix at a time (torch)"] = lambda: [zeropower(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
                                                        for g in grads]
    ns = {}
    for name, fn in runs.items():
        fn()
        seconds = statistics.median(timed(fn, device, steps) for _ in range(3))
        ns[name] = {"ms": seconds * 1e3, "tflops": ns_flops(shapes) / seconds / 1e12}
    out["newton_schulz"] = ns
    out["stacks"] = {f"{k[0]}x{k[1]}": len(v) for k, v in stacks.items()}
    out["ns_tflop"] = ns_flops(shapes) / 1e12
    ctx["say"]("muon: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in out["steps_ms"].items()))
    del contenders, model, hidden, grads, stacked
    free_memory()
    return out


def section_soap(ctx: dict) -> dict:
    import keel.optim as ko

    budget, device = ctx["budget"], ctx["device"]
    frequency = budget["soap_frequency"]
    model, params = _gpt_with_gradients(budget, device, blocks_only=True)
    out = {"numel": sum(p.numel() for p in params), "precondition_frequency": frequency}
    for name, options in (("batched, auto precision", {}),
                          ("per parameter, highest", {"batched": False, "matmul_precision": "highest"})):
        opt = ko.create("soap", params, precondition_frequency=frequency, **options)
        first = timed(opt.step, device)  # initialises: eigendecompositions
        period = timed(opt.step, device, frequency)  # one period: one refresh
        out[name] = {"init_s": first, "step_ms": period * 1e3, "path": _path_of(opt),
                     "products": opt.products()}
        ctx["say"](f"soap {name}: {period * 1e3:.2f} ms a step over a period (init {first:.1f} s)")
        del opt
        free_memory()
    # the model's forward and backward at the training batch (bf16 autocast)
    x = torch.randint(0, budget["vocab"], (budget["batch"], budget["model"]["block_size"]), device=device)
    from keel.models import lm_loss_sum

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss_sum(model(x), x) / x.numel()
        loss.backward()

    forward_backward()
    out["forward_backward_ms"] = statistics.median(timed(forward_backward, device, 3) for _ in range(3)) * 1e3
    out["soap_over_step"] = out["batched, auto precision"]["step_ms"] / out["forward_backward_ms"]
    del model, params, x
    free_memory()
    return out


# ---- headline: recipe=fast against the tuned recipe=baseline, interleaved step by step -----------------------------

def headline_config(budget: dict, device: torch.device, recipe: str, lr: float | None, run_dir: Path):
    from keel.config import TrainConfig

    h = budget["headline"]
    model = h.get("model", budget["model"])
    raw = {"recipe": recipe, "max_steps": h["steps"], "eval_interval": h["eval_interval"],
           "checkpoint_interval": 10**9, "device": device.type, "model": dict(model), "sample": {"tokens": 0},
           "data": {"source": h["source"], "batch_size": h.get("batch", budget["batch"]),
                    "eval_tokens": h["eval_tokens"]},
           "progress_interval": 10**9, "out_dir": str(run_dir), "mfu_peak_tflops": budget["peak"]}
    if lr is not None:
        raw["optimizer"] = {"lr": lr}
    return TrainConfig.model_validate(raw)


def interleaved_runs(configs: list, device: torch.device) -> list[dict]:
    """Train `configs` in threads taking turns step by step; each run's evaluations with its training seconds
    (device synchronised around each step; evaluations excluded)."""
    from keel.techniques import Callback
    from keel.train import train

    baton = Baton(len(configs))
    results: list[dict | None] = [None] * len(configs)

    class Clock(Callback):
        name = "bench_clock"

        def __init__(self, index: int) -> None:
            self.index, self.seconds, self.started = index, 0.0, 0.0

        def on_step_start(self, trainer) -> None:
            baton.pass_on(self.index)
            baton.wait(self.index)
            synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, trainer) -> None:
            synchronize(device)
            self.seconds += time.perf_counter() - self.started

        def on_eval(self, trainer, metrics: dict) -> None:
            metrics["train_seconds"] = self.seconds

    def worker(i: int) -> None:
        baton.wait(i)
        try:
            result = train(configs[i], callbacks=[Clock(i)], quiet=True)
            results[i] = {"evals": [r for r in result["history"] if r.get("kind") == "eval"],
                          "steps": [r for r in result["history"] if "grad_norm" in r]}
        except Exception as error:  # a diverging LR is a result, not a crash of the benchmark
            results[i] = {"evals": [], "steps": [], "error": f"{type(error).__name__}: {error}"}
        finally:
            baton.pass_on(i, done=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def points(run: dict) -> list[dict]:
    """A run's evaluations as the (step, tokens, seconds, loss) points `bench_recipes.crossing` reads."""
    return [{"step": r["step"], "tokens": r["tokens"], "seconds": r["train_seconds"],
             "loss": r["val_loss"] if math.isfinite(r.get("val_loss", math.nan)) else math.inf} for r in run["evals"]]


def headline_table(runs: list[dict]) -> dict:
    """The tuned baseline (least final validation loss), its final loss as the target, and each run's tokens and
    seconds to it; speedups = baseline / fast."""
    baselines = [r for r in runs if r["recipe"] == "baseline" and r["evals"]]
    tuned = min(baselines, key=lambda r: points(r)[-1]["loss"])
    target = points(tuned)[-1]["loss"]
    out = {"target": target, "tuned_baseline_lr": tuned["lr"], "rows": []}
    base_hit = crossing(points(tuned), target)
    for run in runs:
        hit = crossing(points(run), target) if run["evals"] else None
        tokens_per_second = (run["evals"][-1]["tokens"] / run["evals"][-1]["train_seconds"]) if run["evals"] else None
        row = {"recipe": run["recipe"], "lr": run["lr"], "final": points(run)[-1]["loss"] if run["evals"] else None,
               "hit": hit, "tokens_per_second": tokens_per_second, "error": run.get("error")}
        if hit is not None:
            row["tokens_speedup"] = base_hit["tokens"] / hit["tokens"]
            row["seconds_speedup"] = base_hit["seconds"] / hit["seconds"]
        out["rows"].append(row)
    fast = next(r for r in out["rows"] if r["recipe"] == "fast")
    base = next(r for r in out["rows"] if r["recipe"] == "baseline" and r["lr"] == tuned["lr"])
    if fast["tokens_per_second"] and base["tokens_per_second"]:
        out["fast_over_baseline_tokens_per_second"] = fast["tokens_per_second"] / base["tokens_per_second"]
    out["seconds_speedup"] = fast.get("seconds_speedup")
    out["tokens_speedup"] = fast.get("tokens_speedup")
    return out


def section_headline(ctx: dict) -> dict:
    budget, device, root = ctx["budget"], ctx["device"], ctx["root"]
    arms = [("baseline", lr) for lr in budget["headline"]["lrs"]] + [("fast", None)]
    configs = [headline_config(budget, device, recipe, lr, root / f"headline-{i}") for i, (recipe, lr) in
               enumerate(arms)]
    results = interleaved_runs(configs, device)
    runs = [{"recipe": recipe, "lr": lr if lr is not None else configs[i].optimizer["lr"], **result}
            for i, ((recipe, lr), result) in enumerate(zip(arms, results))]
    table = headline_table(runs)
    ctx["say"](f"headline: fast reaches the tuned baseline's {table['target']:.4f} with "
               f"{_x(table['tokens_speedup'])} fewer tokens, {_x(table['seconds_speedup'])} less training time")
    compact = [{**{k: v for k, v in r.items() if k not in ("evals", "steps")},
                "evals": [{k: e[k] for k in ("step", "tokens", "val_loss", "train_seconds") if k in e}
                          for e in r["evals"]],
                "mfu": statistics.median([s["mfu"] for s in r["steps"] if "mfu" in s]) if any(
                    "mfu" in s for s in r["steps"]) else None} for r in runs]
    return {**table, "runs": compact, "steps": budget["headline"]["steps"]}


# ---- report ------------------------------------------------------------------------------------------------------

def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _verdict(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= target if higher else value <= target) else "miss"


def report(data: dict) -> str:
    g, m = data.get("gpu") or {}, data["machine"]
    where = (f"{g['name']} ({g['memory_gib']} GiB, compute capability {g['capability']}), driver {g['driver']}, "
             f"CUDA {g['cuda']}" if g else f"no GPU ({m['cpu']}, a smoke run)")
    b = data["budget"]
    lines = [f"`python benchmarks/bench_gpu.py{' --smoke' if data['budget_name'] == 'smoke' else ''}` — {m['date']}; "
             f"{where}; torch {m['torch']}; {data['minutes']:.1f} min. Model: keel's GPT, {b['model']['n_layer']} "
             f"layers, width {b['model']['n_embd']}, context {b['model']['block_size']}, vocabulary {b['vocab']}, "
             f"batch {b['batch']}; random tokens. MFU against {data['peak']} TFLOP/s (6N + 12 L d T FLOPs per token, "
             "N counting the output head's matrix). \"before\": the figures issue 21 measured on an H200 with torch "
             "2.11 before this work.", ""]
    if data.get("interrupted"):
        lines += [f"Interrupted by its time limit during: {data['interrupted']} (no figures of that section).", ""]
    if data.get("skipped"):
        lines += [f"Not run (past the time limit): {', '.join(data['skipped'])}.", ""]
    for name, error in data.get("errors", {}).items():
        lines += [f"Section {name} failed: `{error.splitlines()[0][:300]}` (traceback in gpu.json).", ""]
    s = data["sections"]
    if "trainer" in s:
        t = s["trainer"]
        lines += ["### trainer against bare loops (bf16, AdamW, clipping)", "",
                  "| loop | tokens/s | MFU | keel / bare | target | before |", "|---|---|---|---|---|---|"]
        for name, before_keel, before_bare, target in (
                ("eager", BEFORE["keel baseline tokens/s"], BEFORE["bare eager tokens/s"],
                 TARGETS["keel eager / bare eager"]),
                ("compiled", None, BEFORE["bare compiled tokens/s"], TARGETS["keel compiled / bare compiled"])):
            r = t[name]
            ratio = r["ratio_keel_over_bare"]
            lines.append(f"| keel, {name} (compile: {str(r['compiled']).lower()}) | {r['keel_tokens_per_second']:,.0f} | "
                         f"{_pct(r.get('keel_mfu'))} | {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] "
                         f"| >= {target} ({_verdict(ratio['median'], target)}) | "
                         f"{'-' if before_keel is None else f'{before_keel:,.0f}'} |")
            lines.append(f"| bare, {name} | {r['bare_tokens_per_second']:,.0f} | {_pct(r.get('bare_mfu'))} | | | "
                         f"{before_bare:,.0f} |")
        lines.append("")
    if "precision" in s:
        p = s["precision"]
        lines += ["### precision (bare eager loop)", "", "| precision | tokens/s | x fp32 | before |",
                  "|---|---|---|---|"]
        for name in ("fp32", "tf32", "bf16"):
            lines.append(f"| {name} | {p[name]['tokens_per_second']:,.0f} | {p[name]['over_fp32']['median']:.2f} | "
                         f"{BEFORE[f'{name} tokens/s']:,.0f} |")
        lines.append("")
    if "optimizers" in s:
        o = s["optimizers"]
        lines += [f"### optimizer steps ({o['numel']:,} float32 parameters; probe "
                  f"{o['bandwidth_bytes_per_second'] / 1e12:.2f} TB/s)", "",
                  "| optimizer | options | path | step ms | eta | first step s | steps to repay a compile |",
                  "|---|---|---|---|---|---|---|"]
        for r in o["rows"]:
            options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
            repay = f"{r['steps_to_repay_compile']:,.0f}" if "steps_to_repay_compile" in r else ""
            lines.append(f"| {r['optimizer']} | {options} | {r['path']} | {r['step_ms']:.2f} | "
                         f"{r['eta']:.2f} | {r['first_step_s']:.1f} | {repay} |" if "eta" in r else
                         f"| {r['optimizer']} | {options} | {r['path']} | {r['step_ms']:.2f} | - | "
                         f"{r['first_step_s']:.1f} | {repay} |")
        from keel.optim.multi_tensor import CUDA_COMPILE_PAYS_ELEMENT_STEPS

        lines.append("")
        for name in ("lion", "ademamix"):
            fused, eager = _row(o["rows"], name, {"fused": True}), _row(o["rows"], name, {"fused": False})
            if fused and eager:
                target = TARGETS[f"{name} eta"]
                repay = fused.get("steps_to_repay_compile")
                lines.append(f"- {name}: compiled eta {fused['eta']:.2f} (target >= {target}: "
                             f"{_verdict(fused['eta'], target)}; before {BEFORE[f'{name} eta']}), eager "
                             f"{eager['eta']:.2f}; `fused: null` compiles on CUDA for runs of at least "
                             f"{CUDA_COMPILE_PAYS_ELEMENT_STEPS / o['numel']:,.0f} steps at these shapes; the first "
                             f"compiled step took {fused['first_step_s']:.0f} s"
                             + (f", repaid after {repay:,.0f} steps." if repay else "."))
        lines.append("")
    if "muon" in s and "steps_ms" in s["muon"]:
        mu = s["muon"]
        torch_ms = mu["steps_ms"]["torch.optim.Muon (hidden matrices only)"]
        lines += [f"### Muon ({mu['matrices']} hidden matrices; stacks {mu['stacks']})", "",
                  "| contender | step ms | x torch.optim.Muon | target | before |", "|---|---|---|---|---|"]
        for name, ms in mu["steps_ms"].items():
            target = f"<= {TARGETS['muon step ms']} ms ({_verdict(ms, TARGETS['muon step ms'], higher=False)})" \
                if "auto" in name else ""
            before = BEFORE["keel muon step ms"] if "auto" in name else BEFORE["torch muon step ms"] \
                if "torch" in name else ""
            lines.append(f"| {name} | {ms:.2f} | {torch_ms / ms:.2f} | {target} | {before} |")
        lines += ["", f"Newton-Schulz alone ({mu['ns_tflop']:.2f} TFLOP): " + "; ".join(
            f"{n} {v['ms']:.2f} ms ({v['tflops']:.0f} TFLOP/s)" for n, v in mu["newton_schulz"].items()), ""]
    if "soap" in s:
        so = s["soap"]
        lines += [f"### SOAP ({so['numel']:,} parameters of the blocks, precondition_frequency "
                  f"{so['precondition_frequency']})", "",
                  "| path | products | step ms (period average) | init s |", "|---|---|---|---|"]
        for name in ("batched, auto precision", "per parameter, highest"):
            r = so[name]
            lines.append(f"| {name} | {r['products']} | {r['step_ms']:.1f} | {r['init_s']:.1f} |")
        lines += ["", f"Forward + backward of the model at the training batch: {so['forward_backward_ms']:.1f} ms; SOAP / "
                      f"step {so['soap_over_step']:.2f} (target <= {TARGETS['soap / fwd+bwd']}: "
                      f"{_verdict(so['soap_over_step'], TARGETS['soap / fwd+bwd'], higher=False)}); before "
                      f"{BEFORE['soap step ms']} ms.", ""]
    if "headline" in s:
        h = s["headline"]
        hb = b["headline"]
        lines += [f"### headline: recipe=fast against the tuned recipe=baseline ({h['steps']} steps, "
                  f"`{hb['source']}`, one seed)", "",
                  f"Target: the tuned baseline's (LR {h['tuned_baseline_lr']:g}) final validation loss "
                  f"{h['target']:.4f}. Runs interleaved step by step; training seconds exclude evaluations.", "",
                  "| recipe | peak LR | final val loss | tokens to target | seconds to target | tokens speedup | "
                  "seconds speedup | tokens/s | MFU |", "|---|---|---|---|---|---|---|---|---|"]
        for r, run in zip(h["rows"], h["runs"]):
            hit = r["hit"]
            final = "-" if r["final"] is None else f"{r['final']:.4f}"
            tokens = "not reached" if hit is None else f"{hit['tokens']:,.0f}"
            seconds = "-" if hit is None else f"{hit['seconds']:.1f}"
            speed = "-" if not r["tokens_per_second"] else f"{r['tokens_per_second']:,.0f}"
            lines.append(f"| {r['recipe']} | {r['lr']:g} | {final} | {tokens} | {seconds} | "
                         f"{_x(r.get('tokens_speedup'))} | {_x(r.get('seconds_speedup'))} | {speed} | "
                         f"{_pct(run.get('mfu'))} |")
        ratio = h.get("fast_over_baseline_tokens_per_second")
        fast = next(r for r in h["rows"] if r["recipe"] == "fast")
        verdict = _verdict(h["seconds_speedup"], TARGETS["headline seconds speedup"]) if fast["hit"] else \
            f"miss: fast did not reach the target within the run (final {fast['final']})"
        lines += ["", f"Goal >= {TARGETS['headline seconds speedup']}x less wall-clock: {_x(h['seconds_speedup'])} "
                      f"({verdict}); fast / baseline "
                      f"tokens/s {'-' if ratio is None else f'{ratio:.2f}'} (target >= "
                      f"{TARGETS['fast / baseline tokens/s']}); before: {BEFORE['headline tokens speedup']}x tokens, "
                      f"{BEFORE['headline seconds speedup']}x seconds.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget on the CPU (results into --out only)")
    parser.add_argument("--out", help="where to write gpu.json and gpu.md instead of benchmarks/")
    parser.add_argument("--sections", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--minutes", type=float, default=8.0, help="skip sections expected to end after this")
    parser.add_argument("--peak-tflops", type=float, help="the peak MFU is measured against (default: the GPU's)")
    args = parser.parse_args(argv)
    budget_name = "smoke" if args.smoke else "gpu"
    budget = BUDGETS[budget_name]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device here: run on a GPU machine, or --smoke for the CPU check")
    chosen = SECTIONS if not args.sections else tuple(s for s in args.sections.split(","))
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: {', '.join(unknown)} unknown; allowed: {', '.join(SECTIONS)}")
    if args.smoke:
        torch.set_num_threads(1)
    from keel.train.performance import peak_tflops

    peak = args.peak_tflops or peak_tflops(device, budget["peak"])
    budget = {**budget, "peak": peak}
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="keel-bench-gpu-"))

    def say(line: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {line}", flush=True)

    ctx = {"budget": budget, "device": device, "root": root, "say": say, "peak": peak,
           "tokens_per_step": budget["batch"] * budget["model"]["block_size"],
           "data": token_folder(root, budget["vocab"], budget["train_tokens"])}
    say(f"bench_gpu: budget {budget_name} on {device}; peak {peak} TFLOP/s")
    data = {"machine": machine(), "gpu": gpu_info(), "budget_name": budget_name,
            "budget": {k: v for k, v in budget.items() if k != "compile_backend"}, "peak": peak,
            "sections": {}, "skipped": [], "errors": {}, "targets": TARGETS, "before": BEFORE}
    functions = {"trainer": section_trainer, "precision": section_precision, "optimizers": section_optimizers,
                 "muon": section_muon, "soap": section_soap, "headline": section_headline}
    def publish() -> str:
        """Write what has been measured so far: a run cut short (time limit, Ctrl-C) keeps every finished section."""
        data["minutes"] = (time.time() - started) / 60
        body = report(data)
        if args.out or args.smoke:
            out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="keel-bench-gpu-out-"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
            (out / "gpu.md").write_text(body)
        else:
            write_json("gpu", json.loads(json.dumps(data, default=str)))
            write_section("GPU", body)
        return body

    try:
        for name in chosen:
            expected = 0 if args.smoke else EXPECTED_SECONDS[name]
            if time.time() - started + expected > args.minutes * 60:
                data["skipped"].append(name)
                say(f"{name}: skipped (it would end past {args.minutes} minutes)")
                continue
            try:
                data["sections"][name] = functions[name](ctx)
            except Exception as error:  # one failing section must not lose the others' figures
                data["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
                say(f"{name}: failed ({type(error).__name__}: {error})")
                free_memory()
            if not args.smoke:
                publish()
    except KeyboardInterrupt:  # SIGINT from a time limit: the sections measured so far are written below
        data["interrupted"] = name
        data["skipped"].extend(chosen[chosen.index(name) + 1:])
        say(f"{name}: interrupted; writing the sections measured so far")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = publish()
    print(body)
    return data


if __name__ == "__main__":
    main()
