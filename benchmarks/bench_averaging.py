"""Weight averaging: EMA update speed against torch.optim.swa_utils, and streaming checkpoint averaging.

Run: ``python benchmarks/bench_averaging.py`` (add ``--quick`` for a short run). Writes
``benchmarks/results/averaging.json`` and the ``## averaging`` section of ``benchmarks/RESULTS.md``.

Method (see BENCHMARKS.md): one thread; contenders interleaved in turns after a warm-up; the median of the per-turn
ratios with min and max.

1. EMA update, at the nanoGPT-char (10.8M) and GPT-2 small (124M) parameter shapes, fp32:
   keel ``EMA.update()`` against ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``'s
   ``update_parameters``; both against the memory-bandwidth floor, measured in the same turn with one
   ``a.lerp_(b, w)`` over as many elements as the model has parameters (12 bytes per parameter: read shadow and
   weight, write shadow). eta = floor time / update time (1.0 = at the floor; target >= 0.95).
2. Checkpoint averaging of N checkpoints of the 10.8M or 124M shapes: peak resident memory of a fresh subprocess
   (growth of VmHWM over the resident size before the call, after a warm-up), divided by one fp32 model, for keel's
   streaming ``average_checkpoints_to_file`` and for in-memory averaging as fairseq's average_checkpoints.py does
   it (load each whole checkpoint, add it to a full accumulator); and keel's throughput against plain reading of
   the same files (``readinto`` a reused buffer; page cache warm for both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, timed  # noqa: E402
from torch import nn

ROOT = Path(__file__).resolve().parent
SHAPES = {
    "nanogpt-char-10.8M": {"n_layer": 6, "n_embd": 384, "vocab": 65, "block": 256},
    "gpt2-small-124M": {"n_layer": 12, "n_embd": 768, "vocab": 50257, "block": 1024},
}


def gpt_parameter_shapes(n_layer: int, n_embd: int, vocab: int, block: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model with tied embeddings (nanoGPT's layout)."""
    d = n_embd
    shapes: list[tuple[int, ...]] = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


class ParameterSet(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s) * 0.02) for s in shapes)


def bench_ema(name: str, shape: dict, repeats: int) -> dict:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from keel.averaging import EMA

    torch.manual_seed(0)
    model = ParameterSet(gpt_parameter_shapes(**shape))
    n = sum(p.numel() for p in model.parameters())
    decay = 0.999
    ema = EMA(model, decay=decay)
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    probe_a, probe_b = torch.randn(n), torch.randn(n)
    contenders = {
        "keel": ema.update,
        "peer": lambda: peer.update_parameters(model),
        "floor": lambda: probe_a.lerp_(probe_b, 1 - decay),
    }
    for _ in range(3):  # warm-up (the first update of each copies the weights)
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    keys = list(contenders)
    for turn in range(repeats):
        for key in keys[turn % 3:] + keys[: turn % 3]:  # rotate who goes first
            times[key].append(timed(contenders[key]))
    speedup = [p / k for p, k in zip(times["peer"], times["keel"])]
    eta_keel = [f / k for f, k in zip(times["floor"], times["keel"])]
    eta_peer = [f / p for f, p in zip(times["floor"], times["peer"])]
    best = {k: min(v) for k, v in times.items()}
    return {
        "shape": name, "parameters": n, "repeats": repeats,
        "eta_keel_best_times": best["floor"] / best["keel"], "eta_swa_utils_best_times": best["floor"] / best["peer"],
        "speedup_vs_swa_utils": summary(speedup),
        "eta_keel": summary(eta_keel), "eta_swa_utils": summary(eta_peer),
        "floor_GBps": summary([12 * n / f / 1e9 for f in times["floor"]]),
    }


PROBE = textwrap.dedent(
    """
    import json, sys, time, torch
    from safetensors.torch import load_file
    from keel.averaging import average_checkpoints_to_file
    from keel.safetensors_io import write_safetensors

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def in_memory(paths, out):
        # fairseq's average_checkpoints.py: each checkpoint loaded whole, summed into a full accumulator;
        # the previous checkpoint is still referenced while the next one loads.
        acc, state = None, None
        for path in paths:
            state = load_file(path)
            if acc is None:
                acc = {k: v.clone().float() for k, v in state.items()}
            else:
                for k, v in state.items():
                    acc[k].add_(v)
        for v in acc.values():
            v.div_(len(paths))
        write_safetensors(out, acc)

    torch.set_num_threads(1)
    method, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    fn = average_checkpoints_to_file if method == "keel" else in_memory
    write_safetensors(out, {"w": torch.zeros(4)})
    fn([out, out], out)  # warm every code path up on a tiny input
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    start = time.perf_counter()
    fn(paths, out)
    print(json.dumps({"peak_growth": status("VmHWM") - before, "seconds": time.perf_counter() - start}))
    """
)


