"""Optimizer step time: keel's Lion, AdEMAMix and SOAP against pytorch-optimizer's and torch's fused AdamW, and
torch's optimizers as `keel.optim.create` builds them against torch's three implementations of each.

Method (benchmarks/../shared BENCHMARKS.md): one thread; parameter shapes of nanoGPT-char (6 layers, width 384,
10.8M parameters) and GPT-2 small (12 layers, width 768, 124M, head tied); float32. Contenders run interleaved
(A B C A B C ...) after a warm-up (which includes keel's one-off torch.compile), and each figure is the median
over the repeats, ratios as the median of per-repeat ratios with min and max.

Bandwidth efficiency eta = (minimum bytes an update must move / step time) / bandwidth, the bandwidth measured in
the same run by a probe of the same footprint (`a.lerp_(b, w)` over as many elements as there are parameters, 12
bytes per element). Minimum bytes per parameter: AdamW 28, Lion 20, AdEMAMix 36.

Lion and AdEMAMix run compiled (`fused=True`) and eager (`fused=False`). Their first compiled step is timed in
two child processes sharing a fresh torch.compile cache directory: the first compiles from nothing (cold), the
second finds torch's on-disk cache (warm); "steps to repay" = cold first step / (eager - compiled step time).

torch's optimizers (sgd, momentum, nesterov, rmsprop, adam, adamw, nadam, radam, adafactor; AdamW only at GPT-2
shapes): `keel.optim.create(name, params)` with its defaults against the same torch class with the per-tensor
loop (`foreach=False, fused=False`, what torch runs on CPU by default), `foreach=True` and `fused=True` (where
torch has it). Minimum bytes per parameter: SGD 12, momentum, Nesterov and RMSprop 20, Adam, AdamW, NAdam and
RAdam 28 (Adafactor's factored state: no eta).

SOAP is bound by matrix products, not bandwidth: its figure is the step cost averaged over one preconditioner
period (`precondition_frequency` steps, one of which refreshes the eigenbases), against pytorch-optimizer's, and as
a fraction of a full training step of the model (forward, backward and a fused AdamW step) at the batch printed.
At GPT-2 shapes SOAP runs on the embeddings and one of the 12 blocks (every block has the same shapes), so that
the benchmark takes minutes rather than an hour on one thread.

Run: python benchmarks/bench_optim.py [--repeats 7] [--shapes char,gpt2] [--no-soap] [--warm-cache]
Writes benchmarks/results/optim.json and two subsections of the "## optimizers" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, timed  # noqa: E402

import keel.optim as ko

HERE = Path(__file__).resolve().parent
START = time.perf_counter()
STEP_TIME_HEADING = "### step time and bandwidth efficiency (CPU, one thread)"
TORCH_HEADING = "### torch's optimizers as keel.optim.create builds them (CPU, one thread)"
BYTES_PER_PARAM = {"adamw": 28, "lion": 20, "ademamix": 36}
TORCH_BYTES_PER_PARAM = {"sgd": 12, "momentum": 20, "nesterov": 20, "rmsprop": 20, "adam": 28, "adamw": 28,
                         "nadam": 28, "radam": 28, "adafactor": None}
#: torch arguments that make the torch class the registry record: keel keeps torch's defaults except the LR
TORCH_EXTRA = {"momentum": {"momentum": 0.9}, "nesterov": {"momentum": 0.9, "nesterov": True}}
TORCH_NAMES = {"char": list(TORCH_BYTES_PER_PARAM), "gpt2": ["adamw"]}


def gpt_shapes(vocab: int, block: int, layers: int, width: int, tied: bool) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 style model with biases (token and position embeddings, blocks, final norm)."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (block, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    shapes += [(width,), (width,)]
    if not tied:
        shapes.append((vocab, width))
    return shapes


SHAPES = {
    "char": ("nanoGPT-char (10.8M)", dict(vocab=65, block=256, layers=6, width=384, tied=False)),
    "gpt2": ("GPT-2 small (124M)", dict(vocab=50257, block=1024, layers=12, width=768, tied=True)),
}


def make_params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=generator) * 0.02).requires_grad_(True)
        p.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(p)
    return params


def interleave(contenders: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def bench_elementwise(kind: str, shapes, repeats: int, cold: bool = True) -> dict:
    """Lion and AdEMAMix (keel fused, pytorch-optimizer) with torch's fused AdamW and the bandwidth probe."""
    import pytorch_optimizer

    params = make_params(shapes)
    numel = sum(p.numel() for p in params)
    probe_a, probe_b = torch.randn(numel), torch.randn(numel)
    out: dict = {"numel": numel, "tensors": len(params)}
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    families = {
        "lion": (
            lambda: ko.Lion(params, lr=1e-4, weight_decay=0.1, fused=True),
            lambda: pytorch_optimizer.Lion(params, lr=1e-4, weight_decay=0.1),
        ),
        "ademamix": (
            lambda: ko.AdEMAMix(params, lr=1e-4, weight_decay=0.1, fused=True),
            lambda: pytorch_optimizer.AdEMAMix(params, lr=1e-4, weight_decay=0.1, weight_decouple=True),
        ),
    }
    for name, (make_keel, make_peer) in families.items():
        first_steps = first_step_seconds(kind, name, cold=cold)
        keel_opt = make_keel()
        compile_seconds = timed(keel_opt.step)
        eager = (ko.Lion if name == "lion" else ko.AdEMAMix)(params, lr=1e-4, weight_decay=0.1, fused=False)
        peer = make_peer()
        times = interleave(
            {
                "probe": lambda: probe_a.lerp_(probe_b, 0.5),
                "keel": keel_opt.step,
                "keel_eager": eager.step,
                "pytorch_optimizer": peer.step,
                "torch_fused_adamw": adamw.step,
            },
            repeats,
        )
        probe = statistics.median(times["probe"])
        medians = {k: statistics.median(v) for k, v in times.items()}
        saving = medians["keel_eager"] - medians["keel"]
        out[name] = {
            "first_step_seconds_with_compile": compile_seconds,
            "first_step_seconds_child": first_steps,
            "steps_to_repay_cold_compile": first_steps["cold"] / saving if saving > 0 else None,
            "compiled": not type(keel_opt)._compile_failed,
            "median_seconds": medians,
            "eta": {
                "keel": BYTES_PER_PARAM[name] * probe / (12 * medians["keel"]),
                "keel_eager": BYTES_PER_PARAM[name] * probe / (12 * medians["keel_eager"]),
                "pytorch_optimizer": BYTES_PER_PARAM[name] * probe / (12 * medians["pytorch_optimizer"]),
                "torch_fused_adamw": BYTES_PER_PARAM["adamw"] * probe / (12 * medians["torch_fused_adamw"]),
            },
            "speedup_vs_pytorch_optimizer": ratio_stats(times["pytorch_optimizer"], times["keel"]),
            "speedup_vs_keel_eager": ratio_stats(times["keel_eager"], times["keel"]),
            "time_vs_torch_fused_adamw": ratio_stats(times["keel"], times["torch_fused_adamw"]),
        }
        eta = out[name]["eta"]
        print(f"  [{time.perf_counter() - START:.0f}s] {name}: eta keel {eta['keel']:.2f} (eager "
              f"{eta['keel_eager']:.2f}), pytorch-optimizer {eta['pytorch_optimizer']:.2f}, fused AdamW "
              f"{eta['torch_fused_adamw']:.2f}; speedup {out[name]['speedup_vs_pytorch_optimizer']['median']:.2f}x; "
              f"first step cold {first_steps['cold']:.0f}s, warm {first_steps['warm']:.0f}s")
        del keel_opt, eager, peer
        gc.collect()
    return out


