"""Shared helpers for keel's benchmarks: machine description, interleaved timing, results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def summary(values: list[float]) -> dict:
    """Median, min, max and count of a list of ratios or times."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_json(name: str, payload: dict, indent: int | None = 1) -> Path:
    path = HERE / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path


def write_section(title: str, body: str) -> None:
    """Replace (or append) the section ``## title`` of RESULTS.md with ``body``."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    header = f"## {title}\n"
    start = text.find(header)
    if start >= 0:
        end = text.find("\n## ", start + len(header))
        text = text[:start] + header + "\n" + body.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + header + "\n" + body.rstrip() + "\n"
    path.write_text(text)


def run_keel(command: list[str], cwd: Path) -> float:
    """Run ``keel COMMAND`` (this checkout's) in a fresh process; its wall-clock seconds. Exits with its output
    when it fails."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "keel.cli.main", *command], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"keel {' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds
