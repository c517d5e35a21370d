"""Time to target: how many steps, tokens and seconds each recipe needs to reach the tuned baseline's final loss.

The baseline is the GPT-loop article's recipe (AdamW, linear warmup over 5% of the run, cosine decay to a tenth of
the peak LR, clipping at 1.0) with its peak LR tuned by `keel sweep` (a grid of `--lr-points` LRs a factor 2
apart; the grid is extended by one point when the best LR lies on its edge): AlgoPerf-style, the best of the sweep
is the baseline. Every contender has its LR tuned the same way:

- optimizers, each with the baseline's warmup + cosine: Muon (hybrid: Muon on hidden matrices, AdamW at the tuned
  baseline LR on the rest), SOAP, Lion (weight decay x10, so that lr x wd matches at a tenth of the LR), AdEMAMix
  (alpha and beta3 warmed up over the run), and the Tuning Playbook FAQ's own RMSProp (momentum 0.9, the LR inside
  the momentum buffer, v0 = 1) and NAdam (`form: playbook`);
- decays, with AdamW: WSD (20% cooldown of shape 1-sqrt to 0, Hägele et al. 2024) and square-root decay to 0;
- sequence-length warmup (Li et al. 2022, rows truncated: 32 tokens to the full context over the first 30%);
- the best combinations of the winners (best optimizer x best decay, with sequence warmup when it helped);
- for every one of these trained recipes, two ways of evaluating it: the EMA of the weights (keel's `ema` block,
  half-life 5% of the run, evaluated on the EMA) and checkpoint averaging (the mean of the last `AVERAGE_LAST`
  checkpoints, taken every evaluation, with `keel.averaging.average_checkpoints`). Their LRs are tuned on their own
  metric, from the same sweep trials.

The figure: target = the baseline's final validation loss of the same seed. Each recipe is trained at horizons
`--horizons` (fractions of the baseline's steps; a shorter run anneals sooner) and its steps, tokens and training
seconds to the target are the least over horizons, linearly interpolated between the two evaluations around the
crossing. Reported as speedups, baseline / recipe (> 1: faster), median [min, max] over seeds; a recipe that never
reaches the target says how close it came. Training seconds are the time inside optimizer steps (data, forward,
backward, clipping, update; evaluations and checkpoint writes excluded), measured with the runs of one seed and
horizon interleaved step by step in one process (one thread): each run takes its turn for one step, so load
changes touch every contender alike. The EMA update is timed apart: it is counted for the EMA rows only; the
checkpoint-averaging rows add the time to average the checkpoints once.

Budgets (`--budget`): `smoke` (a 1-layer model for a few steps: the test suite's smoke test), `cpu` (2 layers,
width 96, batch 16 x 128 tokens, 400 steps: about half a minute a run on one core), `default` (keel's default LM
workload, 4 layers x 128, batch 32 x 128, 600 steps: minutes a run), `gpt2` (GPT-2 small, 12 x 768, context 1024,
batch 16, 2,000 steps, for a GPU).

Run: python benchmarks/bench_recipes.py [--budget cpu] [--seeds 3] [--workers 2] [--out DIR] [--no-write]
     python benchmarks/bench_recipes.py --from-json benchmarks/results/recipes.json   (render table and plot again)
Writes benchmarks/results/recipes.json, the section "recipes" of benchmarks/RESULTS.md and docs/img/recipes.png
(with --no-write: recipes.json, recipes.md and recipes.png in --out only).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, run_keel, summary, write_json, write_section  # noqa: E402

AVERAGE_LAST = 5
EMA = {"enabled": True, "half_life": "5%", "save": False}

BUDGETS = {
    "smoke": {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}, "batch": 4, "steps": 16,
              "eval_interval": 4, "eval_tokens": 512, "lr_points": 2, "seeds": 1, "horizons": [1.0],
              "seq_start": 8, "extend": False},
    "cpu": {"model": {"n_layer": 2, "n_embd": 96, "n_head": 4, "block_size": 128}, "batch": 16, "steps": 400,
            "eval_interval": 20, "eval_tokens": 8192, "lr_points": 4, "seeds": 3, "horizons": [1.0, 0.5],
            "seq_start": 32, "extend": True},
    "default": {"model": {"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 128}, "batch": 32, "steps": 600,
                "eval_interval": 30, "eval_tokens": 16384, "lr_points": 4, "seeds": 3, "horizons": [1.0, 0.5],
                "seq_start": 32, "extend": True},
    "gpt2": {"model": {"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024}, "batch": 16,
             "steps": 2000, "eval_interval": 100, "eval_tokens": 262144, "lr_points": 4, "seeds": 3,
             "horizons": [1.0, 0.5], "seq_start": 64, "extend": True, "source": "stdlib"},
}

COSINE = {"name": "cosine", "warmup": "5%"}  # min_lr: a tenth of the peak (keel's default completion)
OPTIMIZERS = {  # name -> (optimizer block without lr, the LR the grid is centred on)
    "adamw": ({"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.1}, 2e-3),
    "muon": ({"name": "muon"}, 2e-2),  # adam_lr: the tuned baseline LR, set when the arm is built
    "soap": ({"name": "soap", "weight_decay": 0.1}, 3e-3),
    "lion": ({"name": "lion", "betas": [0.9, 0.99], "weight_decay": 1.0}, 2e-4),
    "ademamix": ({"name": "ademamix", "betas": [0.9, 0.999, 0.9999], "alpha": 5.0, "weight_decay": 0.1,
                  "t_alpha_beta3": "100%"}, 2e-3),
    # the Tuning Playbook FAQ's own update rules (keel.optim.playbook), without weight decay (theirs is coupled L2)
    "rmsprop (playbook)": ({"name": "rmsprop", "form": "playbook", "momentum": 0.9}, 1e-3),
    "nadam (playbook)": ({"name": "nadam", "form": "playbook", "betas": [0.9, 0.95]}, 2e-3),
}
DECAYS = {
    "cosine": COSINE,
    "wsd": {"name": "wsd", "warmup_steps": "5%", "decay_steps": "20%", "shape": "1-sqrt"},
    "sqrt": {"name": "sqrt", "warmup": "5%"},
}
SINGLES = {  # arm -> (optimizer, decay, sequence-length warmup)
    "baseline": ("adamw", "cosine", False),
    "muon": ("muon", "cosine", False),
    "soap": ("soap", "cosine", False),
    "lion": ("lion", "cosine", False),
    "ademamix": ("ademamix", "cosine", False),
    "rmsprop (playbook)": ("rmsprop (playbook)", "cosine", False),
    "nadam (playbook)": ("nadam (playbook)", "cosine", False),
    "wsd": ("adamw", "wsd", False),
    "sqrt decay": ("adamw", "sqrt", False),
    "seq warmup": ("adamw", "cosine", True),
}
VARIANTS = ("", "+ema", "+avg")  # how a trained recipe is evaluated: its weights, their EMA, the checkpoint mean
METRIC = {"": "val_loss", "+ema": "val_loss_ema", "+avg": "val_loss_avg"}


# ---- configs -----------------------------------------------------------------------------------------------------

def base_config(budget: dict) -> dict:
    data = {"batch_size": budget["batch"], "eval_tokens": budget["eval_tokens"]}
    if "source" in budget:
        data["source"] = budget["source"]
    return {"recipe": "baseline", "max_steps": budget["steps"], "eval_interval": budget["eval_interval"],
            "checkpoint_interval": budget["eval_interval"], "keep_last": AVERAGE_LAST, "threads": 1,
            "model": dict(budget["model"]), "data": data, "sample": {"tokens": 0}, "clip": {"max_norm": 1.0},
            "ema": dict(EMA), "progress_interval": 10**9}


def arm_config(arm: tuple, budget: dict, baseline_lr: float | None) -> dict:
    """The config of an arm (optimizer, decay, sequence warmup), without its LR."""
    optimizer, decay, seq = arm
    raw = base_config(budget)
    raw["optimizer"] = copy.deepcopy(OPTIMIZERS[optimizer][0])
    if optimizer == "muon":
        raw["optimizer"]["adam_lr"] = baseline_lr or OPTIMIZERS["adamw"][1]
    raw["schedule"] = dict(DECAYS[decay])
    if seq:
        raw["seq_warmup"] = {"enabled": True, "start": budget["seq_start"], "duration": "30%",
                             "keep_tokens_per_step": False}
    return raw


def lr_grid(center: float, points: int) -> list[float]:
    return [_round(center * 2.0 ** k) for k in range(-1, points - 1)] if points > 2 else \
        [_round(center), _round(center * 2)][:points]


def _round(x: float) -> float:
    return float(f"{x:.3g}")


# ---- phase 1: LR sweeps through `keel sweep` ---------------------------------------------------------------------

def sweep_lrs(name: str, raw: dict, lrs: list[float], root: Path, workers: int, scorer) -> list[dict]:
    """One `keel sweep` over optimizer.lr (a grid); per trial: the LR and the final loss of every variant."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out = root / f"sweep-{len(list(root.glob('sweep-*/'))):02d}-{slug}"
    config = {**raw, "sweep": {"optimizer.lr": lrs},
              "sweep_options": {"sampler": "grid", "metric": "val_loss", "workers": workers, "threads": 1}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_keel(["sweep", str(path), "--out", str(out)], root)
    from keel import rundir
    from keel.rundir.metrics import read_metrics

    trials = []
    for trial in sorted((out / "trials").iterdir()):
        lr = float(yaml.safe_load(rundir.read_run_config(trial))["optimizer"]["lr"])
        evals = [r for r in read_metrics(rundir.RunDir(trial).metrics) if r.get("kind") == "eval"]
        final = evals[-1] if evals and evals[-1]["step"] == raw["max_steps"] else {}
        losses = {v: _finite(final.get(METRIC[v])) for v in ("", "+ema")}
        checkpoints = rundir.list_checkpoints(trial / rundir.CHECKPOINTS)[-AVERAGE_LAST:]
        losses["+avg"] = _finite(scorer.loss(average_checkpoints(checkpoints))) if final and checkpoints else math.inf
        trials.append({"lr": lr, "loss": losses})
        shutil.rmtree(trial / rundir.CHECKPOINTS, ignore_errors=True)
    return trials


def average_checkpoints(checkpoints: list[Path]) -> dict:
    from keel.averaging import average_checkpoints as mean

    return mean([str(c) for c in checkpoints])


def _finite(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def tune(name: str, arm: tuple, budget: dict, baseline_lr: float | None, root: Path, workers: int, scorer,
         say) -> dict:
    """Sweep the arm's LR grid (extended once on the side of an edge optimum); the best LR of each variant."""
    raw = arm_config(arm, budget, baseline_lr)
    center = OPTIMIZERS[arm[0]][1]
    lrs = lr_grid(center, budget["lr_points"])
    trials = sweep_lrs(name, raw, lrs, root, workers, scorer)
    if budget["extend"]:
        extra = set()
        for variant in VARIANTS:
            best = min(trials, key=lambda t: t["loss"][variant])
            if best["lr"] == min(lrs):
                extra.add(_round(min(lrs) / 2))
            elif best["lr"] == max(lrs):
                extra.add(_round(max(lrs) * 2))
        if extra:
            trials += sweep_lrs(name, raw, sorted(extra), root, workers, scorer)
    best = {v: min(trials, key=lambda t: t["loss"][v])["lr"] for v in VARIANTS}
    say(f"tuned {name:12s} " + "  ".join(f"{t['lr']:g}: " + "/".join(f"{t['loss'][v]:.4f}" for v in VARIANTS)
                                          for t in sorted(trials, key=lambda t: t["lr"]))
        + f"  -> best {best}")
    return {"arm": list(arm), "config": raw, "trials": trials, "best_lr": best}


# ---- phase 2: seeded runs, interleaved step by step --------------------------------------------------------------

class Baton:
    """Round-robin turns between threads: one step of one run at a time, in order."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.order = list(range(n))
        self.pos = 0

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.pos] == i)

    def pass_on(self, i: int, done: bool = False) -> None:
        with self.cond:
            k = self.order.index(i)
            if done:
                self.order.pop(k)
                self.pos = k % len(self.order) if self.order else 0
            else:
                self.pos = (k + 1) % len(self.order)
            self.cond.notify_all()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time what ran, not what was queued


def _make_clock(baton: Baton, index: int):
    from keel import rundir
    from keel.techniques import Callback

    class StepClock(Callback):
        """Times optimizer steps (its turn starts at on_step_start) and the EMA update apart; at each checkpoint,
        scores the mean of the last AVERAGE_LAST checkpoints (this one included) and times the averaging."""

        name = "bench_step_clock"

        def __init__(self) -> None:
            self.train = self.ema = 0.0
            self.started = None
            self.avg: list[dict] = []
            self._avg_model = None

        def on_run_start(self, trainer) -> None:
            ema = next(cb for cb in trainer.callbacks if getattr(cb, "name", None) == "ema")
            update = ema.unit.update

            def timed_update() -> None:
                _sync()
                start = time.perf_counter()
                update()
                _sync()
                self.ema += time.perf_counter() - start

            ema.unit.update = timed_update

        def on_step_start(self, trainer) -> None:
            baton.pass_on(index)
            baton.wait(index)
            _sync()
            self.started = time.perf_counter()

        def on_step_end(self, trainer) -> None:
            _sync()
            self.train += time.perf_counter() - self.started

        def on_eval(self, trainer, metrics: dict) -> None:
            metrics["train_seconds"] = self.train
            metrics["ema_seconds"] = self.ema

        def on_checkpoint(self, trainer, ckpt_dir: Path) -> None:
            # ckpt_dir is being written (its model.safetensors is there); the older ones are in place
            older = rundir.list_checkpoints(trainer.run_dir / rundir.CHECKPOINTS)[-(AVERAGE_LAST - 1):]
            start = time.perf_counter()
            weights = average_checkpoints([*older, ckpt_dir / rundir.MODEL_WEIGHTS])
            seconds = time.perf_counter() - start
            if self._avg_model is None:
                self._avg_model = copy.deepcopy(trainer.model)
            self._avg_model.load_state_dict(weights)
            loss = trainer.evaluate(self._avg_model)["val_loss"]
            self.avg.append({"step": trainer.state.step, "val_loss_avg": loss, "avg_seconds": seconds})

    return StepClock()


def run_group(job: dict) -> list[dict]:
    """Train the group's runs (one seed, one horizon) interleaved step by step; return their evaluation curves."""
    torch.set_num_threads(1)
    from keel.config import TrainConfig
    from keel.train import train

    runs, root = job["runs"], Path(job["root"])
    baton = Baton(len(runs))
    results: list[dict | None] = [None] * len(runs)

    def worker(i: int) -> None:
        baton.wait(i)
        clock = _make_clock(baton, i)
        try:
            config = TrainConfig.model_validate(runs[i]["config"])
            result = train(config, callbacks=[clock], run_dir=root / f"run{i}", quiet=True)
            evals = [r for r in result["history"] if r.get("kind") == "eval"]
            results[i] = {"evals": evals, "avg": clock.avg}
        except Exception as error:  # a diverging recipe is a result, not a crash of the benchmark
            results[i] = {"evals": [], "avg": [], "error": f"{type(error).__name__}: {error}"}
        finally:
            shutil.rmtree(root / f"run{i}", ignore_errors=True)  # still its turn: no other step is timed meanwhile
            baton.pass_on(i, done=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [{**run, **result} for run, result in zip(runs, results)]


def seeded_jobs(arms: dict, budget: dict, seeds: int, horizons: list[float], root: Path) -> list[dict]:
    """One job per (seed, horizon): every arm's run with its tuned LR per variant, the baseline in each."""
    jobs = []
    for seed in range(seeds):
        for horizon in horizons:
            runs = []
            for name, tuned in arms.items():
                for lr in sorted(set(tuned["best_lr"].values())):
                    raw = copy.deepcopy(tuned["config"])
                    raw["optimizer"]["lr"] = lr
                    raw["seed"] = 1337 + seed
                    raw["max_steps"] = max(1, round(budget["steps"] * horizon))
                    raw["eval_interval"] = raw["checkpoint_interval"] = max(1, round(budget["eval_interval"]
                                                                                     * horizon))
                    variants = [v for v, best in tuned["best_lr"].items() if best == lr]
                    runs.append({"arm": name, "lr": lr, "variants": variants, "seed": seed, "horizon": horizon,
                                 "group": f"{root.name}/seed{seed}-h{horizon}", "config": raw})
            jobs.append({"runs": runs, "root": str(root / f"seed{seed}-h{horizon}"), "seed": seed,
                         "horizon": horizon})
    return jobs


def run_jobs(jobs: list[dict], processes: int, say) -> list[dict]:
    results = []
    if processes <= 1:
        done = map(run_group, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(processes)
        done = pool.imap_unordered(run_group, sorted(jobs, key=lambda j: -j["horizon"]))
    for runs in done:
        results += runs
        say(f"seed {runs[0]['seed']} horizon {runs[0]['horizon']}: " + ", ".join(
            f"{r['arm']}@{r['lr']:g} {r['evals'][-1]['val_loss']:.4f}" if r["evals"] else f"{r['arm']} failed"
            for r in runs))
    if processes > 1:
        pool.close()
        pool.join()
    return results


# ---- the figure --------------------------------------------------------------------------------------------------

def curve(run: dict, variant: str) -> list[dict]:
    """(step, tokens, seconds, loss) of a run evaluated as `variant`."""
    points = []
    avg = {p["step"]: p for p in run.get("avg", [])}
    for r in run["evals"]:
        seconds = r["train_seconds"] - (0.0 if variant == "+ema" else r["ema_seconds"])
        if variant == "+avg":
            if r["step"] not in avg:
                continue
            loss, seconds = avg[r["step"]]["val_loss_avg"], seconds + avg[r["step"]]["avg_seconds"]
        else:
            loss = r.get(METRIC[variant])
        points.append({"step": r["step"], "tokens": r["tokens"], "seconds": seconds, "loss": _finite(loss)})
    return points


def time_scales(runs: list[dict]) -> dict[str, float]:
    """Per group (one seed and horizon, interleaved step by step): the factor that puts its seconds on the time base
    of the seed's full-horizon group, the ratio of the two groups' baseline seconds per step. How fast a step runs
    depends on what it is interleaved with (caches, load), so seconds compare within a group or through its
    baseline."""
    def step_time(run):
        last = curve(run, "")[-1]
        return last["seconds"] / last["step"]

    full = max(r["horizon"] for r in runs)
    bases = {r["group"]: r for r in runs if r["arm"] == "baseline" and "" in r["variants"]}
    reference = {r["seed"]: r for r in bases.values() if r["horizon"] == full and not r.get("reference_only")}
    return {group: step_time(reference[base["seed"]]) / step_time(base) for group, base in bases.items()}


def crossing(points: list[dict], target: float) -> dict | None:
    """Steps, tokens and seconds where the curve first reaches `target`, interpolated between evaluations."""
    for i, p in enumerate(points):
        if p["loss"] <= target:
            if i == 0:
                return {k: p[k] for k in ("step", "tokens", "seconds")}
            q = points[i - 1]
            w = (q["loss"] - target) / (q["loss"] - p["loss"])
            return {k: q[k] + w * (p[k] - q[k]) for k in ("step", "tokens", "seconds")}
    return None


def table(runs: list[dict], seeds: int) -> tuple[list[dict], dict[int, float]]:
    """Per recipe (arm x variant): speedups over the baseline at the baseline's final loss of the same seed.

    Seconds are on the time base of the seed's full-horizon group (``time_scales``)."""
    full = max(r["horizon"] for r in runs)
    reference = {r["seed"]: r for r in runs if r["arm"] == "baseline" and r["horizon"] == full
                 and "" in r["variants"] and not r.get("reference_only")}
    targets = {s: curve(reference[s], "")[-1]["loss"] for s in range(seeds)}
    scales = time_scales(runs)
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        for variant in VARIANTS:
            row = {"recipe": arm + (f" {variant}" if variant else ""), "arm": arm, "variant": variant, "lr": None,
                   "reached": 0, "gap": [], "final": []}
            per_seed: dict[str, list[float]] = {k: [] for k in ("step", "tokens", "seconds")}
            for seed in range(seeds):
                base_hit = crossing(curve(reference[seed], ""), targets[seed])
                hits, best_loss = [], math.inf
                for run in (r for r in runs if r["arm"] == arm and r["seed"] == seed and variant in r["variants"]
                            and not r.get("reference_only")):
                    row["lr"] = run["lr"]
                    points = curve(run, variant)
                    if run["horizon"] == full and points:
                        row["final"].append(points[-1]["loss"])
                    best_loss = min([best_loss] + [p["loss"] for p in points])
                    hit = crossing(points, targets[seed])
                    if hit is not None:
                        hits.append({**hit, "seconds": hit["seconds"] * scales[run["group"]]})
                if hits:
                    row["reached"] += 1
                    for key in per_seed:
                        per_seed[key].append(base_hit[key] / min(h[key] for h in hits))
                else:
                    row["gap"].append(best_loss - targets[seed])
            row["speedup"] = {k: summary(v) if v else None for k, v in per_seed.items()}
            row["per_seed"] = per_seed
            rows.append(row)
    return rows, targets


def robust_winner(rows: list[dict], seeds: int) -> dict | None:
    """The recipe that reached the target on every seed with the highest worst-seed token speedup."""
    candidates = [r for r in rows if r["arm"] != "baseline" or r["variant"]]
    candidates = [r for r in candidates if r["reached"] == seeds and r["speedup"]["tokens"]]
    return max(candidates, key=lambda r: (r["speedup"]["tokens"]["min"], r["speedup"]["seconds"]["median"]),
               default=None)


def combinations(rows: list[dict]) -> dict[str, tuple]:
    """Best optimizer x best decay (by median token speedup, plain evaluation), and with sequence warmup when
    that helped on its own."""
    def score(arm):
        row = next((r for r in rows if r["arm"] == arm and r["variant"] == ""), None)
        return row["speedup"]["tokens"]["median"] if row and row["speedup"]["tokens"] else 0.0

    optimizer = max([arm for arm, (_, decay, seq) in SINGLES.items() if decay == "cosine" and not seq], key=score)
    decay = max(["baseline", "wsd", "sqrt decay"], key=score)
    opt, dec = SINGLES[optimizer][0], SINGLES[decay][1]
    combos = {}
    if (opt, dec) not in [(o, d) for o, d, s in SINGLES.values() if not s]:
        combos[f"{opt} + {dec}"] = (opt, dec, False)
    if score("seq warmup") > 1.0:
        combos[f"{opt} + {dec} + seq warmup"] = (opt, dec, True)
    return combos


# ---- report ------------------------------------------------------------------------------------------------------

def _cell(cell: dict | None, gap: list[float]) -> str:
    if cell is None:
        return f"not reached (best +{min(gap):.3f})" if gap else "not reached"
    if cell["n"] == 1:
        return f"{cell['median']:.2f}x"
    return f"{cell['median']:.2f}x [{cell['min']:.2f}, {cell['max']:.2f}]"


def section(data: dict) -> str:
    m, end, b = data["machine"], data["machine_end"], data["budget"]
    where = f"{m['gpu']}" if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores, 1 thread per run"
    lines = [
        f"`python benchmarks/bench_recipes.py --budget {data['budget_name']} --seeds {data['seeds']}` — {m['date']}, "
        f"{where}, load average {m['load_average']} (end {end['load_average']}), torch {m['torch']}; "
        f"{data['minutes']:.0f} min.",
        "",
        f"Workload: byte-level GPT ({b['model']['n_layer']} layers, width {b['model']['n_embd']}, context "
        f"{b['model']['block_size']}) on `{b.get('source', 'pydoc')}`, batch {b['batch']} x "
        f"{b['model']['block_size']} tokens, {b['steps']} steps, clipping at 1.0; evaluation every "
        f"{b['eval_interval']} steps on {b['eval_tokens']:,} validation tokens. Every recipe's peak LR tuned by "
        f"`keel sweep` on a grid of {b['lr_points']} LRs a factor 2 apart (extended at an edge optimum), one seed. "
        f"Target: the tuned baseline's final validation loss of the same seed (median {data['target_median']:.4f}). "
        f"Horizons: {', '.join(f'{h:g}' for h in b['horizons'])} x the baseline's steps; the least steps, tokens "
        f"and training seconds to the target over them, as speedups over the baseline (baseline / recipe), median "
        f"[min, max] over {data['seeds']} seeds. `+ema`: evaluated on the EMA (half-life 5% of the run); `+avg`: on "
        f"the mean of the last {AVERAGE_LAST} checkpoints (one per evaluation).",
        "",
        "| recipe | peak LR | reached | steps speedup | tokens speedup | seconds speedup | final val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["table"]:
        final = row["final"]
        shown = f"{statistics.median(final):.4f}" if final else "-"
        lines.append(f"| {row['recipe']} | {row['lr']:g} | {row['reached']}/{data['seeds']} | "
                     f"{_cell(row['speedup']['step'], row['gap'])} | {_cell(row['speedup']['tokens'], row['gap'])} | "
                     f"{_cell(row['speedup']['seconds'], row['gap'])} | {shown} |")
    lines += ["", f"![validation loss against tokens and seconds]({data['plot']})", ""]
    lines += [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def plot(data: dict, path: Path) -> None:
    """Validation loss against tokens and against seconds: one line per recipe (median over seeds), a band over
    seeds (min to max), full horizon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = data["runs"]
    full = max(r["horizon"] for r in runs)
    shown = [(row["arm"], row["variant"]) for row in data["table"]
             if row["variant"] == "" or row["recipe"] == (data.get("winner") or {}).get("recipe")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    scales, colours, lowest = time_scales(runs), plt.get_cmap("tab20").colors, []
    for index, (arm, variant) in enumerate(shown):
        curves = [[{**p, "seconds": p["seconds"] * scales[r["group"]]} for p in curve(r, variant)] for r in runs
                  if r["arm"] == arm and r["horizon"] == full and variant in r["variants"] and r["evals"]
                  and not r.get("reference_only")]
        if not curves:
            continue
        style = {"color": "black", "lw": 2.4} if arm == "baseline" and not variant else \
            {"color": colours[(2 * index) % 20 + (index // 10) % 2], "lw": 1.4, "ls": "-" if index < 10 else "--"}
        for ax, key in zip(axes, ("tokens", "seconds")):
            xs = np.linspace(max(c[0][key] for c in curves), min(c[-1][key] for c in curves), 60)
            ys = np.array([np.interp(xs, [p[key] for p in c], [min(p["loss"], 10.0) for p in c]) for c in curves])
            label = arm + (f" {variant}" if variant else "")
            ax.plot(xs, np.median(ys, axis=0), label=label, **style)
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=style["color"], alpha=0.12)
            lowest.append(float(ys.min()))
    target = statistics.median(data["targets"].values())
    for ax, key in zip(axes, ("tokens", "seconds of training (one thread; the baseline's time base)")):
        ax.axhline(target, color="grey", ls=":", lw=1.0, label="target (baseline's final loss)")
        ax.set_xlabel(key)
        ax.set_ylabel("validation loss")
        ax.set_ylim(min(lowest + [target]) - 0.05, target + 0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Time to target, budget {data['budget_name']}: median over {data['seeds']} seeds, band min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, help="seeds of every recipe (default: the budget's)")
    parser.add_argument("--workers", type=int, default=2, help="keel sweep workers, and processes for the seeds")
    parser.add_argument("--arms", help=f"comma-separated subset of {', '.join(SINGLES)} (baseline always runs)")
    parser.add_argument("--no-combinations", action="store_true")
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="results into --out only, not benchmarks/")
    parser.add_argument("--from-json", metavar="PATH", help="render the table and plot of a saved recipes.json again")
    args = parser.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        report(data, args)
        return data
    budget = dict(BUDGETS[args.budget])
    seeds = args.seeds or budget["seeds"]
    torch.set_num_threads(1)
    started, start_machine = time.time(), machine()

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"budget {args.budget}, load average {os.getloadavg()}")
    chosen = list(SINGLES) if not args.arms else ["baseline"] + [a for a in args.arms.split(",") if a != "baseline"]
    unknown = [a for a in chosen if a not in SINGLES]
    if unknown:
        parser.error(f"--arms: {', '.join(unknown)} unknown; allowed: {', '.join(SINGLES)}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="keel-recipes-"))
    work.mkdir(parents=True, exist_ok=True)

    from keel.config import TrainConfig
    from keel.train.scoring import ValidationScorer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = ValidationScorer(TrainConfig.model_validate(base_config(budget)), device)
    tuned: dict[str, dict] = {}
    baseline = tune("baseline", SINGLES["baseline"], budget, None, work, args.workers, scorer, say)
    tuned["baseline"] = baseline
    baseline_lr = baseline["best_lr"][""]
    for name in chosen[1:]:
        tuned[name] = tune(name, SINGLES[name], budget, baseline_lr, work, args.workers, scorer, say)
    runs = run_jobs(seeded_jobs(tuned, budget, seeds, budget["horizons"], work / "singles"), args.workers, say)
    rows, _ = table(runs, seeds)
    combos = {} if args.no_combinations else combinations(rows)
    if combos:
        say(f"combinations: {', '.join(combos)}")
        extra = {name: tune(name, arm, budget, baseline_lr, work, args.workers, scorer, say)
                 for name, arm in combos.items()}
        tuned.update(extra)
        reference = {**baseline, "best_lr": {"": baseline_lr}}  # the time base of the combinations' groups
        more = run_jobs(seeded_jobs({"baseline": reference, **extra}, budget, seeds, budget["horizons"],
                                    work / "combinations"), args.workers, say)
        for run in more:
            run["reference_only"] = run["arm"] == "baseline"
        runs += more
    rows, targets = table(runs, seeds)
    data = {"machine": start_machine, "machine_end": machine(), "budget_name": args.budget, "budget": budget,
            "seeds": seeds, "tuned": tuned, "runs": runs, "table": rows, "targets": targets,
            "target_median": statistics.median(targets.values()), "minutes": (time.time() - started) / 60}
    data["winner"] = robust_winner(rows, seeds)
    if data["winner"]:
        w = data["winner"]
        say(f"robust winner: {w['recipe']} at lr {w['lr']:g}: tokens {_cell(w['speedup']['tokens'], [])}, "
            f"seconds {_cell(w['speedup']['seconds'], [])}")
    report(data, args, work)
    return data


EVAL_KEYS = ("step", "tokens", "val_loss", "val_loss_ema", "train_seconds", "ema_seconds")


def compact(runs: list[dict]) -> list[dict]:
    """What recipes.json keeps of each run: its identity and the curves the table and plot read (floats to 6
    significant digits); its config is the arm's tuned config in ``tuned`` with the run's lr, seed and horizon."""
    def short(value):
        return float(f"{value:.6g}") if isinstance(value, float) else value

    kept = []
    for run in runs:
        run = {k: v for k, v in run.items() if k != "config"}
        run["evals"] = [{k: short(r[k]) for k in EVAL_KEYS if k in r} for r in run["evals"]]
        run["avg"] = [{k: short(v) for k, v in p.items()} for p in run.get("avg", [])]
        kept.append(run)
    return kept


def report(data: dict, args: argparse.Namespace, work: Path | None = None) -> None:
    """The plot, the RESULTS.md section and recipes.json (into --out with --no-write)."""
    data["runs"] = compact(data["runs"])
    results = Path(args.out or work) if args.no_write else HERE / "results"
    results.mkdir(parents=True, exist_ok=True)
    image = results / "recipes.png" if args.no_write else HERE.parent / "docs" / "img" / "recipes.png"
    data["plot"] = image.name if args.no_write else "../docs/img/recipes.png"
    plot(data, image)
    body = section(data)
    print(body)
    if args.no_write:
        (results / "recipes.json").write_text(json.dumps(data, indent=1, default=str))
        (results / "recipes.md").write_text(body)
    else:
        write_json("recipes", data, indent=None)  # one line: every run's curves
        write_section("recipes", body)


if __name__ == "__main__":
    main()
