"""The ``keel`` command: one thin module per subcommand, each over the layers below."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

from keel.errors import KeelError, TrainingUnstableError

# Each name is a module keel.cli.<name> with add_parser(subparsers) and run(args) -> int. A command whose parser
# sets the default ``mixed_items`` to the name of its list of positional items takes them in any order with its
# options (``keel train CONFIG --out DIR key=value``): what argparse leaves over joins that list, in order.
COMMANDS = ("train", "schedule", "average", "ensemble", "diagnose", "report", "sweep")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, reporting a usage error in one line (``keel train: error: ...``) with exit code 2."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="keel", description="Train, preview schedules, average weights, diagnose and tune PyTorch models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"keel.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, left_over = parser.parse_known_args(argv)
    mixed = getattr(args, "mixed_items", None)
    unknown = [item for item in left_over if mixed is None or item.startswith("-")]
    if unknown:
        prog = f"{parser.prog} {args.command}"
        OneLineParser(prog=prog).error(f"unrecognized arguments: {' '.join(unknown)}")
    if left_over:
        getattr(args, mixed).extend(left_over)
    try:
        return int(args.run(args) or 0)
    except TrainingUnstableError as error:  # the run diverged: not bad input, so not exit code 2
        return _fail(args.command, 1, f"{error}")
    except KeelError as error:
        return _fail(args.command, 2, f"error: {error}")
    except BrokenPipeError as error:
        if error.filename is not None:
            return _fail(args.command, 2, f"error: {describe_os_error(error)}")
        # whoever read the output stopped reading (`keel schedule | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as error:  # the machine refused (a full disk, a read-only or vanished directory): one line too
        return _fail(args.command, 2, f"error: {describe_os_error(error)}")
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


def describe_os_error(error: OSError) -> str:
    """``No space left on device (ENOSPC): 'runs/x/metrics.jsonl'``: what failed, on which file, in one line."""
    name = errno.errorcode.get(error.errno or 0)
    what = f"{error.strerror or error}" + (f" ({name})" if name else "")
    files = [repr(str(f)) for f in (error.filename, error.filename2) if f is not None]
    return f"{what}: {' -> '.join(files)}" if files else what


if __name__ == "__main__":
    sys.exit(main())
