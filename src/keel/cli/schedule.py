"""``keel schedule [SPEC ...] --steps N [--lr LR] [--at STEPS] [--out PNG]``: preview learning-rate schedules.

Prints the learning rate of each schedule at chosen steps and draws them overlaid on one plot,
without training anything. A SPEC is one of:

* ``NAME,KEY=VALUE,...`` such as ``cosine,warmup=100,min_lr=1e-5`` or ``wsd,warmup=5%,decay=20%``
  (values are YAML scalars or flow lists: ``multistep,milestones=[300,600]``);
* a YAML mapping such as ``"{name: join, schedules: [constant, cosine], boundaries: [10%]}"``;
* a YAML file holding such a mapping, or a run config file (its ``schedule``, ``optimizer.lr``
  and run length are used unless ``--lr`` / ``--steps`` are given; its batch size and lengths in
  epochs, tokens and examples resolve as the trainer resolves them for one process, from the task's
  counts; the LR shown is before ``lr_scaling``'s factor).

With no SPEC the schedule of the default run config is shown. Keys and time units are those of the
``schedule`` block of the run config (docs/schedules.md); for a SPEC, ``--tokens-per-step``,
``--examples-per-step`` and ``--steps-per-epoch`` say what a step counts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from keel.errors import KeelError
from keel.schedules import from_config, parse_spec
from keel.timeunits import SYNTAX, Time, Timeline

_PLOT_POINTS = 4000  # at most this many steps are drawn per curve (plus every step in --at)
#: The options that say what a step of a SPEC counts: (option, the unit it is for, an example length).
_RATES = (("--steps-per-epoch", "epoch", "'3ep'"), ("--tokens-per-step", "token", "'2Mtok'"),
          ("--examples-per-step", "example", "'50kex'"))


@dataclass
class _Curve:
    label: str
    spec: Any
    lr: float | None
    steps: int | None
    timeline: Timeline | None = None  # a run config's


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="print and plot learning-rate schedules without training",
        description=__doc__.split("\n", 1)[1].strip().replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: keel schedule cosine,warmup=100,min_lr=1e-5 wsd,warmup=5%,decay=20% "
        "--lr 3e-4 --steps 1000 --at 0,100,500,999 --out schedules.png",
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="schedule specs (see above); default: the run config")
    parser.add_argument(
        "--lr", type=float, metavar="LR", help="peak LR for specs that do not set lr (default: 1.0, or the run config's optimizer.lr)"
    )
    parser.add_argument(
        "--steps", type=int, metavar="N", help="run length in optimizer steps (default: the run config's max_steps)"
    )
    parser.add_argument(
        "--at",
        metavar="STEPS",
        help=f"comma-separated steps to print, each {SYNTAX.replace('%', '%%')} (default: a spread over the run)",
    )
    parser.add_argument("--out", metavar="PNG", default="schedule.png", help="PNG to write (default: schedule.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--log", action="store_true", help="logarithmic LR axis")
    for option, unit, example in _RATES:
        parser.add_argument(option, type=float, metavar="N", help=f"for lengths in {unit}s ({example}) of a SPEC "
                            "(a number > 0)")
    parser.add_argument("--title", help="plot title")
    parser.add_argument("--dpi", type=int, metavar="N", default=100, help="plot resolution in dots per inch (default: 100)")


def _curves(args: argparse.Namespace) -> list[_Curve]:
    if not args.specs:
        return [_from_run_config(None, "default run config")]
    curves = []
    for text in args.specs:
        path = Path(text)
        if path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                first_line = str(error).splitlines()[0]
                raise KeelError(f"schedule spec file '{text}' is not valid YAML ({first_line})") from None
            if isinstance(data, dict) and "name" in data:
                curves.append(_Curve(path.name, data, None, None))
            else:
                curves.append(_from_run_config(path, path.name))
        else:
            curves.append(_Curve(text, parse_spec(text), None, None))
    return curves


def _from_run_config(path: Path | None, label: str) -> _Curve:
    """The schedule of a run config, with the trainer's timeline (its task built, its techniques' projections)."""
    from keel import tasks
    from keel.config import load_config
    from keel.techniques import make_callbacks
    from keel.train import distributed
    from keel.train.loop import run_timeline

    config = distributed.resolve_for_world(load_config(path), 1)  # as the trainer resolves it for one process
    timeline = run_timeline(config, tasks.from_config(config), make_callbacks(config))
    return _Curve(label, config.schedule, float(config.optimizer.lr), timeline.total_steps, timeline)


def _default_at(total: int) -> list[int]:
    points = {0, 1, total // 100, total // 20, total // 10, total // 4, total // 2, 3 * total // 4}
    points |= {9 * total // 10, total - 1, total}
    return sorted(p for p in points if 0 <= p <= total)


def _format(value: float) -> str:
    return f"{value:.6g}"


def run(args: argparse.Namespace) -> int:
    if args.lr is not None and args.lr <= 0:
        raise KeelError(f"--lr: {args.lr!r} is not allowed; must be > 0")
    if args.steps is not None and args.steps < 1:
        raise KeelError(f"--steps: {args.steps!r} is not allowed; must be >= 1")
    if args.dpi < 10:
        raise KeelError(f"--dpi: {args.dpi!r} is not allowed; must be >= 10")
    for option, _, _ in _RATES:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None and not (math.isfinite(value) and value > 0):
            raise KeelError(f"{option}: {value!r} is not allowed; must be a finite number > 0")
    if not args.no_plot and not Path(args.out).resolve().parent.is_dir():
        raise KeelError(f"--out: the directory of '{args.out}' does not exist")
    if not args.no_plot:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(args.out).suffix.lower().lstrip(".") not in kinds:
            raise KeelError(f"--out: '{args.out}' does not name an image file; allowed: a name ending in .png (or "
                            f".{', .'.join(sorted(k for k in kinds if k != 'png'))})")
    curves = _curves(args)
    for curve in curves:
        if args.lr is not None:
            curve.lr = args.lr
        if args.steps is not None:
            curve.steps = args.steps
        if curve.lr is None:
            curve.lr = 1.0
    known = [c.steps for c in curves if c.steps is not None]
    if not known:
        raise KeelError("--steps: missing; give the run length in optimizer steps, e.g. --steps 1000")
    total = max(known)
    for curve in curves:  # a spec next to a run config gets the run config's length
        curve.steps = curve.steps or total

    def timeline(curve: _Curve | None, steps: int) -> Timeline:
        if curve is not None and curve.timeline is not None:
            return curve.timeline.with_duration(Time.steps(steps))
        return Timeline.at_rate(steps, examples_per_step=args.examples_per_step,
                                tokens_per_step=args.tokens_per_step, steps_per_epoch=args.steps_per_epoch,
                                given_by={unit: option for option, unit, _ in _RATES})

    schedules = []
    for i, curve in enumerate(curves):
        key = "schedule" if len(curves) == 1 else f"schedule[{i + 1}]"
        schedules.append(from_config(curve.spec, base_lr=curve.lr, timeline=timeline(curve, curve.steps), key=key))

    if args.at:
        at_timeline = timeline(next((c for c in curves if c.steps == total), None), total)
        at = [at_timeline.steps(part.strip(), "--at") for part in args.at.split(",") if part.strip()]
    else:
        at = _default_at(total)

    table = [[str(step), *(_format(s(step)) for s in schedules)] for step in at]
    header = ["step", *(c.label for c in curves)]
    widths = [max(len(row[j]) for row in [header, *table]) for j in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip())

    if not args.no_plot:
        _plot(curves, schedules, total, at, args)
        print(f"wrote {args.out}")
    return 0


def _plot(curves: list[_Curve], schedules: list, total: int, at: list[int], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stride = max(1, total // _PLOT_POINTS)
    steps = sorted(set(range(0, total + 1, stride)) | {total} | {s for s in at if s <= total})
    # The legend goes under the plot, one line per curve, so that long specs never hide a curve.
    figure, axes = plt.subplots(figsize=(8, 4.2 + 0.22 * len(curves)), dpi=args.dpi, layout="constrained")
    for curve, schedule in zip(curves, schedules):
        label = curve.label + (" (before any reduction)" if hasattr(schedule, "observe") else "")
        line = axes.plot(steps, [schedule(s) for s in steps], label=label, linewidth=1.6)[0]
        marks = [s for s in at if s <= total]
        axes.plot(marks, [schedule(s) for s in marks], "o", markersize=3.5, color=line.get_color())
    if args.log:
        axes.set_yscale("log")
    axes.set_xlabel("step (optimizer updates applied)")
    axes.set_ylabel("learning rate")
    axes.set_xlim(0, total)
    axes.grid(True, alpha=0.3)
    figure.legend(fontsize=8, loc="outside lower center", ncols=1, frameon=False)
    if args.title:
        axes.set_title(args.title)
    figure.savefig(args.out)
    plt.close(figure)
