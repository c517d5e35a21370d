"""The run directory: names, starting and resuming, the stored config, checkpoint writes that fail, and the commands
(average, ensemble) that read runs through the same listing."""

import errno
import json
import os

import pytest
import torch

from keel.averaging import resolve_checkpoints
from keel.cli.ensemble import resolve_members
from keel.errors import KeelError
from keel import rundir


def tiny_checkpoint(root, step, config=None, extra=None):
    weights = {"w": torch.full((2, 2), float(step))}
    meta = {"step": step} if config is None else {"step": step, rundir.CONFIG_META_KEY: config}
    return rundir.write_checkpoint(root, step, weights, {"step": step, "metrics_offset": 0}, meta, extra)


def test_names():
    assert rundir.step_dir_name(120) == "step_00000120"
    assert rundir.checkpoint_step("step_00000120") == 120
    assert rundir.checkpoint_step("checkpoints/step_00000120") == 120
    for stray in ("step_120", "step_000001200", "step_00000120.bak", "step_0000012x", "Step_00000120", ""):
        assert rundir.checkpoint_step(stray) is None, stray


def test_listing_ignores_directories_without_a_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    tiny_checkpoint(root, 5)
    (root / "step_00000009").mkdir()
    (root / "step_9").mkdir()
    assert [p.name for p in rundir.step_dirs(root)] == ["step_00000005", "step_00000009"]
    assert [p.name for p in rundir.list_checkpoints(root)] == ["step_00000005"]
    weights, state = rundir.load_checkpoint(root / "step_00000005")
    assert state["step"] == 5 and torch.equal(weights["w"], torch.full((2, 2), 5.0))
    assert (root / "latest").read_text() == "step_00000005\n"


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    root = tmp_path / "checkpoints"
    tiny_checkpoint(root, 5, extra=lambda folder: (folder / "old.safetensors").write_bytes(b""))
    tiny_checkpoint(root, 5)
    assert sorted(p.name for p in (root / "step_00000005").iterdir()) == ["manifest.json", "model.safetensors",
                                                                         "state.pt"]
    assert rundir.verify(root / "step_00000005") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_is_one_line_and_leaves_older_checkpoints(tmp_path, code):
    root = tmp_path / "checkpoints"
    tiny_checkpoint(root, 5)

    def fail(folder):
        raise OSError(code, os.strerror(code))

    with pytest.raises(KeelError) as caught:
        tiny_checkpoint(root, 10, extra=fail)
    message = str(caught.value)
    assert "\n" not in message and os.strerror(code) in message and "step_00000010" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]  # no .tmp-step_00000010 left
    assert rundir.verify(root / "step_00000005") is None
    assert (root / "latest").read_text() == "step_00000005\n"


def test_any_other_failure_also_removes_the_temporary_directory(tmp_path):
    root = tmp_path / "checkpoints"

    def fail(folder):
        raise RuntimeError("a callback broke")

    with pytest.raises(RuntimeError, match="a callback broke"):
        tiny_checkpoint(root, 10, extra=fail)
    assert list(root.iterdir()) == []


def test_verify_checks_only_the_named_files_contents(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "checkpoints", 5)
    (ckpt / "state.pt").write_bytes(b"garbage")
    assert rundir.verify(ckpt, files=["model.safetensors"]) is None
    assert "state.pt has 7 bytes" in rundir.verify(ckpt)
    assert "ema.safetensors is not listed" in rundir.verify(ckpt, files=["ema.safetensors"])
    with pytest.raises(KeelError, match="corrupt: state.pt has 7 bytes"):
        rundir.load_checkpoint(ckpt)
    assert rundir.read_manifest(ckpt)["step"] == 5


# ------------------------------------------------------------------------------------------ new runs and resuming


@pytest.mark.parametrize(
    "part, shown",
    [
        ("metrics.jsonl", "metrics.jsonl"),
        ("config.yaml", "config.yaml"),
        ("LOCK", "LOCK"),
        ("loss.png", "loss.png"),
        ("checkpoints/step_00000005/model.safetensors", "checkpoints/ (1 entry)"),
        ("checkpoints/.tmp-step_00000005/x", "checkpoints/ (1 entry)"),
        ("snapshots/step_00000005.safetensors", "snapshots/ (1 entry)"),
        ("tensorboard/events", "tensorboard/ (1 entry)"),
    ],
)
def test_a_new_run_is_refused_where_another_run_left_anything(tmp_path, part, shown):
    (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / part).write_text("")
    message = f"already holds \\(part of\\) a run: {shown.replace('(', '[(]').replace(')', '[)]')}; " \
              f"allowed: --resume {tmp_path} to continue it, or another --out"
    with pytest.raises(KeelError, match=message):
        rundir.check_new_run_dir(tmp_path)
    with pytest.raises(KeelError, match="already holds"):
        rundir.prepare_run_dir(tmp_path, resume=False)


