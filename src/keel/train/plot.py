"""``loss.png``: train loss with a mean ± std band over a sliding window, the evaluations on validation data and on a
fixed training slice (over- and underfitting side by side), LR on a second axis, steps along the bottom and tokens
seen along the top (as counted by the trainer's clock); the sequence length of sequence-length warmup
(``seq_len``) as a thin line on a third axis. Events (e.g. skipped steps, rollbacks) are marked. Tasks
that report accuracy get a second panel with validation and training accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _rolling(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over a window centred on each point (shorter at the ends), so the band does
    not lag behind the curve."""
    kernel = np.ones(window)
    counts = np.convolve(np.ones_like(values), kernel, "same")
    mean = np.convolve(values, kernel, "same") / counts
    sq = np.convolve(values**2, kernel, "same") / counts
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def _tokens_axis(train: list[dict[str, Any]], clock: Any):
    """Step <-> tokens seen: interpolated from the counts logged before each step and the clock's at the end (a
    curriculum changes the tokens of a step)."""
    points = {(r["step"], r["tokens"]) for r in train if "tokens" in r}
    if clock is not None:
        points.add((clock.step, clock.tokens))
    points = sorted(points)
    if len(points) < 2 or any(b[1] <= a[1] for a, b in zip(points, points[1:])):
        rate = clock.tokens / clock.step if clock is not None and clock.step else 1.0
        return (lambda s: s * rate), (lambda t: t / rate)
    steps, tokens = map(np.asarray, zip(*points))
    slope = (tokens[-1] - tokens[0]) / max(steps[-1] - steps[0], 1)

    def to_tokens(s):
        s = np.asarray(s, dtype=float)
        return np.where(s <= steps[-1], np.interp(s, steps, tokens), tokens[-1] + (s - steps[-1]) * slope)

    def to_steps(t):
        t = np.asarray(t, dtype=float)
        return np.where(t <= tokens[-1], np.interp(t, tokens, steps), steps[-1] + (t - tokens[-1]) / slope)

    return to_tokens, to_steps


def plot_run(records: list[dict[str, Any]], path: Path, clock: Any = None, title: str = "",
             counted: str = "tokens") -> None:
    """Draw ``records`` (a run's metrics) into ``path``; ``clock`` (``step``, ``tokens``) is where the run ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    train = [r for r in records if "loss" in r and "step" in r and "event" not in r]
    evals = [r for r in records if "val_loss" in r]
    events = [r for r in records if "event" in r and "step" in r]
    accuracy_keys = sorted({k for r in evals for k in r if "accuracy" in k})
    if accuracy_keys:
        fig, (ax, acc_ax) = plt.subplots(2, 1, figsize=(9, 7.5), dpi=110, height_ratios=(2, 1), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    if train:
        steps = np.array([r["step"] for r in train], dtype=float)
        loss = np.array([r["loss"] for r in train], dtype=float)
        finite = np.isfinite(loss)
        steps, loss = steps[finite], loss[finite]
        window = max(1, min(50, len(loss) // 20 or 1))
        mean, std = _rolling(loss, window)
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.6, label="train loss")
        ax.plot(steps, mean, color="tab:blue", linewidth=1.4, label=f"train mean ({window}-step window)")
        ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.2, label="± 1 std")
    colors = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    for key in sorted({k for r in evals for k in r if k.startswith(("val_loss", "train_eval_loss"))}):
        points = [(r["step"], r[key]) for r in evals if key in r]
        style = "s--" if key.startswith("train_eval") else "o-"
        ax.plot(*zip(*points), style, color=next(colors, "black"), markersize=3.5, label=key.replace("_", " "))
    event_colors = {"skipped": "tab:orange", "spike": "tab:red", "rollback": "tab:purple", "stopped": "black"}
    for event in events:
        color = event_colors.get(event["event"], "tab:red")
        ax.axvline(event["step"], color=color, linestyle=":", linewidth=1)
        ax.annotate(event["event"], (event["step"], 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color=color)
        if np.isfinite(event.get("spike_loss", np.nan)):  # the spiking loss itself, kept out of the train curve
            ax.plot(event["step"], event["spike_loss"], "x", color=color, markersize=6)
    if accuracy_keys:
        acc_colors = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
        for key in accuracy_keys:
            points = [(r["step"], r[key]) for r in evals if key in r]
            style = "s--" if key.startswith("train_eval") else "o-"
            acc_ax.plot(*zip(*points), style, color=next(acc_colors, "black"), markersize=3.5,
                        label=key.replace("_", " "))
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_xlabel("step (optimizer updates)")
        acc_ax.grid(alpha=0.3)
        acc_ax.legend(loc="lower right", fontsize=8)
    else:
        ax.set_xlabel("step (optimizer updates)")
    ax.set_ylabel("loss (nats per target)")
    ax.grid(alpha=0.3)
    to_tokens, to_steps = _tokens_axis(train, clock)
    top = ax.secondary_xaxis("top", functions=(to_tokens, to_steps))
    top.set_xlabel(f"{counted} seen")
    handles, labels = ax.get_legend_handles_labels()
    if train and "lr" in train[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray", linewidth=1, label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lr_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1e"))
        h2, l2 = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    lengths = [(r["step"], r["seq_len"]) for r in train if "seq_len" in r]
    if lengths:  # sequence-length warmup: the length trained on, a thin step line on a third axis
        len_ax = ax.twinx()
        len_ax.spines["right"].set_position(("axes", 1.16))
        len_ax.step(*zip(*lengths), where="post", color="tab:olive", linewidth=0.9, label="seq_len")
        len_ax.set_ylabel("sequence length", color="tab:olive")
        len_ax.set_ylim(0, max(n for _, n in lengths) * 1.05)
        h3, l3 = len_ax.get_legend_handles_labels()
        handles, labels = handles + h3, labels + l3
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
