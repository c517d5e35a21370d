"""``keel train [CONFIG] [key=value ...] [--out DIR] [--resume DIR] [--nproc N]``: train a model, or continue a run.

The config file, the overrides and the options come in any order; the overrides apply in the order given, after the
file. ``--nproc N`` launches N processes on this machine through torchrun's launcher (``keel.train.launch``); under
torchrun (``torchrun --nproc-per-node N -m keel train ...``) every process runs this command and they train
data-parallel (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keel import rundir
from keel.config import TrainConfig, describe_fields, merge, parse_config_text, parse_overrides, read_yaml, validate
from keel.errors import KeelError


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
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train data-parallel with N processes on this machine (torchrun's launcher; at most the "
                        "CPU cores, or the CUDA devices on a GPU machine)")
    parser.add_argument("--allow-world-size-change", action="store_true",
                        help="with --resume: continue a checkpoint written by another number of processes "
                        "(docs/distributed.md)")
    parser.set_defaults(run=run, mixed_items="items")


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """The run's config from the command line, and the directory to resume (None for a new run)."""
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
        return validate(merge(raw, parse_overrides(items))), run_dir
    if args.allow_world_size_change:
        raise KeelError("--allow-world-size-change goes with --resume; allowed: --resume DIR "
                        "--allow-world-size-change")
    raw = merge(read_yaml(path) if path else {}, parse_overrides(items))
    if args.out:
        raw["out_dir"] = args.out  # --out wins over out_dir, and is validated with the rest
    return validate(raw), None


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        from keel.train.launch import launch_from_command_line

        config, resume_dir = build_config(args)
        return launch_from_command_line(args, config, resume_dir)
    from keel import parent_process
    from keel.train import distributed, train
    from keel.train.loop import default_run_dir

    distributed.stop_with_launcher()  # a rank of keel train --nproc: stop if the launcher is killed
    config, resume_dir = build_config(args)
    # the run's directory, chosen here so the messages below can name it (several ranks: the trainer takes rank 0's)
    run_dir = resume_dir if resume_dir is not None else Path(config.out_dir or default_run_dir())
    try:
        train(config, run_dir=run_dir, resume=resume_dir is not None, quiet=args.quiet,
              allow_world_size_change=args.allow_world_size_change)
    except parent_process.ParentGone as gone:
        distributed.report_launcher_gone(gone.parent, run_dir)  # exits: see there
    except RuntimeError as error:  # a rank that lost the others (one died): one line, not a traceback
        if parent_process.gone_parent() is not None:  # another rank stopped first: the launcher is gone
            distributed.report_launcher_gone(parent_process.gone_parent(), run_dir)
        lost = distributed.lost_contact(error)
        if lost is None:
            raise
        code = distributed.LOST_CONTACT_EXIT
        if not distributed.report_failure(code, lost):
            print(f"keel train: {distributed.rank_prefix()}{lost}", file=sys.stderr)
        return code
    return 0
