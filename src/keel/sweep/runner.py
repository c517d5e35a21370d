"""``keel sweep``'s procedures: a plain search, and the presets ``coarse-to-fine`` and ``restarts``.

The sweep directory::

    SWEEP/
      sweep.yaml            what was asked (config, options, preset, storage, study): --resume reads it
      study.db              the studies (SQLite) unless --storage names another database
      trials.csv best.yaml  the results (a preset: every stage's trials, and the config it ends with)
      objective_<key>.png history.png importances.png
      trials/trial_00000/   one keel run directory per trial
      lr/ grid/ refine/ final/ (refine-2/ final-2/ ...) seeds/   a preset's stages, each laid out like a plain sweep

**coarse-to-fine** (the training-dynamics notes' steps 3-7): (1) ``lr``: LR decades 1e-1, 1e-2, 1e-3, 1e-4; (2)
``grid``: LR at the best decade times 10^-0.5, 1, 10^0.5 by weight decay {1e-4, 1e-5, 0}; (3) ``refine``: TPE over
LR in [best / 2, best x 2] and weight decay in [wd / 3, wd x 3] (held at 0 when 0 won); each of these a short run of
``budget`` steps with its own schedule; (4) ``final``: the best config for the config's full ``max_steps``, without
LR decay (a constant LR after the same warmup). ``survivors`` N carries the N best of each stage to the next (the
grid around each of N decades, the refined ranges spanning N grid points, N long runs: step 5's "best few");
``repeats`` R runs refine + final R times (step 7), each round after the first around the N best long runs so far
(``refine-2``, ``final-2``, ...); ``best.yaml`` is the best long run.

**restarts** (random restarts, successive halving over seeds with one rung): N seeds (initialisation and data order)
trained for ``budget`` steps, then only the best continues, from its checkpoint, to the full length. The short runs
are the full-length runs stopped early (``stop_at``): their schedule is planned for the full ``max_steps``, so the
seeds are compared at the very LR the full run has there, and continuing the best is a plain resume, bitwise the
run it would have been uninterrupted. (Short runs with their own compressed schedule would be compared after a full
decay, and could only continue under ``resume_policy`` keep_schedule, stuck at the final LR, or new_decay, a second
decay the full run never has.) The result says how far the best seed is from the median seed.
"""

from __future__ import annotations

import copy
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from keel.config import read_yaml, validate
from keel.errors import KeelError
from keel.sweep.space import SweepOptions, check_space, space_of
from keel.sweep.study import Stage, Say, grid_size, run_stage
from keel.timeunits import Timeline

SWEEP_FILE = "sweep.yaml"
PRESETS = ("coarse-to-fine", "restarts")
LR_DECADES = [1e-1, 1e-2, 1e-3, 1e-4]
WEIGHT_DECAYS = [1e-4, 1e-5, 0.0]


def default_sweep_dir() -> Path:
    return Path("sweeps") / datetime.now().strftime("%Y%m%d-%H%M%S")


