"""``keel train [CONFIG] [key=value ...] [--out DIR] [--resume DIR]``: train a model, or continue a run.

The config file, the overrides and the options come in any order; the overrides apply in the order given, after the
file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from keel.errors import KeelError
from keel import rundir
from keel.config import describe_fields, merge, parse_config_text, parse_overrides, read_yaml, validate


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (default: a small GPT on CPython's documentation, a few minutes on a CPU)",
        description="Train a model. Config: defaults <- CONFIG (YAML) <- key=value overrides (dotted keys). "
        "The config file, the overrides and the options may come in any order.",
        epilog="config keys (key = default):\n" + "\n".join(describe_fields()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                        help="an optional YAML config file, then overrides such as model.n_layer=6")
    parser.add_argument("--out", metavar="DIR", help="run directory (overrides out_dir)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest intact checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    parser.set_defaults(run=run, mixed_items="items")


def run(args: argparse.Namespace) -> int:
    from keel.train import train

    files = [item for item in args.items if "=" not in item]
    if len(files) > 1:
        raise KeelError(f"'{files[1]}' is not key=value, and '{files[0]}' is the config file already; allowed: one "
                        "config file and key=value overrides, e.g. model.n_layer=6")
    path = files[0] if files else None
    items = [item for item in args.items if "=" in item]
    if args.resume:
        if args.out:
            raise KeelError(f"--out {args.out} with --resume {args.resume}: a resumed run stays in its directory; "
                            "allowed: one of the two")
        run_dir = Path(args.resume)
        text = rundir.read_run_config(run_dir, report=(lambda message: None) if args.quiet else print)
        raw = merge(parse_config_text(text, f"the config of run '{run_dir}'") if text is not None else {},
                    read_yaml(path) if path else {})
        config = validate(merge(raw, parse_overrides(items)))
        train(config, run_dir=run_dir, resume=True, quiet=args.quiet)
        return 0
    raw = merge(read_yaml(path) if path else {}, parse_overrides(items))
    if args.out:
        raw["out_dir"] = args.out  # --out wins over out_dir, and is validated with the rest
    train(validate(raw), quiet=args.quiet)
    return 0