def test_discarding_a_failed_new_run_removes_every_part_a_new_run_is_refused_for(tmp_path):
    parts = ["metrics.jsonl", "config.yaml", "loss.png", "tokenizer.json", "checkpoints/.tmp-step_00000005/x",
             "checkpoints/step_00000006/model.safetensors", "snapshots/step_00000005.safetensors", "tensorboard/e"]
    for part in [*parts, "notes.txt"]:
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("")
    assert rundir.discard_new_run(tmp_path, made=False, task_files=["tokenizer.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    rundir.check_new_run_dir(tmp_path)
    tiny_checkpoint(tmp_path / "checkpoints", 5)  # a checkpoint: resumable, so nothing is removed
    assert not rundir.discard_new_run(tmp_path, made=True)
    assert rundir.list_checkpoints(tmp_path / "checkpoints")


def test_a_new_run_may_use_a_missing_empty_or_unrelated_directory(tmp_path):
    rundir.check_new_run_dir(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()  # empty: nothing of a run in it
    (tmp_path / "notes.txt").write_text("mine")
    rundir.check_new_run_dir(tmp_path)
    assert rundir.prepare_run_dir(tmp_path / "a" / "b", resume=False).is_dir()


def test_out_at_a_file_under_a_file_or_too_long_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    cases = {
        tmp_path / "file": "is a file",
        tmp_path / "file" / "run": "Not a directory",
        tmp_path / ("x" * 300): "File name too long",
        tmp_path / ("y" * 300) / "run": "File name too long",
    }
    for path, reason in cases.items():
        with pytest.raises(KeelError, match=reason) as caught:
            rundir.prepare_run_dir(path, resume=False)
        assert "\n" not in str(caught.value) and str(caught.value).startswith("out_dir: ")


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(KeelError, match="--resume: .* does not exist"):
        rundir.prepare_run_dir(tmp_path / "missing", resume=True)
    with pytest.raises(KeelError, match="not a keel run directory"):
        rundir.prepare_run_dir(tmp_path, resume=True)
    (tmp_path / "metrics.jsonl").write_text("")
    assert rundir.prepare_run_dir(tmp_path, resume=True) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the write probe left nothing


def test_the_trainer_refuses_a_resume_by_the_same_rule_before_it_builds_anything(tmp_path):
    from keel.config import load_config
    from keel.train import Trainer

    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    config = load_config(None, ["task=digits", "device=cpu", "threads=1"])
    for path in (tmp_path / "missing", tmp_path / "file", tmp_path / "empty"):
        with pytest.raises(KeelError) as expected:
            rundir.prepare_run_dir(path, resume=True)
        with pytest.raises(KeelError) as refused:
            Trainer(config, run_dir=path, resume=True, quiet=True)
        assert str(refused.value) == str(expected.value)


def test_read_run_config_prefers_config_yaml_then_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / rundir.CHECKPOINTS
    messages = []
    assert rundir.read_run_config(tmp_path, report=messages.append) is None
    tiny_checkpoint(root, 5, config="max_steps: 5\n")
    tiny_checkpoint(root, 10, config="max_steps: 10\n")
    assert rundir.read_run_config(tmp_path, report=messages.append) == "max_steps: 10\n"
    assert messages == [f"config.yaml is missing from '{tmp_path}'; using the config stored in checkpoint "
                        "step_00000010"]
    (root / "step_00000010" / "state.pt").write_bytes(b"")
    assert rundir.read_run_config(tmp_path, report=messages.append) == "max_steps: 5\n"
    (tmp_path / "config.yaml").write_text("max_steps: 99\n")
    assert rundir.read_run_config(tmp_path, report=pytest.fail) == "max_steps: 99\n"


def test_read_run_config_of_a_checkpoint_without_one(tmp_path):
    tiny_checkpoint(tmp_path / rundir.CHECKPOINTS, 5)
    messages = []
    assert rundir.read_run_config(tmp_path, report=messages.append) is None
    assert "stores no config" in messages[0]


# ------------------------------------------------------------------------------------------ readers of runs


def fake_run(run, steps):
    for step in steps:
        tiny_checkpoint(run / "checkpoints", step)
    with open(run / "metrics.jsonl", "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "val_loss": 1.0 / step}) + "\n")


def test_average_reads_only_listed_checkpoints_and_refuses_corrupt_ones(tmp_path):
    run = tmp_path / "run"
    fake_run(run, [10, 20, 30])
    (run / "checkpoints" / "step_00000030.bak").mkdir()
    (run / "checkpoints" / "step_00000040").mkdir()  # no manifest: absent
    assert [f.parent.name for f in resolve_checkpoints([run])] == ["step_00000010", "step_00000020", "step_00000030"]
    (run / "checkpoints" / "step_00000030" / "model.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(KeelError, match="step_00000030' is corrupt .*model.safetensors has 8 bytes"):
        resolve_checkpoints([run], last=2)
    with pytest.raises(KeelError, match="is corrupt"):
        resolve_checkpoints([run], best=2)  # the best two by val_loss include step 30
    with pytest.raises(KeelError, match="is corrupt"):
        resolve_checkpoints([run / "checkpoints" / "step_00000030"])
    assert [f.parent.name for f in resolve_checkpoints([run / "checkpoints" / "step_00000010"])] == ["step_00000010"]


def test_ensemble_takes_a_runs_newest_intact_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    fake_run(run, [10, 20])
    assert resolve_members([str(run)], "raw") == [run / "checkpoints" / "step_00000020" / "model.safetensors"]
    (run / "checkpoints" / "step_00000020" / "state.pt").write_bytes(b"")
    assert resolve_members([str(run)], "raw") == [run / "checkpoints" / "step_00000010" / "model.safetensors"]
    assert "checkpoint step_00000020 is corrupt" in capsys.readouterr().err
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    for name in ("step_00000010.safetensors", "step_00000020.safetensors", "step_00000030.safetensors.tmp-1",
                 "step_30.safetensors"):
        (snapshots / name).write_bytes(b"")
    assert [p.name for p in resolve_members([str(snapshots)], "raw")] == ["step_00000010.safetensors",
                                                                           "step_00000020.safetensors"]


# ------------------------------------------------------------------------------------------ devices


def cuda_tagged_checkpoint(root, monkeypatch):
    """A checkpoint whose state.pt storages are tagged "cuda:0", as a CUDA run writes them (saved here on the CPU
    with torch's location tag replaced, so the test needs no GPU)."""
    import torch.serialization

    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        weights = {"w": torch.full((2, 2), 5.0)}
        state = {"step": 5, "metrics_offset": 0, "rng": {"torch": torch.get_rng_state()}, "m": torch.ones(3)}
        return rundir.write_checkpoint(root, 5, weights, state, {"step": 5})


def test_a_checkpoint_written_on_a_gpu_loads_to_the_cpu_by_default(tmp_path, monkeypatch):
    ckpt = cuda_tagged_checkpoint(tmp_path, monkeypatch)
    if not torch.cuda.is_available():  # the file does name CUDA: read without a map, it needs a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt / "state.pt", weights_only=True)
    assert rundir.verify(ckpt) is None
    for weights, payload in (rundir.load_checkpoint(ckpt), rundir.load_latest(tmp_path, report=pytest.fail)[1:],
                             rundir.load_checkpoint(ckpt, device=torch.device("cpu"))):
        assert weights["w"].device.type == "cpu" and payload["m"].device.type == "cpu"
        assert payload["rng"]["torch"].device.type == "cpu"
        torch.set_rng_state(payload["rng"]["torch"])  # a CPU RNG state is usable as it arrives
        assert payload["rng"]["torch"].numpy().dtype.name == "uint8"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loading_to_the_cpu_or_to_a_gpu_as_asked(tmp_path, monkeypatch):
    ckpt = cuda_tagged_checkpoint(tmp_path, monkeypatch)
    weights, payload = rundir.load_checkpoint(ckpt)  # the default stays the CPU on a GPU machine
    assert weights["w"].device.type == "cpu" and payload["rng"]["torch"].device.type == "cpu"
    weights, payload = rundir.load_latest(tmp_path, device="cuda", report=pytest.fail)[1:]
    assert weights["w"].device.type == "cuda" and payload["m"].device.type == "cuda"
