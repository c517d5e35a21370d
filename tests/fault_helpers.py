"""Helpers the fault tests share (imported by name from tests/, like tiny_config): a tmpfs to fill or make
read-only, ``keel train`` in-process with its output captured, and an uninterrupted reference run."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from keel.cli.main import main
from keel.config import load_config
from keel.train import train


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a tmpfs and returns its path; ``tmpfs.remount(point, options)`` (e.g. "ro");
    unmounted afterwards. Skips without root or where mounting is refused."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(point)
        return point

    def remount(point: Path, options: str) -> None:
        done = subprocess.run(["mount", "-o", f"remount,{options}", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs ({options}): {done.stderr.strip()}")

    mount.remount = remount
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def keel_train(*argv: str) -> tuple[int, str]:
    """``keel train ARGV`` in-process: its exit code and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["train", *argv])
    return code, err.getvalue()


def reference_run(tmp_path_factory, overrides: list[str]) -> Path:
    """An uninterrupted run of ``overrides``, to compare interrupted ones with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, [*overrides, f"out_dir={run}"]), quiet=True)
    return run
