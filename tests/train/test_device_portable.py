"""Checkpoints move between devices: read on the CPU, moved to the run's device; RNG states stay CPU tensors; the
CUDA generator state is restored on CUDA and ignored, in one line, on a CPU. And ``deterministic: true``.

No GPU is needed: a checkpoint "written on a GPU" is made by saving its state.pt with every storage tagged
``cuda:0`` (what torch.save records for CUDA tensors, so torch.load without a map_location fails here as it would
on any CPU-only machine), with a CUDA generator state and ``device: cuda:0`` as a GPU run writes them.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel import rundir
from keel.config import load_config
from keel.rundir.metrics import read_metrics
from keel.train import Callback, Trainer, devices, export, train
from keel.train.early_stopping import EarlyStoppingCallback, EarlyStoppingConfig
from tiny_config import TINY

# Pinned to the CPU: the reference and the resumed run are compared bitwise.
RUN = [*TINY, "device=cpu", "max_steps=30", "checkpoint_interval=10", "eval_interval=10", "keep_last=5",
       "model.dropout=0.1", "ema.enabled=true", "sample.tokens=0"]

_TAG = [None]  # the location tag torch.save gives every storage while set (see tagged_as)
torch.serialization.register_package(0, lambda storage: _TAG[0], lambda storage, location: None)


def save_tagged(payload, path: Path, location: str) -> None:
    """torch.save ``payload`` as if each of its tensors lived on ``location`` (e.g. ``cuda:0``)."""
    _TAG[0] = location
    try:
        torch.save(payload, path)
    finally:
        _TAG[0] = None


def rewrite_as_written_on_cuda(ckpt: Path) -> None:
    """Make checkpoint ``ckpt``'s state.pt what a run on cuda:0 writes, and keep its manifest true."""
    payload = torch.load(ckpt / "state.pt", weights_only=True)
    payload["device"] = "cuda:0"
    payload["rng"]["cuda"] = [torch.full((16,), 7, dtype=torch.uint8)]  # one GPU's generator state
    save_tagged(payload, ckpt / "state.pt", "cuda:0")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def back_to_step_20(reference: Path, run: Path) -> Path:
    """A copy of ``reference`` whose newest checkpoint is step 20 (as if stopped there)."""
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_00000030")
    (run / "checkpoints" / "latest").write_text("step_00000020\n")
    return run / "checkpoints" / "step_00000020"


