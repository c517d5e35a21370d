"""``keel train`` on a full disk and a read-only filesystem, end to end: one line, exit code 2, the older
checkpoints intact, and once there is room again ``--resume`` ends bitwise as a run that never failed.

These mount tmpfs filesystems (root only) and are kept out of the default run: ``pytest -m faults``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keel import rundir

from fault_helpers import keel_train as keel, reference_run, tmpfs  # noqa: F401 (tmpfs: a fixture)
from run_helpers import assert_bitwise_equal  # tests/ (the conftest's folder) is on sys.path

pytestmark = pytest.mark.faults

TINY = ["device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "data.batch_size=8", "sample.tokens=8", "optimizer.lr=3e-3", "schedule.min_lr=3e-4"]
RUN = [*TINY, "max_steps=11", "checkpoint_interval=3", "eval_interval=3", "keep_last=2", "schedule.warmup=2",
       "data.eval_tokens=1024"]
# Disk sizes from "not even the run directory fits" to "the whole run fits" (a checkpoint is about 400 kB).
SIZES = ["4k", "12k", "64k", "300k", "500k", "700k", "900k", "1100k", "1200k", "1250k", "1300k", "1600k", "2m", "64m"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory, RUN)


def intact_checkpoints(run: Path) -> list[str]:
    """The checkpoints of ``run``, each checked to be intact (manifest, sizes, sha256)."""
    found = rundir.list_checkpoints(run / rundir.CHECKPOINTS)
    for checkpoint in found:
        assert rundir.verify(checkpoint) is None, checkpoint
    return [p.name for p in found]


@pytest.mark.parametrize("size", SIZES)
def test_a_full_disk_is_one_line_and_the_run_resumes_bitwise_once_there_is_room(tmpfs, reference, size,
                                                                                record_property):
    point = tmpfs(size)
    run = point / "run"
    code, err = keel(*RUN, "--out", str(run), "--quiet")
    if size == SIZES[-1]:
        assert code == 0, err  # everything fits: the control
    assert code in (0, 2), err
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "No space left on device" in err and "ENOSPC" in err, err
        assert f"'{point}/" in err, err  # the file the disk refused is named
        assert not (run / rundir.LOCK).exists()
    intact_checkpoints(run) if run.exists() else None
    tmpfs.remount(point, "size=64m")  # room again
    if code == 2 and not (run / rundir.CONFIG).exists() and not rundir.list_checkpoints(run / rundir.CHECKPOINTS):
        record_property("outcome", "failed before the run began; nothing to resume")
        return
    if code == 2:
        assert keel("--resume", str(run), "--quiet") == (0, "")
    assert_bitwise_equal(reference, run)
    record_property("outcome", "resumed bitwise" if code == 2 else "fitted")


def test_a_read_only_filesystem_is_one_line_and_the_run_is_left_as_it_was(tmpfs, reference):
    point = tmpfs("16m")
    run = point / "run"
    assert keel(*RUN, "max_steps=6", "--out", str(run), "--quiet") == (0, "")
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    tmpfs.remount(point, "ro")
    code, err = keel(*RUN, "--out", str(point / "new"), "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Read-only file system, EROFS" in err, err
    code, err = keel("--resume", str(run), "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Read-only file system, EROFS" in err, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    assert intact_checkpoints(run) == ["step_00000003", "step_00000006"]
    tmpfs.remount(point, "rw")
    assert keel("--resume", str(run), "--quiet") == (0, "")  # writable again: the (finished) run resumes
