"""Real filesystem faults: a full disk and a read-only directory. A checkpoint write fails in one line, removes its
temporary directory and leaves the older checkpoints intact; a run directory that cannot be written is refused.

These mount a tmpfs (root only) and are kept out of the default run: ``pytest -m faults``.
"""

import os
import stat

import pytest
import torch

from keel.errors import KeelError
from keel import rundir

from fault_helpers import tmpfs  # noqa: F401 (a fixture; tests/ is on sys.path)

pytestmark = pytest.mark.faults


def write(root, step, weights_numel=16, state_numel=16, extra_numel=0):
    weights = {"w": torch.ones(weights_numel)}
    state = {"step": step, "big": torch.ones(state_numel)}

    def extra(folder):
        if extra_numel:
            from keel.safetensors_io import write_safetensors

            write_safetensors(folder / "ema.safetensors", {"w": torch.ones(extra_numel)})

    return rundir.write_checkpoint(root, step, weights, state, {"step": step}, extra)


@pytest.mark.parametrize("large", ["weights", "state", "extra"])
def test_a_full_disk_fails_in_one_line_and_keeps_the_older_checkpoints(tmpfs, large):
    root = tmpfs("512k") / "checkpoints"
    older = write(root, 5)
    before = {p.name: p.read_bytes() for p in older.iterdir()}
    with pytest.raises(KeelError) as caught:
        write(root, 10, **{f"{large}_numel": 1 << 20})  # 4 MB into 512 kB
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "ENOSPC" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]  # temporary directory removed
    assert {p.name: p.read_bytes() for p in older.iterdir()} == before
    path, _, payload = rundir.load_latest(root, report=pytest.fail)
    assert path == older and payload["step"] == 5
    write(root, 10)  # the space came back: writing works again
    assert [p.name for p in rundir.list_checkpoints(root)] == ["step_00000005", "step_00000010"]


def test_a_read_only_filesystem_fails_in_one_line_and_can_still_be_read(tmpfs):
    point = tmpfs("1m")
    run = point / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    older = write(run / "checkpoints", 5)
    tmpfs.remount(point, "ro")
    with pytest.raises(KeelError, match=r"cannot write it under .*Read-only file system, EROFS") as caught:
        write(run / "checkpoints", 10)
    assert "\n" not in str(caught.value)
    assert [p.name for p in rundir.list_checkpoints(run / "checkpoints")] == ["step_00000005"]
    assert rundir.load_latest(run / "checkpoints", report=pytest.fail)[0] == older  # reading needs no writing
    with pytest.raises(KeelError, match="out_dir: cannot use .*Read-only file system, EROFS"):
        rundir.prepare_run_dir(point / "new", resume=False)
    with pytest.raises(KeelError, match="--resume: cannot write in .*Read-only file system, EROFS"):
        rundir.prepare_run_dir(run, resume=True)
    with pytest.raises(KeelError, match="cannot create LOCK .*Read-only file system"):
        rundir.RunLock(run).acquire()


def test_a_directory_without_write_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the read-only tmpfs test covers this case")
    run = tmp_path / "run"
    older = write(run / "checkpoints", 5)
    (run / "checkpoints").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(KeelError, match="Permission denied, EACCES"):
            write(run / "checkpoints", 10)
        assert [p.name for p in rundir.list_checkpoints(run / "checkpoints")] == [older.name]
        run.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(KeelError, match="out_dir: cannot use .*Permission denied"):
            rundir.prepare_run_dir(run / "new", resume=False)
    finally:
        run.chmod(0o755)
        (run / "checkpoints").chmod(0o755)