def new_sweep(raw: dict[str, Any], options: dict[str, Any], preset: str | None, out: str | None,
              storage: str | None, study: str | None) -> tuple[Path, dict[str, Any]]:
    """Validate a new sweep and write its ``sweep.yaml``; return (sweep directory, spec)."""
    merged = {**(raw.get("sweep_options") or {}), **{k: v for k, v in options.items() if v is not None}}
    check_sweep(raw, merged, preset)
    root = Path(out) if out else default_sweep_dir()
    if root.exists() and any(root.iterdir()):
        raise KeelError(f"--out {root}: the directory exists and is not empty; allowed: a new directory, or "
                        f"keel sweep --resume {root} to continue that sweep")
    check_trainable(raw, merged)
    spec = {"config": raw, "options": merged, "preset": preset, "storage": storage, "study": study or root.name}
    root.mkdir(parents=True, exist_ok=True)
    (root / SWEEP_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return root, spec


def check_sweep(raw: dict[str, Any], options: dict[str, Any], preset: str | None) -> None:
    """What a sweep's config, options and preset must be (a new sweep, and the sweep.yaml of one resumed)."""
    from keel.config import validate as validate_block

    validate(raw)  # every key, the sweep: block's syntax included
    validate_block(options, SweepOptions)
    if preset is not None and preset not in PRESETS:
        raise KeelError(f"preset: {preset!r} is not a preset; allowed: {', '.join(PRESETS)}")
    space = space_of(raw)
    if preset is None:
        if not space:
            raise KeelError("keel sweep: the config has no sweep: block; allowed: a sweep: block mapping dotted keys "
                            "to distributions (e.g. optimizer.lr: loguniform(1e-4, 1e-1)), or --preset "
                            f"{' or --preset '.join(PRESETS)}")
        check_space(raw, space)


def check_trainable(raw: dict[str, Any], options: dict[str, Any]) -> None:
    """Build what every trial builds (the task, the model, its first batch, the techniques' checks: a metric early
    stopping cannot see, sequence warmup on a task without sequences) for the config as written, writing nothing,
    so bad input all trials would meet is one line before the sweep directory is made. Skipped where it would cost
    what the trials do not (a GPU context in a parent that only relays its workers; torchrun) and where the config
    alone is no trial (keys only the sweep's values make valid)."""
    import tempfile

    from keel.train import distributed
    from keel.train.loop import Trainer, resolve_device

    base = _base(raw)
    if base.get("threads") is None:
        base["threads"] = SweepOptions(**options).threads
    try:
        config = validate(base)
    except KeelError:
        return  # the sweep's values complete it: check_space has tried them
    if distributed.launched() or (resolve_device(config.device).type != "cpu" and SweepOptions(**options).workers > 1):
        return
    import torch

    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="keel-sweep-check-") as folder:
            Trainer(config, run_dir=Path(folder) / "unused", quiet=True)
    finally:
        torch.set_num_threads(threads)


