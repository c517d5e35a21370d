"""The ``keel`` command: one thin module per subcommand, each over the layers below."""

from __future__ import annotations

import argparse
import importlib
import sys

from keel.errors import KeelError, TrainingUnstableError

# Each name is a module keel.cli.<name> with add_parser(subparsers) and run(args) -> int.
COMMANDS = ("train", "schedule", "average", "ensemble")


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
        return _fail(args.command, 1, f"{error}")
    except KeelError as error:
        return _fail(args.command, 2, f"error: {error}")
    except KeyboardInterrupt:
        print(f"keel {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, code: int, text: str) -> int:
    """Print the one line of a failure and return the exit code. A rank of a distributed run names itself, or,
    started by ``keel train --nproc``, hands the line to the launcher, which prints it once for the job."""
    text = text.replace("\n", " ")
    if command == "train":
        from keel.train import distributed

        if distributed.report_failure(code, text):
            return code
        text = distributed.rank_prefix() + text
    print(f"keel {command}: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
