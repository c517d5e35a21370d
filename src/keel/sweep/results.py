"""A stage's results, read back from its study: ``trials.csv``, ``best.yaml`` and plots.

* ``trials.csv``: one row per trial — number, state (complete, pruned, failed, running, waiting), the metric (a
  pruned trial's last reported value), each searched key, steps, seconds, run directory, the failure's reason,
  the trial a retry repeats, and the worker (host:pid).
* ``best.yaml``: the best complete trial's config, ready for ``keel train best.yaml``.
* ``objective_<key>.png`` for each searched key (log axis for log-distributed keys, one tick per value for lists and
  choices): complete trials as points, pruned ones hollow at their last reported value, failed ones as red crosses
  along the top (infeasible); ``history.png``: each trial's value and the best so far; ``importances.png``: Optuna's
  parameter importances (fANOVA), with two or more keys and three or more complete trials.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import yaml

from keel.sweep.space import apply_params
from keel.sweep.study import Stage, Say, require_optuna

__all__ = ["collect", "print_table", "write_results"]


def collect(study, stage: Stage) -> list[dict[str, Any]]:
    """One dict per trial of ``study``, in trial order."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs.get("failed_trial"): t.number for t in trials
                  if t.system_attrs.get("failed_trial") is not None}
    rows = []
    for t in trials:
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(t.state, t.state.name.lower())
        value = t.value if t.state == TrialState.COMPLETE else None
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        reason = t.user_attrs.get("fail_reason", "")
        if t.state == TrialState.FAIL and not reason:
            reason = (f"its worker died (no heartbeat); retried as trial {retried_as[t.number]}"
                      if t.number in retried_as else "interrupted, or its worker died")
        seconds = t.user_attrs.get("train_seconds")
        rows.append({
            "stage": stage.name, "number": t.number, "state": state, stage.metric: value,
            **{f"{key}": t.params.get(key) for key in stage.space},
            "steps": t.user_attrs.get("steps"), "seconds": seconds, "run_dir": t.user_attrs.get("run_dir", ""),
            "reason": reason, "retry_of": t.system_attrs.get("failed_trial"), "worker": t.user_attrs.get("host", ""),
        })
    return rows


def best_row(rows: list[dict[str, Any]], stage: Stage) -> dict[str, Any] | None:
    complete = [r for r in rows if r["state"] == "complete" and r[stage.metric] is not None]
    if not complete:
        return None
    sign = -1 if stage.direction == "maximize" else 1
    return min(complete, key=lambda r: sign * r[stage.metric])


def ordered(rows: list[dict[str, Any]], stage: Stage) -> list[dict[str, Any]]:
    """Complete trials best first, then pruned (by their last value), then the rest by number."""
    sign = -1 if stage.direction == "maximize" else 1
    rank = {"complete": 0, "pruned": 1}
    return sorted(rows, key=lambda r: (rank.get(r["state"], 2),
                                       sign * r[stage.metric] if r[stage.metric] is not None else 0.0, r["number"]))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(tmp, path)


def table_lines(rows: list[dict[str, Any]], stage: Stage, limit: int = 15) -> list[str]:
    """The stage's trials as an aligned text table, best first (at most ``limit`` rows)."""
    keys = list(stage.space)
    header = ["trial", "state", stage.metric, *keys, "steps", "seconds"]
    body = []
    for row in ordered(rows, stage)[:limit]:
        value = row[stage.metric]
        body.append([str(row["number"]), row["state"], "" if value is None else f"{value:.4f}",
                     *(_fmt(row[k]) for k in keys), "" if row["steps"] is None else str(row["steps"]),
                     "" if row["seconds"] is None else f"{row['seconds']:.1f}"])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    failed = [r for r in rows if r["state"] == "failed"]
    for row in failed[:5]:
        lines.append(f"  trial {row['number']} failed: {row['reason']}")
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in trials.csv")
    return lines


def print_table(rows: list[dict[str, Any]], stage: Stage, say: Say, title: str) -> None:
    say(title)
    for line in table_lines(rows, stage):
        say("  " + line)