def first_step_seconds(kind: str, name: str, cold: bool) -> dict[str, float]:
    """The first compiled step, in two child processes: from an empty torch.compile cache, then with its files.

    With `cold=False` both children use the user's cache (whatever it holds)."""
    with tempfile.TemporaryDirectory(prefix="keel-bench-inductor-") as cache:
        env = dict(os.environ, **({"TORCHINDUCTOR_CACHE_DIR": cache} if cold else {}))
        command = [sys.executable, __file__, "--first-step", f"{kind}:{name}"]
        runs = [subprocess.run(command, env=env, check=True, capture_output=True, text=True) for _ in range(2)]
    seconds = [float(r.stdout.strip().splitlines()[-1]) for r in runs]
    return {"cold": seconds[0], "warm": seconds[1]}


def child_first_step(spec: str) -> None:
    """Print the seconds of the first compiled step of `kind:name` (run in a child process)."""
    torch.set_num_threads(1)
    kind, name = spec.split(":")
    params = make_params(gpt_shapes(**SHAPES[kind][1]))
    opt = (ko.Lion if name == "lion" else ko.AdEMAMix)(params, lr=1e-4, weight_decay=0.1, fused=True)
    seconds = timed(opt.step)
    if type(opt)._compile_failed:
        raise SystemExit(f"{name}: torch.compile failed")
    print(seconds)


