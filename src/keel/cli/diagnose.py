"""``keel diagnose RUN_DIR`` or ``keel diagnose --config CONFIG [key=value ...] [--budget 15m] [--out DIR]
[--schedule constant]``.

The first reads a finished or running run; the second runs the active procedures (sanity checks, LR range test
and sweep, instability probe, warmup search) as short trainings. Both print the findings, each with its evidence
and a recommendation, and write ``diagnosis.json`` and ``recommended.yaml`` (into RUN_DIR, or OUT).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from keel.errors import KeelError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="diagnose a run (learning curves, gradient norms, update ratios, instability) or a config (sanity "
             "checks, LR sweep, instability probe, warmup search)",
        description="keel diagnose RUN_DIR: read a run (keel's, a Lightning log directory, or a Hugging Face "
                    "trainer_state.json or output directory) and report findings with their evidence. keel diagnose "
                    "--config CONFIG [key=value ...]: run the Tuning Playbook's procedures on a config as short "
                    "trainings within --budget. Both write diagnosis.json and recommended.yaml.",
    )
    parser.add_argument("items", nargs="*", metavar="RUN_DIR | key=value",
                        help="a run directory; with --config, overrides such as optimizer.lr=1e-3")
    parser.add_argument("--config", metavar="CONFIG", help="diagnose this config (YAML) by short trainings")
    parser.add_argument("--budget", default=None, metavar="TIME",
                        help="time budget of --config: seconds or '90s', '15m', '1h' (default 15m)")
    parser.add_argument("--out", metavar="DIR", help="output directory of --config (default runs/diagnose-<time>)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads of --config's probes when the config sets none (default 1; 0: torch's "
                             "default)")
    parser.add_argument("--schedule", choices=["config", "constant"], default=None,
                        help="LR schedule of --config's runs: config (default: your schedule) or constant (a "
                             "constant LR after your warmup, in recommended.yaml too: the notes' 'start with a "
                             "constant LR, tune the schedule last')")
    parser.add_argument("--quiet", action="store_true", help="print only the findings")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _run_config(args)
    if args.budget is not None or args.out is not None or args.schedule is not None:
        raise KeelError("--budget, --out and --schedule go with --config; allowed: keel diagnose RUN_DIR, or keel "
                        "diagnose --config CONFIG [--budget TIME] [--out DIR] [--schedule constant]")
    if len(args.items) != 1 or "=" in args.items[0]:
        raise KeelError(f"keel diagnose takes one RUN_DIR (got {len(args.items)} arguments); allowed: keel diagnose "
                        "RUN_DIR, or keel diagnose --config CONFIG [key=value ...]")
    return _run_dir(Path(args.items[0]), quiet=args.quiet)


def _run_dir(run_dir: Path, quiet: bool) -> int:
    from keel.diagnose.findings import RECOMMENDED, write_recommended
    from keel.diagnose.run import diagnose_run, load_run, write_plots

    diagnosis, raw = diagnose_run(run_dir, report=lambda m: None if quiet else print(m))
    source, run_dir = run_dir, run_dir if run_dir.is_dir() else run_dir.parent  # a trainer_state.json: beside it
    path = diagnosis.write(run_dir)
    written = [path.name]
    records, _ = load_run(source)
    written += [p.name for p in write_plots(run_dir, records, raw)]
    if raw is not None:
        try:
            write_recommended(run_dir, raw, diagnosis.changes, str(run_dir))
            written.append(RECOMMENDED)
        except KeelError as error:
            print(f"{RECOMMENDED} not written: {error}")
    print_findings(diagnosis)
    print(f"wrote {', '.join(str(run_dir / name) for name in written)}")
    return _finish(diagnosis)


def _run_config(args: argparse.Namespace) -> int:
    from keel.config import merge, parse_overrides, read_yaml
    from keel.diagnose.active import DEFAULT_BUDGET, diagnose_config, parse_budget
    from keel.diagnose.findings import DIAGNOSIS, RECOMMENDED
    from keel.diagnose.probes import Display

    budget = parse_budget(args.budget if args.budget is not None else DEFAULT_BUDGET)
    raw = merge(read_yaml(args.config), parse_overrides(list(args.items)))
    out = Path(args.out) if args.out else Path("runs") / f"diagnose-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeelError(f"--out '{out}' exists and is not empty; allowed: a new or empty directory")
    display = Display(enabled=not args.quiet)
    display.line(f"keel diagnose --config {args.config}: budget {budget:.0f} s, output {out}")
    if args.threads < 0:
        raise KeelError(f"--threads: {args.threads}; allowed: 0 (torch's default) or a count >= 1")
    session = diagnose_config(raw, out, budget, target=str(args.config), display=display,
                              threads=args.threads or None, schedule=args.schedule or "config")
    diagnosis = session.diagnosis
    print_findings(diagnosis)
    total = sum(diagnosis.timings.values())
    print("where the time went:")
    for name, seconds in diagnosis.timings.items():
        print(f"  {name:<20} {seconds:8.1f} s  {seconds / max(total, 1e-9):6.1%}")
    print(f"  {'total':<20} {total:8.1f} s  (budget {budget:.0f} s)")
    extra = ", lr_sweep.png" if (out / "lr_sweep.png").is_file() else ""
    print(f"wrote {out / DIAGNOSIS}, {out / RECOMMENDED}{extra}, probe runs in {out / 'probes'}")
    return _finish(diagnosis)


def print_findings(diagnosis, stream=None) -> None:
    stream = stream or sys.stdout
    order = {"error": 0, "warning": 1, "info": 2}
    for finding in sorted(diagnosis.findings, key=lambda f: order[f.severity]):
        print(f"[{finding.severity}] {finding.kind}: {finding.message}", file=stream)
        print(f"    evidence: {finding.evidence_text()}", file=stream)
        print(f"    recommendation: {finding.recommendation}", file=stream)
    for skipped in diagnosis.skipped:
        print(f"[skipped] {skipped.line()}", file=stream)


def _finish(diagnosis) -> int:
    """Exit 2 (one line) when a procedure could not run because the run or the budget is too small."""
    short = [s for s in diagnosis.skipped if s.bad_input]
    if short:
        first = short[0]
        more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        raise KeelError(f"partial diagnosis written: {first.procedure} could not run: {first.reason}; needs "
                        f"{first.minimum}{more}")
    return 0