def write_best(path: Path, stage: Stage, row: dict[str, Any], raw: dict[str, Any] | None = None) -> None:
    """``best.yaml``: the stage's config with the best trial's values (or ``raw``, a config already built)."""
    config = raw if raw is not None else apply_params(stage.config, {k: row[k] for k in stage.space})
    config.pop("out_dir", None)
    header = (f"# best trial {row['number']} of study {stage.study!r}: {stage.metric} {row[stage.metric]:.6g}\n"
              f"# train it with: keel train {path.name}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def write_results(stage: Stage, say: Say, title: str | None = None, best: bool = True) -> dict[str, Any]:
    """Write the stage's ``trials.csv``, ``best.yaml`` and plots from its study, print its table; return
    ``{"rows", "best"}``."""
    from keel.sweep.study import open_study

    study = open_study(stage)
    rows = collect(study, stage)
    write_csv(stage.dir / "trials.csv", rows)
    winner = best_row(rows, stage)
    if winner is not None and best:
        write_best(stage.dir / "best.yaml", stage, winner)
    plot_stage(stage, study, rows)
    print_table(rows, stage, say, title or f"{stage.name}: {len(rows)} trials ({stage.direction} {stage.metric})")
    if winner is None:
        say("  no trial completed")
    return {"rows": rows, "best": winner}


# ------------------------------------------------------------------------------------------ plots


def plot_stage(stage: Stage, study, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metric = stage.metric
    values = [r[metric] for r in rows if r["state"] in ("complete", "pruned") and r[metric] is not None
              and math.isfinite(r[metric])]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    top = high + 0.08 * (high - low or abs(high) or 1.0)
    for key, distribution in stage.distributions.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        positions = None
        if distribution.categorical:
            labels = [_fmt(v) for v in distribution.choices]
            positions = {repr(v): i for i, v in enumerate(distribution.choices)}
            axis.set_xticks(range(len(labels)), labels)

        def x_of(value):
            return positions.get(repr(value), math.nan) if positions is not None else value

        for state, style in (("complete", {"marker": "o", "color": "C0", "label": "complete"}),
                             ("pruned", {"marker": "o", "facecolors": "none", "edgecolors": "C1", "label": "pruned"})):
            chosen = [r for r in rows if r["state"] == state and r[metric] is not None and r.get(key) is not None]
            if chosen:
                axis.scatter([x_of(r[key]) for r in chosen], [r[metric] for r in chosen], **style)
        failed = [r for r in rows if r["state"] == "failed" and r.get(key) is not None]
        if failed:
            axis.scatter([x_of(r[key]) for r in failed], [top] * len(failed), marker="x", color="C3",
                         label="failed (infeasible)")
        if distribution.log and not distribution.categorical:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.set_title(f"{stage.name}: {metric} vs {key}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        path = stage.dir / f"objective_{key}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(6, 4))
    complete = [r for r in rows if r["state"] == "complete" and r[metric] is not None]
    if complete:
        axis.scatter([r["number"] for r in complete], [r[metric] for r in complete], color="C0", label="complete")
        best, line = None, []
        for r in sorted(complete, key=lambda r: r["number"]):
            v = r[metric]
            better = best is None or (v > best if stage.direction == "maximize" else v < best)
            best = v if better else best
            line.append((r["number"], best))
        axis.step([n for n, _ in line], [b for _, b in line], where="post", color="C2", label="best so far")
    pruned = [r for r in rows if r["state"] == "pruned" and r[metric] is not None]
    if pruned:
        axis.scatter([r["number"] for r in pruned], [r[metric] for r in pruned], facecolors="none", edgecolors="C1",
                     label="pruned")
    failed = [r for r in rows if r["state"] == "failed"]
    if failed:
        axis.scatter([r["number"] for r in failed], [top] * len(failed), marker="x", color="C3", label="failed")
    axis.set_xlabel("trial")
    axis.set_ylabel(metric)
    axis.set_title(f"{stage.name}: optimisation history")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(stage.dir / "history.png", dpi=100)
    plt.close(figure)
    written.append(stage.dir / "history.png")

    if len(stage.space) >= 2 and len(complete) >= 3:
        optuna = require_optuna()
        try:
            importances = optuna.importance.get_param_importances(study)
        except Exception:  # too few distinct values for the evaluator
            importances = {}
        if importances:
            figure, axis = plt.subplots(figsize=(6, 0.6 * len(importances) + 1.5))
            names = list(importances)[::-1]
            axis.barh(names, [importances[n] for n in names], color="C0")
            axis.set_xlabel("importance (fANOVA)")
            axis.set_title(f"{stage.name}: parameter importances for {metric}")
            figure.tight_layout()
            figure.savefig(stage.dir / "importances.png", dpi=100)
            plt.close(figure)
            written.append(stage.dir / "importances.png")
    return written


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
