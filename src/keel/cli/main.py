"""The ``keel`` command: one thin module per subcommand, each over the layers below."""

from __future__ import annotations

import argparse
import importlib
import sys

from keel.errors import KeelError, TrainingUnstableError

# Each name is a module keel.cli.<name> with add_parser(subparsers) and run(args) -> int.
COMMANDS = ("train", "schedule", "average", "ensemble", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel", description="Train, preview schedules, average weights, diagnose and tune PyTorch models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"keel.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TrainingUnstableError as error:  # the run diverged: not bad input, so not exit code 2
        print(f"keel {args.command}: {error}".replace("\n", " "), file=sys.stderr)
        return 1
    except KeelError as error:
        print(f"keel {args.command}: error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"keel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
