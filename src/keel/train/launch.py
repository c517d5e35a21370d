"""``keel train --nproc N``: N processes on this machine, started by torchrun's own launcher.

The command checks what it can before any process starts (the config, N against the cores or CUDA devices, the
global batch against N, the strategy, the run directory, the world size of the checkpoint to resume), so bad
input is one line and exit code 2 with nothing started. Then it runs ``torch.distributed.run`` (torchrun) in this
process as the agent of a standalone rendezvous, which starts ``python -m keel train ...`` once per rank with RANK,
WORLD_SIZE and LOCAL_RANK set, watches them, and stops them all when one fails. torchrun's failure record (which
rank, which exit code or signal) comes back as an exception here, so the job's end is reported in one line naming
the rank, with the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from keel import rundir
from keel.errors import KeelError
from keel.train import distributed


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def launch_from_command_line(args: argparse.Namespace, config: Any, resume_dir: Path | None) -> int:
    """``keel train ... --nproc N``: check, then run N ranks of ``keel train ...``; the job's exit code. ``config``
    and ``resume_dir`` are what the command line resolved to (``keel.cli.train.build_config``)."""
    import torch

    from keel.train.loop import default_run_dir, resolve_device

    if distributed.launched():
        raise KeelError("--nproc: this process already runs under torchrun (RANK and WORLD_SIZE are set); allowed: "
                        "--nproc without torchrun, or torchrun without --nproc")
    nproc = args.nproc
    device = resolve_device(config.device)
    if device.type == "cuda":
        limit, what = torch.cuda.device_count(), "CUDA devices"
    else:
        limit, what = available_cores(), "CPU cores"
    if not 1 <= nproc <= limit:
        raise KeelError(f"--nproc: {nproc} process{'es' if nproc != 1 else ''} on a machine with {limit} {what}; "
                        f"allowed: 1 to {limit} (one process per {what.rstrip('s')}; more machines: torchrun "
                        "--nnodes, see docs/distributed.md)")
    distributed.resolve_for_world(config, nproc)  # the global batch divides into the ranks
    distributed.check_strategy(config, device, nproc)
    worker = ["-m", "keel", "train", *args.items]
    if resume_dir is not None:
        check_resume_world_size(resume_dir, nproc, args.allow_world_size_change)
        run_dir = resume_dir
        worker += ["--resume", str(run_dir)]
    else:
        run_dir = Path(config.out_dir or default_run_dir())
        rundir.check_new_run_dir(run_dir)
        worker += ["--out", str(run_dir)]
    if args.quiet:
        worker.append("--quiet")
    if args.allow_world_size_change:
        worker.append("--allow-world-size-change")
    threads = config.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, available_cores() // nproc)
    return run_torchrun(nproc, worker, run_dir, threads)


def check_resume_world_size(run_dir: Path, nproc: int, allow: bool) -> None:
    """Refuse, before starting, to resume a checkpoint written by another number of processes (unless allowed).
    The newest checkpoint's manifest records its world size (none recorded: one process)."""
    checkpoints = rundir.list_checkpoints(Path(run_dir) / rundir.CHECKPOINTS)
    if not checkpoints:
        return  # the ranks report what is missing
    try:
        meta = rundir.read_manifest(checkpoints[-1]).get("meta", {})
    except KeelError:
        return  # corrupt: the ranks fall back to an older checkpoint and check that one
    saved = meta.get("world_size", 1) if isinstance(meta, dict) else 1
    distributed.Distributed(world_size=nproc).check_resume({"world_size": saved}, checkpoints[-1].name, allow)


def run_torchrun(nproc: int, worker: list[str], run_dir: Path, threads: int) -> int:
    """Run torchrun (standalone rendezvous, no restarts) with ``worker`` as each rank's command; the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # keel reports the job's end itself, in one line; torchrun's agent would log each step of a failure
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="keel-ranks-") as failures, _environment(
            {"OMP_NUM_THREADS": str(threads), distributed.FAILURE_DIR_ENV: failures,
             distributed.LAUNCHER_PID_ENV: str(os.getpid())}):  # the ranks stop if this process is killed
        options = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts",
                              "0", *worker])
        try:
            run(options)
        except ChildFailedError as failed:
            return report_failures(failed.failures, _read_reports(Path(failures)), run_dir, nproc)
        except SignalException as stopped:  # SIGINT or SIGTERM to this launcher: torchrun stopped the ranks
            print(f"keel train: interrupted ({signal.Signals(stopped.sigval).name}); the ranks were stopped",
                  file=sys.stderr)
            return 128 + int(stopped.sigval)
    return 0


def report_failures(failures: dict[int, Any], reports: dict[int, dict[str, Any]], run_dir: Path, nproc: int) -> int:
    """One line for a failed job; the exit code (2 for bad input, 1 otherwise)."""
    for code in (2, 1):  # bad input, then a run that became unstable: every rank says the same, print it once
        said = {rank: r["message"] for rank, r in sorted(reports.items()) if r.get("code") == code}
        if said:
            messages = dict.fromkeys(said.values())
            if len(messages) == 1:
                print(f"keel train: {next(iter(messages))}", file=sys.stderr)
            else:
                for rank, message in said.items():
                    print(f"keel train: rank {rank}: {message}", file=sys.stderr)
            return code
    # A rank died or failed unexpectedly. The others then lose contact, or torchrun stops them with SIGTERM: the
    # cause is the rank that did neither.
    causes = {rank: f for rank, f in failures.items()
              if not reports.get(rank, {}).get("lost_contact") and f.exitcode != -signal.SIGTERM}
    pool = causes or failures
    rank = min(pool, key=lambda r: (pool[r].timestamp, r))
    failure = pool[rank]
    if failure.exitcode < 0:
        what = f"was killed by signal {failure.signal_name()}"
    else:
        said = reports.get(rank, {}).get("message")
        what = f"exited with code {failure.exitcode}" + (f" ({said})" if said else " (its traceback is above)")
    latest = rundir.newest_intact(Path(run_dir) / rundir.CHECKPOINTS, report=lambda message: None)
    where = (f"the last complete checkpoint is {latest} (continue with: keel train --nproc {nproc} --resume "
             f"{run_dir})" if latest is not None else "no checkpoint was written")
    print(f"keel train: rank {rank} {what}; the job stopped (torchrun ended the other ranks); {where}",
          file=sys.stderr)
    return 1


def _read_reports(folder: Path) -> dict[int, dict[str, Any]]:
    reports = {}
    for path in folder.glob("rank*.json"):
        try:
            report = json.loads(path.read_text())
            reports[int(report["rank"])] = report
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return reports


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