def bench_torch_backed(kind: str, shapes, repeats: int) -> dict:
    """torch's optimizers from keel.optim.create against the same class with the loop, foreach and fused paths."""
    params = make_params(shapes)
    numel = sum(p.numel() for p in params)
    probe_a, probe_b = torch.randn(numel), torch.randn(numel)
    out: dict = {}
    for name in TORCH_NAMES[kind]:
        cls = ko.get(name).torch_class
        extra = TORCH_EXTRA.get(name, {})
        keel_opt = ko.create(name, params, lr=1e-4)
        contenders = {
            "probe": lambda: probe_a.lerp_(probe_b, 0.5),
            "keel": keel_opt.step,
            "torch_loop": cls(params, lr=1e-4, foreach=False, **extra).step,
            "torch_foreach": cls(params, lr=1e-4, foreach=True, **extra).step,
        }
        if "fused" in ko.get(name).hparams:
            contenders["torch_fused"] = cls(params, lr=1e-4, fused=True, **extra).step
        times = interleave(contenders, repeats)
        medians = {k: statistics.median(v) for k, v in times.items()}
        probe = medians.pop("probe")
        path = "fused" if keel_opt.defaults.get("fused") else "foreach" if keel_opt.defaults["foreach"] else "loop"
        bytes_per_param = TORCH_BYTES_PER_PARAM[name]
        out[name] = {
            "keel_path": path,
            "median_seconds": medians,
            "eta": {k: bytes_per_param * probe / (12 * t) for k, t in medians.items()} if bytes_per_param else None,
            "keel_time_vs": {k: ratio_stats(times["keel"], times[k]) for k in medians if k != "keel"},
        }
        vs = out[name]["keel_time_vs"]
        print(f"  [{time.perf_counter() - START:.0f}s] {name} (keel: {path}): keel time / "
              + ", ".join(f"{k} {v['median']:.2f}" for k, v in vs.items()))
        del keel_opt, contenders
        gc.collect()
    return out


def soap_rotation_flops(shapes, max_dim: int = 10000) -> float:
    """Matrix-product flops of one SOAP step without a refresh (keel): rotate G, rotate back, update L and R."""
    total = 0.0
    for shape in shapes:
        if len(shape) != 2:
            continue
        m, n = shape
        sides = (2 * m * m * n if m <= max_dim else 0) + (2 * m * n * n if n <= max_dim else 0)
        total += 3 * sides
    return total


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Single-thread float32 matrix-multiply rate, the ceiling of SOAP's step."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / statistics.median(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def training_step_seconds(config: dict, batch: int, repeats: int = 3) -> tuple[float, int]:
    """Forward, backward and fused AdamW step of keel's GPT at these shapes; returns (median seconds, tokens)."""
    from keel.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=config["vocab"], block_size=config["block"], n_layer=config["layers"],
                          n_head=config["width"] // 64, n_embd=config["width"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config["vocab"], (batch, config["block"]), generator=generator)

    def step():
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return statistics.median(timed(step) for _ in range(repeats)), batch * (config["block"] - 1)