def load_sweep(root: str | Path, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The spec of an existing sweep, with ``--trials`` / ``--workers`` (and other options given) applied; a
    sweep.yaml that is not what ``keel sweep`` wrote (edited, damaged) is a KeelError naming what is wrong."""
    root = Path(root)
    if not (root / SWEEP_FILE).is_file():
        raise KeelError(f"--resume {root}: not a keel sweep directory (no {SWEEP_FILE})")
    where = f"--resume {root}: {SWEEP_FILE}"
    try:
        spec = read_yaml(root / SWEEP_FILE)
    except KeelError as error:
        raise KeelError(f"--resume {root}: {error}") from None
    if not isinstance(spec.get("config"), dict) or not isinstance(spec.get("options", {}), (dict, type(None))):
        raise KeelError(f"{where} has no config: and options: mappings (its keys: {', '.join(map(str, spec))}); "
                        f"allowed: the {SWEEP_FILE} keel sweep wrote")
    bad = [key for key in ("preset", "storage", "study") if not isinstance(spec.get(key) or "", str)]
    if bad:
        raise KeelError(f"{where}: {bad[0]} is {spec[bad[0]]!r}; allowed: a string, as keel sweep wrote it")
    spec["options"] = {**(spec.get("options") or {}), **{k: v for k, v in options.items() if v is not None}}
    spec["study"] = spec.get("study") or root.resolve().name
    try:
        check_sweep(spec["config"], spec["options"], spec.get("preset"))
    except KeelError as error:
        raise KeelError(f"{where}: {error}") from None
    (root / SWEEP_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return root, spec


def run(root: Path, spec: dict[str, Any], say: Say = print) -> dict[str, Any]:
    """Run (or continue) the sweep in ``root``; return its summary."""
    preset = spec.get("preset")
    if preset == "coarse-to-fine":
        return coarse_to_fine(root, spec, say)
    if preset == "restarts":
        return restarts(root, spec, say)
    return plain(root, spec, say)


def _base(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("sweep", "sweep_options", "out_dir")}


def _stage(root: Path, spec: dict[str, Any], name: str, directory: Path, config: dict[str, Any],
           space: dict[str, Any], trials: int | None, **extra: Any) -> Stage:
    options = SweepOptions(**spec["options"])
    study = spec["study"] if directory == root else f"{spec['study']}.{name}"
    stage = Stage(name=name, dir=directory, root=root, config=config, space=space, options=options.model_dump(),
                  study=study, storage=spec.get("storage"), **extra)
    size = grid_size(stage)
    stage.trials = trials or options.trials or size or 20
    return stage


def _workers(spec: dict[str, Any]) -> int:
    return SweepOptions(**spec["options"]).workers


def plain(root: Path, spec: dict[str, Any], say: Say) -> dict[str, Any]:
    from keel.sweep.results import write_results

    raw = spec["config"]
    from keel.sweep.space import flatten_keys

    stage = _stage(root, spec, "search", root, _base(raw), flatten_keys(raw["sweep"]), None)
    say(f"sweep {root}: study {stage.study!r} in {_shown_storage(stage)}; {stage.trials} trials of "
        f"{', '.join(stage.space)}; {_workers(spec)} worker(s)")
    run_stage(stage, _workers(spec), say)
    result = write_results(stage, say)
    _finish_line(root, result["best"], stage, say)
    return result


def _shown_storage(stage: Stage) -> str:
    return stage.storage if stage.storage else f"{stage.root / 'study.db'} (SQLite)"


def _finish_line(root: Path, best: dict[str, Any] | None, stage: Stage, say: Say) -> None:
    if best is not None:
        say(f"best: trial {best['number']}, {stage.metric} {best[stage.metric]:.4f}; wrote {root}/trials.csv, "
            f"best.yaml (keel train {root}/best.yaml), objective_*.png, history.png")


def budget_steps(spec: dict[str, Any], max_steps: int | None) -> int:
    options = SweepOptions(**spec["options"])
    if max_steps is None:
        raise KeelError("duration: keel sweep's presets plan their stages in steps; allowed: the run length as "
                        "max_steps")
    steps = Timeline.of_steps(max_steps).steps(options.budget, "sweep_options.budget")
    if not 1 <= steps < max_steps:
        raise KeelError(f"sweep_options.budget: {options.budget!r} is {steps} steps of a {max_steps}-step run; "
                        "allowed: a short budget of at least 1 step and fewer than max_steps (e.g. '20%')")
    return steps


# ------------------------------------------------------------------------------------------ coarse-to-fine


def coarse_to_fine(root: Path, spec: dict[str, Any], say: Say) -> dict[str, Any]:
    from keel.sweep.results import write_best, write_csv

    raw = _base(spec["config"])
    config = validate(raw)
    options = SweepOptions(**spec["options"])
    keep, rounds = options.survivors, options.repeats
    short = budget_steps(spec, config.max_steps)
    short_raw = {**copy.deepcopy(raw), "max_steps": short}
    long_raw = {**copy.deepcopy(raw), "schedule": {"name": "constant", "warmup": config.schedule.get("warmup", 0)}}
    workers = _workers(spec)
    tables, all_rows = [], []
    total = 2 + 2 * rounds
    carried = f", {keep} survivors per stage" if keep > 1 else ""
    again = f", {rounds} rounds of refine and train longer" if rounds > 1 else ""
    say(f"coarse-to-fine in {root}: stages of {short} steps (lr, grid, refine), then the best for {config.max_steps} "
        f"steps without LR decay{carried}{again}")

    def stage_run(name, space, trials, stage_raw, sampler, title, points=()):
        from keel.sweep.results import write_results

        stage_options = dict(spec["options"], sampler=sampler, pruner="none")
        stage = _stage(root, {**spec, "options": stage_options}, name, root / name, stage_raw, space, trials,
                       points=list(points))
        run_stage(stage, workers, say)
        result = write_results(stage, say, title=title)
        tables.append((title, stage, result["rows"]))
        all_rows.extend(result["rows"])
        if result["best"] is None:
            raise KeelError(f"coarse-to-fine: no trial of stage {name} completed (see {stage.dir}/trials.csv)")
        return stage, result["rows"]

    number = iter(range(1, total + 1))
    stage, rows = stage_run("lr", {"optimizer.lr": LR_DECADES}, None, short_raw, "grid",
                            f"stage {next(number)}/{total} lr: LR decades, {short} steps each")
    decades = [float(row["optimizer.lr"]) for row in _best_of(stage, rows, keep, ["optimizer.lr"])]
    lrs = sorted({_round(lr * factor) for lr in decades for factor in (10**-0.5, 1.0, 10**0.5)})
    stage, rows = stage_run("grid", {"optimizer.lr": lrs, "optimizer.weight_decay": WEIGHT_DECAYS}, None, short_raw,
                            "grid", f"stage {next(number)}/{total} grid: LR x weight decay around "
                            f"{', '.join(f'{lr:g}' for lr in decades)}, {short} steps each")
    survivors = [_params(row) for row in _best_of(stage, rows, keep, _KEYS)]
    finals: list[tuple[Any, dict[str, Any]]] = []  # every long run: (its stage, its row)
    for round_index in range(1, rounds + 1):
        suffix = "" if round_index == 1 else f"-{round_index}"
        around = "; ".join(f"lr {p['optimizer.lr']:g}, weight decay {p['optimizer.weight_decay']:g}" for p in survivors)
        stage, rows = stage_run(f"refine{suffix}", _refine_space(survivors), options.refine_trials, short_raw, "tpe",
                                f"stage {next(number)}/{total} refine: around {around}, {short} steps each")
        points = [_params(row) for row in _best_of(stage, rows, keep, _KEYS)]
        shown = "; ".join(f"lr {p['optimizer.lr']:.4g}, weight decay {p['optimizer.weight_decay']:g}" for p in points)
        space = {key: sorted({p[key] for p in points}) for key in _KEYS}
        stage, rows = stage_run(f"final{suffix}", space, len(points), long_raw, "random",
                                f"stage {next(number)}/{total} final: {shown}, {config.max_steps} steps, constant LR",
                                points=points)
        finals += [(stage, row) for row in rows if row["state"] == "complete" and row[stage.metric] is not None]
        survivors = [_params(row) for _, row in _ranked(finals)[:keep]]  # step 7: go on from the best long runs
    final_stage, final = _ranked(finals)[0]
    params = _params(final)
    write_csv(root / "trials.csv", all_rows)
    write_best(root / "best.yaml", final_stage, final, raw=_apply(long_raw, params))
    _write_summary(root, tables)
    metric = final_stage.metric
    say(f"coarse-to-fine: final {metric} {final[metric]:.4f} (lr {params['optimizer.lr']:.4g}, weight decay "
        f"{params['optimizer.weight_decay']:g}, {config.max_steps} steps); wrote {root}/trials.csv, best.yaml, "
        "summary.txt and each stage's directory")
    return {"best": final, "params": params, "stages": [t[1].name for t in tables],
            "finals": [{"stage": s.name, **_params(row), metric: row[metric]} for s, row in finals]}


_KEYS = ["optimizer.lr", "optimizer.weight_decay"]


def _params(row: dict[str, Any]) -> dict[str, float]:
    return {key: float(row[key]) for key in _KEYS}


def _best_of(stage: Stage, rows: list[dict[str, Any]], keep: int, keys: list[str]) -> list[dict[str, Any]]:
    """The ``keep`` best complete trials of a stage, distinct in ``keys``."""
    from keel.sweep.results import ordered

    chosen, seen = [], set()
    for row in ordered(rows, stage):
        point = tuple(repr(row.get(key)) for key in keys)
        if row["state"] != "complete" or row[stage.metric] is None or point in seen:
            continue
        seen.add(point)
        chosen.append(row)
        if len(chosen) == keep:
            break
    return chosen


def _ranked(finals: list[tuple[Stage, dict[str, Any]]]) -> list[tuple[Stage, dict[str, Any]]]:
    """The long runs, best first (every final stage has the same metric and direction)."""
    if not finals:
        raise KeelError("coarse-to-fine: no final run completed (see the final stages' trials.csv)")
    sign = -1 if finals[0][0].direction == "maximize" else 1
    return sorted(finals, key=lambda item: sign * item[1][item[0].metric])


def _refine_space(survivors: list[dict[str, float]]) -> dict[str, Any]:
    """TPE's ranges around the survivors: LR from half the lowest to twice the highest; weight decay from a third of
    the lowest to three times the highest, held at 0 when 0 won, or the survivors' own values when 0 and others
    did."""
    lrs = [p["optimizer.lr"] for p in survivors]
    decays = [p["optimizer.weight_decay"] for p in survivors]
    positive = [wd for wd in decays if wd > 0]
    if not positive:
        decay: Any = [0.0]
    elif len(positive) == len(decays):
        decay = f"loguniform({min(positive) / 3:.6g}, {max(positive) * 3:.6g})"
    else:
        decay = sorted(set(decays))
    return {"optimizer.lr": f"loguniform({min(lrs) / 2:.6g}, {max(lrs) * 2:.6g})", "optimizer.weight_decay": decay}


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _apply(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    from keel.sweep.space import apply_params

    return apply_params(raw, params)


def _write_summary(root: Path, tables: list) -> None:
    from keel.sweep.results import table_lines

    lines = []
    for title, stage, rows in tables:
        lines.append(title)
        lines.extend("  " + line for line in table_lines(rows, stage, limit=50))
        lines.append("")
    (root / "summary.txt").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ restarts


def restarts(root: Path, spec: dict[str, Any], say: Say) -> dict[str, Any]:
    from keel import rundir
    from keel.rundir.metrics import read_metrics
    from keel.sweep.results import write_best, write_csv, write_results
    from keel.train import Trainer

    raw = _base(spec["config"])
    config = validate(raw)
    options = SweepOptions(**spec["options"])
    short = budget_steps(spec, config.max_steps)
    seeds = [config.seed + i for i in range(options.seeds)]
    say(f"restarts in {root}: {len(seeds)} seeds for {short} of {config.max_steps} steps (the full schedule, "
        "stopped early), then the best continues to the end")
    stage_options = dict(spec["options"], sampler="grid", pruner="none")
    stage = _stage(root, {**spec, "options": stage_options}, "seeds", root / "seeds", raw, {"seed": seeds},
                   len(seeds), stop_at=short)
    run_stage(stage, _workers(spec), say)
    result = write_results(stage, say, title=f"restarts: {len(seeds)} seeds, {short} steps each", best=False)
    rows, best = result["rows"], result["best"]
    if best is None:
        raise KeelError(f"restarts: no seed completed its {short} steps (see {stage.dir}/trials.csv)")
    metric = stage.metric
    values = [r[metric] for r in rows if r["state"] == "complete" and r[metric] is not None]
    median = statistics.median(values)
    run_dir = stage.dir / best["run_dir"]
    trained = validate(read_yaml(run_dir / rundir.CONFIG))
    newest = rundir.newest_intact(run_dir / rundir.CHECKPOINTS)
    if newest is None or _step_of(newest) < trained.max_steps:
        say(f"continuing seed {best['seed']} (trial {best['number']}) from step {_step_of(newest) if newest else 0} "
            f"to {trained.max_steps} in {run_dir}")
        Trainer(trained, run_dir=run_dir, resume=True, quiet=True).fit()
    evals = [r for r in read_metrics(run_dir / rundir.METRICS) if r.get("kind") == "eval" and metric in r]
    final = evals[-1][metric]
    gap = median - best[metric] if stage.direction == "minimize" else best[metric] - median
    lines = [
        f"best seed {best['seed']} (trial {best['number']}): {metric} {best[metric]:.4f} at step {short}; median of "
        f"{len(values)} seeds {median:.4f}: the best is {gap:.4f} better ({100 * gap / abs(median):.1f}% of the median)",
        f"seed {best['seed']} continued to step {evals[-1]['step']}: {metric} {final:.4f}",
    ]
    for line in lines:
        say(line)
    write_csv(root / "trials.csv", [*rows, {"stage": "continue", "number": best["number"], "state": "complete",
                                           metric: final, "seed": best["seed"], "steps": evals[-1]["step"],
                                           "run_dir": str(Path("seeds") / best["run_dir"])}])
    best_raw = _apply(raw, {"seed": best["seed"]})
    write_best(root / "best.yaml", stage, {**best, metric: final}, raw=best_raw)
    _write_summary(root, [(f"restarts: {len(seeds)} seeds, {short} steps each", stage, rows)])
    with open(root / "summary.txt", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return {"best": best, "median": median, "gap": gap, "final": final, "run_dir": str(run_dir)}


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))
