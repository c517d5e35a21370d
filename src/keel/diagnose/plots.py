"""The figures of ``keel report`` (and ``keel diagnose``), each returned as PNG bytes.

Runs that share a config except for the seed are one group: their curves are drawn as mean ± one standard
deviation across the seeds, on the steps all of them logged.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from keel.diagnose.update_ratio import HEALTHY_RATIO

#: Values beyond this magnitude are not drawn: matplotlib's axis arithmetic overflows near the end of the float
#: range (a diverged run logs losses or gradient norms of 1e308), and nothing is read off a curve up there.
PLOT_LIMIT = 1e100

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "tab:gray"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # legends below the axes are kept
    plt.close(fig)
    return buffer.getvalue()


def plottable(values) -> np.ndarray:
    """``values`` as floats, with those beyond ``PLOT_LIMIT`` (and non-numbers) made NaN, which no figure draws."""
    array = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(array) <= PLOT_LIMIT, array, np.nan)


def smooth(values: list[float], window: int) -> np.ndarray:
    """Centred moving mean (shorter at the ends), non-finite values skipped."""
    array = np.asarray(values, dtype=float)
    if window <= 1 or len(array) < 3:
        return array
    mask = np.isfinite(array)
    kernel = np.ones(window)
    sums = np.convolve(np.where(mask, array, 0.0), kernel, "same")
    counts = np.convolve(mask.astype(float), kernel, "same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def band(series: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation across runs on the steps every run logged (steps, mean, std)."""
    common = set(series[0][0])
    for steps, _ in series[1:]:
        common &= set(steps)
    grid = np.array(sorted(common))
    stacked = []
    for steps, values in series:
        lookup = dict(zip(steps, values))
        stacked.append([lookup[s] for s in grid])
    stacked = np.asarray(stacked, dtype=float)
    return grid, np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0)