def bench_soap(kind: str, config: dict, repeats: int, frequency: int = 10) -> dict:
    """SOAP, keel against pytorch-optimizer, averaged over preconditioner periods (one refresh each)."""
    import pytorch_optimizer

    note = ""
    if kind == "gpt2":
        config = dict(config, layers=1)
        note = "token and position embeddings and 1 of the 12 blocks"
    params = make_params(gpt_shapes(**config))
    keel_opt = ko.SOAP(params, lr=1e-5, precondition_frequency=frequency)
    peer = pytorch_optimizer.SOAP(params, lr=1e-5, precondition_frequency=frequency)
    first = {"keel": timed(keel_opt.step), "pytorch_optimizer": timed(peer.step)}  # eigendecompositions

    def period(opt):
        return lambda: [opt.step() for _ in range(frequency)]

    times = interleave({"keel": period(keel_opt), "pytorch_optimizer": period(peer)}, repeats, warmup=0)
    per_step = {k: statistics.median(v) / frequency for k, v in times.items()}
    plain = statistics.median(timed(keel_opt.step) for _ in range(3))  # steps 1-3 of a period: no refresh
    flops = soap_rotation_flops(gpt_shapes(**config))
    out = {
        "parameters": note or "all",
        "numel": sum(p.numel() for p in params),
        "precondition_frequency": frequency,
        "first_step_seconds": first,
        "amortised_step_seconds": per_step,
        "speedup_vs_pytorch_optimizer": ratio_stats(times["pytorch_optimizer"], times["keel"]),
        "keel_plain_step_seconds": plain,
        "keel_plain_step_gflops": flops / plain / 1e9,
        "gemm_gflops": gemm_gflops(),
    }
    del keel_opt, peer, params
    gc.collect()
    if kind == "char":
        batch = 16
        train_seconds, tokens = training_step_seconds(config, batch)
        out["training_step"] = {"batch": batch, "tokens": tokens, "seconds": train_seconds}
        out["amortised_fraction_of_training_step"] = per_step["keel"] / train_seconds
    print(f"  [{time.perf_counter() - START:.0f}s] soap: speedup {out['speedup_vs_pytorch_optimizer']['median']:.2f}x"
          + (f", {out['amortised_fraction_of_training_step']:.2f} of a training step" if kind == "char" else ""))
    return out


def _ratio(stats: dict, suffix: str = "") -> str:
    return f"{stats['median']:.2f}{suffix} [{stats['min']:.2f}, {stats['max']:.2f}]"


