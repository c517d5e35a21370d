"""Padding waste: length bucketing vs padding every batch to the context vs packing, on the standard library's files.

Method: the `stdlib` corpus as documents (one per `.py` file: lengths from a few hundred bytes to a few hundred
kilobytes, median about 8 kB), bytes with an end-of-document id. Three ways to form a micro-batch of about
`batch x context` positions:

- packing (`data.packing: true`): random windows of the concatenated stream, no padding (but windows straddle
  documents);
- pad to context: one document per sequence (`data.packing: false`), `batch` sequences drawn at random
  (keel's IndexSampler) and padded to the full context, as a plain DataLoader with a fixed shape does;
- bucketing (`data.packing: false`, keel's BucketSampler): sequences of similar length under
  `data.batch_tokens = batch x context`, padded to the longest in the batch.

Two settings: documents split at a 512-token context (every piece full but each file's last), and documents
truncated at a 2048-token context (one sequence per file: the skew of file lengths shows). Pad fraction: padded
positions over all positions, over `--batches` batches. Throughput: real (non-pad) target tokens per second of a
training step (forward, backward, AdamW) of a 2-layer, width-96 GPT, one thread, contenders interleaved over
`--repeats` rounds of `--steps` steps after one warm-up round; ratios to packing are medians of per-round ratios.

Run: python benchmarks/bench_padding.py [--repeats 5] [--steps 6]
Writes benchmarks/results/padding.json and the section "padding" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, summary, write_json, write_section  # noqa: E402

from keel.config import TrainConfig  # noqa: E402
from keel.data import IndexSampler, padded_batch  # noqa: E402
from keel.grad import count_tokens  # noqa: E402
from keel.models import GPT, GPTConfig, lm_loss_sum  # noqa: E402
from keel.tasks.lm import LanguageModelTask  # noqa: E402

SETTINGS = {"split at 512": (512, "split", 16), "truncated at 2048": (2048, "truncate", 4)}


def task(context: int, long_documents: str, batch: int, packing: bool) -> LanguageModelTask:
    data = {"source": "stdlib", "batch_size": batch, "packing": packing}
    if not packing:
        data["long_documents"] = long_documents
    config = TrainConfig.model_validate({"recipe": "baseline", "model": {"block_size": context}, "data": data,
                                          "threads": 1})
    return LanguageModelTask().bind(config)


def contenders(context: int, long_documents: str, batch: int) -> dict:
    packed = task(context, long_documents, batch, True)
    documents = task(context, long_documents, batch, False)
    uniform = IndexSampler(len(documents.train_spans), batch, seed=0)

    def pad_to_context(i: int):
        x, y = padded_batch(documents.data.train, documents.train_spans[uniform.indices(i)])
        width = context - x.shape[1]
        return (torch.nn.functional.pad(x, (0, width)), torch.nn.functional.pad(y, (0, width), value=-100))

    return {"packing": packed.train_batch, "pad to context": pad_to_context, "bucketing": documents.train_batch}


def pad_fraction(make_batch, batches: int) -> float:
    pads = positions = 0
    for i in range(batches):
        _, y = make_batch(i)
        pads += int((y == -100).sum())
        positions += y.numel()
    return pads / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_machine = machine()
    print(f"load average {os.getloadavg()}", flush=True)
    results = {}
    for setting, (context, long_documents, batch) in SETTINGS.items():
        makers = contenders(context, long_documents, batch)
        fractions = {name: pad_fraction(make, args.batches) for name, make in makers.items()}
        models = {}
        for name in makers:
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=257, n_layer=2, n_embd=96, n_head=4, block_size=context))
            models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
        rates: dict[str, list[float]] = {name: [] for name in makers}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for name, make in makers.items():  # interleaved
                model, optimizer = models[name]
                tokens, elapsed = 0, 0.0
                for step in range(args.steps):
                    x, y = make(round_ * args.steps + step)
                    start = time.perf_counter()
                    n = count_tokens(y)
                    (lm_loss_sum(model(x), y) / n).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    elapsed += time.perf_counter() - start
                    tokens += n
                if round_:
                    rates[name].append(tokens / elapsed)
        ratios = {name: summary([a / b for a, b in zip(rates[name], rates["packing"])]) for name in makers}
        results[setting] = {"context": context, "long_documents": long_documents, "batch": batch,
                            "pad_fraction": fractions, "tokens_per_s": {k: summary(v) for k, v in rates.items()},
                            "ratio_to_packing": ratios}
        for name in makers:
            print(f"{setting:18s} {name:15s} pad {fractions[name]:.3f}  real tokens/s "
                  f"{statistics.median(rates[name]):,.0f}  / packing {ratios[name]['median']:.2f}", flush=True)
    data = {"machine": start_machine, "machine_end": machine(), "repeats": args.repeats, "steps": args.steps,
            "batches": args.batches, "results": results}
    body = section(data)
    print(body)
    if not args.no_write:
        write_json("padding", data)
        write_section("padding", body)


def section(data: dict) -> str:
    m, end = data["machine"], data["machine_end"]
    lines = [
        f"`python benchmarks/bench_padding.py --repeats {data['repeats']} --steps {data['steps']}` — {m['date']}, "
        f"{m['cpu']}, {m['cores']} cores, 1 thread, load average {m['load_average']} (end {end['load_average']}), "
        f"torch {m['torch']}.",
        "",
        "`stdlib` source files as documents (bytes + end-of-document id). Pad fraction over "
        f"{data['batches']} batches; real (non-pad) target tokens per second of a training step of a 2-layer, "
        "width-96 GPT, interleaved, ratio to packing: median [min, max] of per-round ratios.",
        "",
        "| setting | batching | pad fraction | real tokens/s / packing |",
        "|---|---|---|---|",
    ]
    for setting, result in data["results"].items():
        for name, fraction in result["pad_fraction"].items():
            r = result["ratio_to_packing"][name]
            lines.append(f"| {setting} (batch {result['batch']} x {result['context']}) | {name} | {fraction:.3f} | "
                         f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |")
    lines += [""] + [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
