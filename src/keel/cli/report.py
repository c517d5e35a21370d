"""``keel report RUN_DIR [RUN_DIR ...] [--out report.html]``: one static HTML page of one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write one static HTML page of runs: curves, gradient norms, update ratios, findings",
        description="Write one static HTML page (images embedded) comparing RUN_DIRs: loss curves with mean +- std "
                    "across seeds of one config, validation curves, LR, gradient norms, update ratios and the "
                    "findings of keel diagnose.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or keel diagnose --config outputs)")
    parser.add_argument("--out", default="report.html", metavar="FILE", help="the HTML file (default report.html)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from keel.diagnose.report import write_report

    path = write_report([Path(r) for r in args.runs], Path(args.out))
    print(f"wrote {path}")
    return 0