def results_section(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"`python benchmarks/bench_optim.py` — {m['date']}, {m['cpu']}, {m['cores']} cores, {m['threads']} thread, "
        f"load average {m['load_average']} (end {m.get('load_average_end')}), torch {m['torch']}. float32 "
        f"parameters; medians of {data['repeats']} interleaved repeats (SOAP: {data['soap_repeats']} repeats of a "
        "10-step period); ratios are medians of per-repeat ratios [min, max]. eta = (minimum bytes / step time) / "
        "bandwidth of a same-footprint `lerp_` probe (Lion 20, AdEMAMix 36, AdamW 28 bytes per parameter).",
        "",
        "| shapes | optimizer | eta keel | eta pytorch-optimizer | keel speedup vs pytorch-optimizer "
        "| keel time / torch fused AdamW | eta torch fused AdamW | eta keel eager | compiled speedup vs eager "
        "| first compiled step, s (cold, warm cache) | steps to repay a cold compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in data["shapes"].values():
        for name in ("lion", "ademamix"):
            if name not in entry:
                continue
            r = entry[name]
            label = name if r["compiled"] else f"{name} (eager: compile failed)"
            eta = r["eta"]
            first = r.get("first_step_seconds_child")
            repay = r.get("steps_to_repay_cold_compile")
            lines.append(
                f"| {entry['label']} | {label} | {eta['keel']:.2f} | {eta['pytorch_optimizer']:.2f} "
                f"| {_ratio(r['speedup_vs_pytorch_optimizer'], 'x')} | {_ratio(r['time_vs_torch_fused_adamw'])} "
                f"| {eta['torch_fused_adamw']:.2f} | "
                + (f"{eta['keel_eager']:.2f} | {_ratio(r['speedup_vs_keel_eager'], 'x')} " if "keel_eager" in eta
                   else "— | — ")
                + (f"| {first['cold']:.0f}, {first['warm']:.0f} " if first else "| — ")
                + (f"| {repay:.0f} |" if repay else "| — |")
            )
    lines += [
        "",
        "| shapes | SOAP parameters | keel speedup vs pytorch-optimizer (per 10-step period) "
        "| keel's amortised step / training step |",
        "|---|---|---|---|",
    ]
    for entry in data["shapes"].values():
        if "soap" not in entry:
            continue
        r = entry["soap"]
        fraction = "—"
        if "amortised_fraction_of_training_step" in r:
            t = r["training_step"]
            fraction = (f"{r['amortised_fraction_of_training_step']:.2f} (forward, backward and fused AdamW at "
                        f"batch {t['batch']} x {t['tokens'] // t['batch']} tokens)")
        lines.append(
            f"| {entry['label']} | {r['parameters']} | {_ratio(r['speedup_vs_pytorch_optimizer'], 'x')} | {fraction} |"
        )
    lines += [
        "",
        "Targets: eta >= 0.8 for Lion and AdEMAMix; each of the three >= 3x faster than pytorch-optimizer's. "
        "The first compiled step is timed in child processes (cold: an empty torch.compile cache; warm: the "
        "files the cold one left); steps to repay = cold first step / (eager - compiled step time).",
        "",
    ]
    lines += [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines) + "\n"


def torch_section(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"`python benchmarks/bench_optim.py` — {m['date']}, {m['cpu']}, {m['cores']} cores, {m['threads']} thread, "
        f"load average {m['load_average']} (end {m.get('load_average_end')}), torch {m['torch']}. float32 "
        f"parameters; medians of {data['repeats']} interleaved repeats; ratios are medians of per-repeat ratios "
        "[min, max]. keel = `keel.optim.create(name, params)` with its defaults; torch loop / foreach / fused = the "
        "same torch class with `foreach=False` (what torch runs on CPU when left to decide), `foreach=True`, "
        "`fused=True`. eta = (minimum bytes / step time) / bandwidth of a same-footprint `lerp_` probe.",
        "",
        "| shapes | optimizer | keel's path | keel time / torch loop | keel time / torch foreach "
        "| keel time / torch fused | eta keel | eta torch loop | eta torch foreach | eta torch fused |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in data["shapes"].values():
        for name, r in entry.get("torch", {}).items():
            vs, eta = r["keel_time_vs"], r["eta"] or {}

            def cell(stats):
                return _ratio(stats) if stats else "—"

            def eta_cell(key):
                return f"{eta[key]:.2f}" if key in eta else "—"

            lines.append(
                f"| {entry['label']} | {name} | {r['keel_path']} | {cell(vs.get('torch_loop'))} "
                f"| {cell(vs.get('torch_foreach'))} | {cell(vs.get('torch_fused'))} | {eta_cell('keel')} "
                f"| {eta_cell('torch_loop')} | {eta_cell('torch_foreach')} | {eta_cell('torch_fused')} |"
            )
    lines += [""] + [f"- {note}" for note in data.get("torch_notes", [])]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_subsection(path: Path, heading: str, body: str) -> None:
    """Replace (or add) the `heading` subsection of the "## optimizers" section of RESULTS.md, leaving the rest."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "\n## optimizers\n" not in text:
        text = text.rstrip("\n") + "\n\n## optimizers\n"
    section_start = text.find("\n## optimizers\n") + 1
    section_end = text.find("\n## ", section_start)
    section_end = len(text) if section_end == -1 else section_end + 1
    section = text[section_start:section_end]
    block = f"{heading}\n\n{body.strip()}\n"
    start = section.find(heading + "\n")
    if start == -1:
        section = section.rstrip("\n") + "\n\n" + block
    else:
        end = section.find("\n### ", start + 1)
        section = section[:start] + block + ("\n" + section[end + 1 :] if end != -1 else "")
    rest = text[section_end:]
    text = text[:section_start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default="char,gpt2")
    parser.add_argument("--no-soap", action="store_true")
    parser.add_argument("--soap-repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave results files alone")
    parser.add_argument("--warm-cache", action="store_true",
                        help="time the first compiled step with the user's torch.compile cache, not an empty one")
    parser.add_argument("--first-step", help=argparse.SUPPRESS)  # kind:name, in a child process
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the RESULTS.md subsections from results/optim.json")
    args = parser.parse_args()
    if args.first_step:
        child_first_step(args.first_step)
        return
    if args.render:
        data = json.loads((HERE / "results" / "optim.json").read_text())
        data["notes"], data["torch_notes"] = notes(data), torch_notes(data)
        (HERE / "results" / "optim.json").write_text(json.dumps(data, indent=2) + "\n")
        write_subsection(HERE / "RESULTS.md", STEP_TIME_HEADING, results_section(data))
        write_subsection(HERE / "RESULTS.md", TORCH_HEADING, torch_section(data))
        return
    torch.set_num_threads(1)
    data: dict = {"machine": machine(), "repeats": args.repeats, "soap_repeats": args.soap_repeats, "shapes": {},
                  "notes": []}
    print(data["machine"])
    for kind in args.shapes.split(","):
        label, config = SHAPES[kind]
        print(label)
        entry = {"label": label, "torch": bench_torch_backed(kind, gpt_shapes(**config), args.repeats)}
        entry |= bench_elementwise(kind, gpt_shapes(**config), args.repeats, cold=not args.warm_cache)
        if not args.no_soap:
            entry["soap"] = bench_soap(kind, config, args.soap_repeats)
        data["shapes"][kind] = entry
        gc.collect()
    data["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    data["notes"] = notes(data)
    data["torch_notes"] = torch_notes(data)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "optim.json").write_text(json.dumps(data, indent=2) + "\n")
        write_subsection(HERE / "RESULTS.md", STEP_TIME_HEADING, results_section(data))
        write_subsection(HERE / "RESULTS.md", TORCH_HEADING, torch_section(data))
    print(results_section(data))
    print(torch_section(data))


def notes(data: dict) -> list[str]:
    out = []
    m = data["machine"]
    if m["load_average"][0] > 0.5 * m["cores"] or (m.get("load_average_end") or [0])[0] > 0.5 * m["cores"]:
        out.append(f"The machine was shared (load average {m['load_average'][0]} at the start, "
                   f"{(m.get('load_average_end') or ['?'])[0]} at the end, on {m['cores']} cores): per-repeat ratios "
                   "spread widely; read the medians.")
    etas = [v for e in data["shapes"].values() for n in ("lion", "ademamix") if n in e for v in e[n]["eta"].values()]
    if etas and max(etas) > 1:
        out.append(f"eta up to {max(etas):.2f} > 1: on this CPU the `lerp_` probe does not reach the memory bandwidth, "
                   "so the etas overstate; compare them with each other, not with 1.")
    for kind, entry in data["shapes"].items():
        for name in ("lion", "ademamix"):
            r = entry.get(name)
            if r and r["eta"]["keel"] < 0.8:
                out.append(f"miss: {name} at {entry['label']} reaches eta {r['eta']['keel']:.2f} < 0.8.")
            if r and r["speedup_vs_pytorch_optimizer"]["median"] < 3:
                peer = r["eta"]["pytorch_optimizer"]
                out.append(
                    f"miss: {name} at {entry['label']} is {r['speedup_vs_pytorch_optimizer']['median']:.2f}x, not 3x, "
                    f"faster than pytorch-optimizer's, whose eta is {peer:.2f} in this run: 3x would need eta "
                    f"{3 * peer:.2f}" + (" > 1, above the bandwidth limit." if 3 * peer > 1 else ".")
                )
        r = entry.get("soap")
        if r and r["speedup_vs_pytorch_optimizer"]["median"] < 3:
            out.append(
                f"miss: SOAP at {entry['label']} is {r['speedup_vs_pytorch_optimizer']['median']:.2f}x, not 3x, "
                "faster than pytorch-optimizer's. Both spend the step in the same matrix products; keel saves one of "
                "three rotations per step (it keeps the first moment in the rotated basis) and runs its products at "
                f"{r['keel_plain_step_gflops']:.0f} GFLOP/s against {r['gemm_gflops']:.0f} for a plain 1024^3 "
                "matrix multiply on this core, so 3x would need a different algorithm, not a faster implementation."
            )
        if r and "training_step" in r:
            out.append(
                "SOAP's fraction of a training step scales inversely with the tokens per step: nanoGPT-char's "
                f"64 x 256 batch would make it about {r['amortised_fraction_of_training_step'] * 16 / 64:.2f}."
            )
    return out


def torch_notes(data: dict) -> list[str]:
    """What the torch table says about keel's choice of path, per optimizer and shape."""
    out = []
    for entry in data["shapes"].values():
        for name, r in entry.get("torch", {}).items():
            # against torch's other paths only: against its own path the ratio is the run's noise
            ratios = {k: v["median"] for k, v in r["keel_time_vs"].items() if k != f"torch_{r['keel_path']}"}
            slowest = max(ratios, key=ratios.get)
            if ratios[slowest] > 1.1:
                out.append(f"miss: {entry['label']}, {name}: keel's path ({r['keel_path']}) takes "
                           f"{ratios[slowest]:.2f}x the time of {slowest.replace('_', ' ')} in this run.")
    same = [v["median"] for e in data["shapes"].values() for r in e.get("torch", {}).values()
            for k, v in r["keel_time_vs"].items() if k == f"torch_{r['keel_path']}"]
    if same:
        out.append(f"keel's path against the same torch path (the same code) measures {min(same):.2f}-"
                   f"{max(same):.2f}: the noise of this run.")
    return out


if __name__ == "__main__":
    main()