def plain_read(paths: list[str]) -> None:
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def bench_checkpoints(name: str, shape: dict, count: int, repeats: int, folder: Path) -> dict:
    from keel.averaging import average_checkpoints, average_checkpoints_to_file
    from keel.safetensors_io import write_safetensors

    torch.manual_seed(0)
    shapes = gpt_parameter_shapes(**shape)
    model_bytes = 4 * sum(torch.Size(s).numel() for s in shapes)
    paths = []
    for i in range(count):
        path = folder / f"{name}-{i}.safetensors"
        write_safetensors(path, {f"p{j}": torch.randn(s) for j, s in enumerate(shapes)})
        paths.append(str(path))
    memory = {}
    for method in ("keel", "in_memory"):
        result = subprocess.run([sys.executable, "-c", PROBE, method, str(folder / "out.safetensors"), *paths],
                                capture_output=True, text=True, check=True)
        memory[method] = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"] / model_bytes
    out = folder / "out.safetensors"
    average_checkpoints_to_file(paths, out)  # warm-up, page cache warm
    plain_read(paths)
    ratios, ratios_no_write = [], []
    for _ in range(repeats):
        t_read = timed(lambda: plain_read(paths))
        t_keel = timed(lambda: average_checkpoints_to_file(paths, out))
        t_sum = timed(lambda: average_checkpoints(paths))
        ratios.append(t_read / t_keel)
        ratios_no_write.append(t_read / t_sum)
    for path in paths:
        os.unlink(path)
    return {
        "shape": name, "checkpoints": count, "model_MB": model_bytes / 1e6,
        "peak_rss_per_fp32_model_keel": memory["keel"],
        "peak_rss_per_fp32_model_in_memory": memory["in_memory"],
        "throughput_vs_plain_read": summary(ratios),
        "throughput_vs_plain_read_without_output": summary(ratios_no_write),
    }


def write_results(results: dict) -> None:
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "averaging.json").write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    lines = [
        "## averaging",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores, {m['threads']} thread; load average "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}; torch {m['torch']}. `python benchmarks/bench_averaging.py`.",
        "",
        "EMA update, fp32, median (min-max) over interleaved turns. eta = bandwidth floor (one `lerp_` over as many "
        "elements, 12 bytes/parameter) / update time; speedup = torch.optim.swa_utils AveragedModel "
        "(multi-tensor EMA) time / keel time.",
        "",
        "| shape | parameters | keel eta | swa_utils eta | keel speedup vs swa_utils | eta from best times "
        "(keel / swa_utils) | floor GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["ema"]:
        def fmt(s):
            return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
        lines.append(f"| {r['shape']} | {r['parameters']:,} | {fmt(r['eta_keel'])} | {fmt(r['eta_swa_utils'])} | "
                     f"{fmt(r['speedup_vs_swa_utils'])} | {r['eta_keel_best_times']:.3f} / "
                     f"{r['eta_swa_utils_best_times']:.3f} | {r['floor_GBps']['median']:.1f} |")
    lines += [
        "",
        "Checkpoint averaging: peak resident memory growth of a fresh process / one fp32 model, for keel's streaming "
        "average and for in-memory averaging as fairseq's average_checkpoints.py does it; throughput = plain "
        "`readinto` of the same files / keel's time (1.0 = as fast as reading the files; page cache warm), for "
        "`keel average` into a file (written and fsynced) and for `average_checkpoints` (the result in memory).",
        "",
        "| shape | checkpoints | model MB | keel peak / model | in-memory peak / model | throughput, to file "
        "| throughput, in memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["checkpoints"]:
        t, u = r["throughput_vs_plain_read"], r["throughput_vs_plain_read_without_output"]
        lines.append(f"| {r['shape']} | {r['checkpoints']} | {r['model_MB']:.0f} | "
                     f"{r['peak_rss_per_fp32_model_keel']:.2f} | {r['peak_rss_per_fp32_model_in_memory']:.2f} | "
                     f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) | "
                     f"{u['median']:.2f} ({u['min']:.2f}-{u['max']:.2f}) |")
    section = "\n".join(lines) + "\n"
    path = ROOT / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find("\n## averaging\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small shape only")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = ["nanogpt-char-10.8M"] if args.quick else list(SHAPES)
    results = {"machine": machine(), "ema": [], "checkpoints": []}
    for name in shapes:
        repeats = 5 if args.quick else (101 if "10.8M" in name else 21)
        r = bench_ema(name, SHAPES[name], repeats)
        print(json.dumps(r))
        results["ema"].append(r)
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            count = 3 if args.quick else (8 if "10.8M" in name else 4)
            r = bench_checkpoints(name, SHAPES[name], count, 3 if args.quick else 5, Path(tmp))
            print(json.dumps(r))
            results["checkpoints"].append(r)
    results["machine"]["load_after"] = os.getloadavg()
    write_results(results)
    print(f"wrote {ROOT / 'results' / 'averaging.json'} and the averaging section of {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