def assert_same_run(a: Path, b: Path) -> None:
    def records(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run / "metrics.jsonl")]

    assert records(a) == records(b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("portable") / "reference"
    train(load_config(None, [*RUN, f"out_dir={run}"]), quiet=True)
    return run


def test_a_checkpoint_says_which_device_wrote_it(reference):
    payload = torch.load(reference / "checkpoints" / "step_00000030" / "state.pt", weights_only=True)
    assert payload["device"] == "cpu" and "cuda" not in payload["rng"]
    assert all(t.device.type == "cpu" for t in [payload["rng"]["torch"], payload["rng"]["numpy"][1]])


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu_exactly(reference, tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = back_to_step_20(reference, run)
    rewrite_as_written_on_cuda(ckpt)
    with pytest.raises(RuntimeError, match="CUDA"):  # a GPU's state.pt: torch.load without map_location fails here
        torch.load(ckpt / "state.pt", weights_only=True)
    assert rundir.verify(ckpt) is None

    train(load_config(None, [*RUN, f"out_dir={run}"]), run_dir=run, resume=True)
    out = capsys.readouterr().out
    assert "resumed from step_00000020" in out
    weights = len(load_file(str(ckpt / "model.safetensors")))
    moved = [line for line in out.splitlines() if "was written on cuda:0" in line]
    assert len(moved) == 1 and re.fullmatch(
        rf"checkpoint step_00000020 was written on cuda:0: read on the CPU, {weights} weight tensors, [1-9]\d* "
        "optimizer-state tensors and the state of ema moved to cpu", moved[0]), moved
    assert out.count("CUDA generator state is ignored") == 1
    assert_same_run(reference, run)


def test_the_trainer_reads_checkpoints_on_the_cpu_whatever_its_device(reference, tmp_path, monkeypatch):
    """A trainer whose device is not the CPU (``meta`` stands in for an accelerator here: its tensors cannot reach
    NumPy or the CPU generator, as CUDA tensors cannot) still reads checkpoints on the CPU and restores every RNG."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    trainer = Trainer(load_config(None, [*RUN, f"out_dir={run}"]), run_dir=run, resume=True, quiet=True)
    trainer.device = torch.device("meta")
    asked = []
    for name in ("load_latest", "load_checkpoint"):
        real = getattr(rundir, name)
        monkeypatch.setattr(rundir, name, lambda *args, _real=real, **kwargs: asked.append(
            str(args[1] if len(args) > 1 else kwargs["device"])) or _real(*args, **kwargs))
    offset = trainer._restore()
    payload = torch.load(run / "checkpoints" / "step_00000030" / "state.pt", weights_only=True)
    assert trainer.state.step == 30 and offset == payload["metrics_offset"]
    assert torch.equal(torch.get_rng_state(), payload["rng"]["torch"])
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    assert asked == ["cpu"]
    # early stopping's export of its best checkpoint: read on the CPU too, into the model
    stopping = EarlyStoppingCallback(EarlyStoppingConfig(patience=2))
    stopping.unit.best, stopping.unit.best_step = 1.0, 10
    summary = {}
    stopping.on_run_end(trainer, summary)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert export.finish(trainer, summary, evals) == f" ({summary['weights']} weights of step 10, exported)"
    best = load_file(str(rundir.checkpoint_weights(run / "checkpoints" / "step_00000010", summary["weights"])))
    assert all(torch.equal(best[k], v) for k, v in trainer.model.state_dict().items())


def test_the_cuda_generator_state_is_restored_on_cuda_for_the_gpus_there(monkeypatch):
    """The CUDA branch with torch.cuda's calls stood in for: one saved state per GPU, as many restored as exist."""
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append((index, state.clone())))
    state = devices.rng_state(torch.device("cpu"))
    cuda0, cuda1 = torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    assert devices.set_rng_state({**state, "cuda": [cuda0, cuda1]}, torch.device("cuda")) is None
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], cuda0)
    note = devices.set_rng_state(state, torch.device("cuda"))  # written on a CPU: nothing to restore on the GPU
    assert note.startswith("the checkpoint holds no CUDA generator state") and len(restored) == 1
    note = devices.set_rng_state({**state, "cuda": [cuda0]}, torch.device("cpu"))
    assert note.startswith("the checkpoint's CUDA generator state is ignored") and len(restored) == 1


def test_deterministic_turns_deterministic_kernels_on_for_the_run_only(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    class Probe(Callback):
        name = "probe"

        def on_step_start(self, trainer):
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))

    before = torch.are_deterministic_algorithms_enabled()
    config = load_config(None, [*TINY, "device=cpu", "max_steps=2", "schedule.warmup=1", "deterministic=true",
                                 f"out_dir={tmp_path / 'r'}"])
    train(config, callbacks=[Probe()], quiet=True)
    assert seen == [(True, False), (True, False)]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == devices.CUBLAS_WORKSPACE_CONFIG
    assert torch.are_deterministic_algorithms_enabled() == before
    assert load_config(None, ["device=cpu"]).deterministic is False


def test_a_deterministic_workspace_already_set_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert devices.set_cublas_workspace() is None and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert devices.set_cublas_workspace() is None and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_cuda_device_this_machine_lacks_is_one_line(monkeypatch):
    from keel.errors import KeelError
    from keel.train.loop import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(KeelError, match=r"^device: 'cuda:7' was asked for but this machine has 2 CUDA devices; "
                                        r"allowed: auto, cpu, cuda, cuda:0 to cuda:1$"):
        resolve_device("cuda:7")
