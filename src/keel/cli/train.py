"""``keel train [CONFIG] [key=value ...] [--out DIR] [--resume DIR]``: train a model, or continue a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from keel.errors import KeelError
from keel.config import describe_fields, load_config, merge, parse_overrides, read_yaml, validate


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (default: a small GPT on CPython's documentation, a few minutes on a CPU)",
        description="Train a model. Config: defaults <- CONFIG (YAML) <- key=value overrides (dotted keys).",
        epilog="config keys (key = default):\n" + "\n".join(describe_fields()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                        help="an optional YAML config file, then overrides such as model.n_layer=6")
    parser.add_argument("--out", metavar="DIR", help="run directory (overrides out_dir)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest intact checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from keel.train import train

    items = list(args.items)
    path = items.pop(0) if items and "=" not in items[0] else None
    if args.resume:
        if args.out:
            raise KeelError(f"--out {args.out} with --resume {args.resume}: a resumed run stays in its directory; "
                            "allowed: one of the two")
        run_dir = Path(args.resume)
        raw = merge(read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {},
                    read_yaml(path) if path else {})
        config = validate(merge(raw, parse_overrides(items)))
        train(config, run_dir=run_dir, resume=True, quiet=args.quiet)
        return 0
    config = load_config(path, items)
    if args.out:
        config.out_dir = args.out
    train(config, quiet=args.quiet)
    return 0