def curves_figure(groups: list[dict[str, Any]], key: str, title: str, ylabel: str, log_y: bool = False) -> bytes:
    """One line per run (or a mean ± std band per multi-seed group) of series ``key`` ('train', 'val', 'lr')."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    drawn = False
    firsts: list[float] = []
    lows: list[float] = []
    highs: list[float] = []
    for index, group in enumerate(groups):
        color = COLORS[index % len(COLORS)]
        series = [(steps, list(plottable(values))) for steps, values in (run[key] for run in group["runs"]) if steps]
        if not series:
            continue
        drawn = True
        for _, values in series:
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                firsts.append(finite[0])
                lows.append(min(finite))
                highs.append(max(finite))
        marker = "o" if key == "val" else None
        if len(series) > 1:
            steps, mean, std = band(series)
            if len(steps):
                ax.plot(steps, mean, color=color, marker=marker, markersize=3,
                        label=f"{group['label']} (mean of {len(series)} seeds)")
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, label="± 1 std")
                continue
        for steps, values in series:
            ax.plot(steps, values, color=color, marker=marker, markersize=3, label=group["label"])
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if log_y and drawn:
        if any(high > 0 for high in highs):  # a log axis needs a value above 0 (not a run of NaNs alone)
            ax.set_yscale("log")
    elif firsts and lows:  # a diverged run must not flatten the others: clip at 1.3x the highest starting value
        low, high = min(lows), min(max(firsts), 3 * min(firsts)) * 1.3
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step (optimizer updates)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        _dedupe_legend(ax)
    return _png(fig)


def grad_norm_figure(steps: list[int], norms: list[float], clipped: list[bool], p90: float,
                     threshold: float | None, title: str) -> bytes:
    """Unclipped gradient norm against step (clipped updates marked) and its histogram over all steps, with the
    90th percentile (the Playbook's clip threshold) and the run's own threshold."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=(2, 1))
    values = plottable(norms)
    ok = np.isfinite(values)
    steps_array = np.asarray(steps)
    left.plot(steps_array[ok], values[ok], color="tab:blue", linewidth=0.7, label="unclipped norm")
    hits = np.asarray(clipped, dtype=bool) & ok
    if hits.any():
        left.plot(steps_array[hits], values[hits], ".", color="tab:red", markersize=2.5, label="clipped")
    if not abs(p90) <= PLOT_LIMIT:
        p90 = math.nan
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not abs(threshold) <= PLOT_LIMIT:
        threshold = None  # not a number (a config edited by hand), or too large to draw
    for ax in (left, right):
        if math.isfinite(p90):
            (ax.axhline if ax is left else ax.axvline)(p90, color="tab:green", linestyle="--", linewidth=1,
                                                        label=f"90th percentile {p90:.3g}")
        if threshold is not None:
            (ax.axhline if ax is left else ax.axvline)(threshold, color="tab:red", linestyle=":", linewidth=1,
                                                        label=f"clip threshold {threshold:g}")
    if ok.any() and values[ok].min() > 0:
        import matplotlib.ticker

        left.set_yscale("log")
        bins = np.logspace(np.log10(values[ok].min()), np.log10(values[ok].max() * 1.0001), 40)
        right.set_xscale("log")
        for axis in (left.yaxis, right.xaxis):
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        bins = 40
    right.hist(values[ok], bins=bins, color="tab:blue", alpha=0.7)
    left.set_xlabel("step")
    left.set_ylabel("gradient norm")
    right.set_xlabel("gradient norm")
    right.set_ylabel("updates")
    left.set_title(f"{title}: gradient norm", fontsize=10)
    right.set_title("histogram over all steps", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper right")
    return _png(fig)


def update_ratio_figure(records: list[dict[str, Any]], title: str) -> bytes:
    """||ΔW||/||W|| per weight against step (log scale), the healthy band shaded around 1e-3."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = list(dict.fromkeys(name for r in records for name in r["ratios"]))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        points = [(r["step"], r["ratios"][name]) for r in records
                  if name in r["ratios"] and 0 < r["ratios"][name] <= PLOT_LIMIT]
        if points:
            steps, values = zip(*points)
            window = max(1, len(values) // 30)
            ax.plot(steps, smooth(list(values), window), color=cmap(i / max(1, len(names) - 1)), linewidth=1,
                    label=name)
    low, high = HEALTHY_RATIO
    ax.axhspan(low, high, color="tab:green", alpha=0.08, label=f"healthy band {low:g}-{high:g}")
    ax.axhline(1e-3, color="tab:green", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||ΔW|| / ||W||")
    ax.set_title(f"{title}: update-to-weight ratio per weight", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    return _png(fig)


def sweep_figure(sweep: dict[str, Any], config_lr: float | None = None) -> bytes:
    """Validation loss against LR (log scale); infeasible runs (NaN, blow-up) as crosses at the top: the Tuning
    Playbook's Figure 7a."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    points = sweep.get("points", [])
    feasible = [(p["lr"], p["val_loss"]) for p in points
                if p["status"] not in ("infeasible", "truncated") and math.isfinite(p["val_loss"])]
    infeasible = [p["lr"] for p in points if p["status"] == "infeasible" or not math.isfinite(p["val_loss"])]
    truncated = [(p["lr"], p["val_loss"]) for p in points
                 if p["status"] == "truncated" and math.isfinite(p["val_loss"])]
    if feasible:
        lrs, losses = zip(*feasible)
        ax.plot(lrs, losses, "o-", color="tab:blue", label="feasible")
        top = max(losses)
    else:
        top = 1.0
    if truncated:
        ax.plot(*zip(*truncated), "o", markerfacecolor="none", color="tab:gray",
                label="stopped by the budget (not compared)")
    if infeasible:
        ax.plot(infeasible, [top * 1.05] * len(infeasible), "x", color="tab:red", markersize=9,
                label="infeasible (NaN or blow-up)")
    if sweep.get("lr_star"):
        ax.axvline(sweep["lr_star"], color="tab:green", linestyle="--", label=f"lr* {sweep['lr_star']:.2e}")
        ax.axvspan(sweep["lr_low"], sweep["lr_high"], color="tab:green", alpha=0.1)
    if config_lr:
        ax.axvline(config_lr, color="tab:gray", linestyle=":", label=f"your LR {config_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation loss after {sweep.get('steps', '?')} steps")
    ax.set_title("LR sweep (Playbook Figure 7a)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def range_figure(data: dict[str, Any]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(data["lrs"], data["losses"], color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(data["lrs"], data["smoothed"], color="tab:blue", label="smoothed")
    ax.axvline(data["steepest_lr"], color="tab:green", linestyle="--", label=f"steepest {data['steepest_lr']:.2e}")
    ax.axvline(data["min_lr"], color="tab:orange", linestyle=":", label=f"lowest {data['min_lr']:.2e}")
    ax.set_xscale("log")
    finite = [v for v in data["smoothed"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, max(finite[0] * 1.2, min(finite) * 1.5))
    ax.set_xlabel("learning rate (rising exponentially)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def probe_curves_figure(curves: list[tuple[str, list[int], list[float]]], title: str) -> bytes:
    """Training (or per-step validation) losses of several probes against step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    top = 0.0
    for index, (label, steps, losses) in enumerate(curves):
        values = plottable(losses)
        ok = np.isfinite(values)
        if ok.any():
            top = max(top, float(values[ok][0]) * 1.6)
        ax.plot(np.asarray(steps)[ok], values[ok], color=COLORS[index % len(COLORS)], linewidth=1, label=label)
    if top > 0:
        ax.set_ylim(top=top)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _dedupe_legend(ax) -> None:
    """One legend entry per label, below the axes (run labels can be long)."""
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for handle, label in zip(handles, labels):
        seen.setdefault(label, handle)
    ax.legend(list(seen.values()), list(seen), fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16),
              frameon=False)
