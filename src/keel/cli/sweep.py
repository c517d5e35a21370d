"""``keel sweep CONFIG [key=value ...] [--preset coarse-to-fine|restarts] [--trials N] [--workers K]
[--storage URL] [--study NAME] [--resume DIR] [--out DIR]``: hyperparameter search on Optuna (docs/sweep.md).

The options of ``sweep_options:`` (``keel.sweep.space.SweepOptions``) are derived into flags (``--trials``,
``--workers``, ``--sampler``, ``--pruner``, ``--metric``, ``--seeds``, ``--budget`` ...); a flag wins over the
config's block.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Literal

from keel.errors import KeelError

_FLAGS_OF_THE_COMMAND = ("preset", "storage", "study", "resume", "out")


def add_parser(subparsers) -> None:
    from keel.sweep.space import SweepOptions

    parser = subparsers.add_parser(
        "sweep",
        help="search hyperparameters (the config's sweep: block) or run a preset, on Optuna",
        description="Search hyperparameters: every trial is a keel train run of CONFIG with sampled values. "
        "Config: defaults <- CONFIG (YAML, with a sweep: block) <- key=value overrides. See docs/sweep.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  keel sweep my.yaml 'sweep.optimizer.lr=loguniform(1e-4, 1e-1)' --trials 20 --workers 2\n"
        "  keel sweep my.yaml --preset coarse-to-fine\n  keel sweep my.yaml --preset restarts --seeds 8\n"
        "  keel sweep my.yaml --storage postgresql://user@db:5432/keel --study lm-lr   (on each machine)",
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]",
                        help="the YAML config (with a sweep: block unless --preset), then overrides")
    parser.add_argument("--preset", choices=["coarse-to-fine", "restarts"],
                        help="coarse-to-fine: LR decades, LR x weight decay grid, refined search, the best trained "
                        "longer without decay; restarts: --seeds N seeds for --budget steps, the best continues")
    parser.add_argument("--storage", metavar="URL", help="Optuna database (default: SQLite study.db in the sweep "
                        "directory); postgresql://user:password@host:port/db for workers on many machines")
    parser.add_argument("--study", metavar="NAME", help="study name (default: the sweep directory's name); machines "
                        "sharing --storage and --study share the trials")
    parser.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR (after a crash, or with more "
                        "--trials)")
    parser.add_argument("--out", metavar="DIR", help="sweep directory (default: sweeps/<date>-<time>)")
    for name, field in SweepOptions.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"option_{name}", metavar=_metavar(field.annotation),
                            type=_parser_type(field.annotation), choices=_choices(field.annotation),
                            help=f"{field.description} (sweep_options.{name}; default {field.default!r})"
                            .replace("%", "%%"))
    parser.set_defaults(run=run, mixed_items="items")  # overrides may follow the options, as in keel train


def _plain(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices(annotation: Any) -> list[str] | None:
    for part in _plain(annotation):
        if typing.get_origin(part) is Literal:
            return list(typing.get_args(part))
    return None


def _parser_type(annotation: Any):
    parts = _plain(annotation)
    if parts == [int]:
        return int
    if parts == [float]:
        return float
    if int in parts and str in parts:
        return lambda text: int(text) if text.isdigit() else text
    return str


def _metavar(annotation: Any) -> str | None:
    if _choices(annotation):
        return None
    return {int: "N", float: "X"}.get(_parser_type(annotation), "VALUE")


def run(args: argparse.Namespace) -> int:
    from keel.config import merge, parse_overrides, read_yaml
    from keel.sweep import runner

    options = {key.removeprefix("option_"): value for key, value in vars(args).items()
               if key.startswith("option_") and value is not None}
    items = list(args.items)
    path = items.pop(0) if items and "=" not in items[0] else None

    def say(line: str) -> None:
        print(line, flush=True)

    if args.resume:
        if path or items or args.preset or args.out or args.storage or args.study:
            raise KeelError(f"--resume {args.resume}: the sweep's config, preset, storage and study are in its "
                            "sweep.yaml; allowed with --resume: --trials, --workers and other sweep options")
        root, spec = runner.load_sweep(args.resume, options)
        say(f"resuming the sweep in {root}")
    else:
        if path is None:
            raise KeelError("keel sweep: no CONFIG given; allowed: keel sweep CONFIG [key=value ...] or "
                            "keel sweep --resume DIR")
        raw = merge(read_yaml(path), parse_overrides(items))
        root, spec = runner.new_sweep(raw, options, args.preset, args.out, args.storage, args.study)
    runner.run(root, spec, say)
    return 0

