"""keel's commands and techniques on CUDA: averaging (EMA, SWA, keel average, keel ensemble, keel report),
init_from and early stopping, the fast recipe (Muon, WSD, sequence-length warmup), the Hugging Face task,
keel sweep, keel train --nproc 1, the memory pre-check and keel diagnose --config.

Marker ``gpu``: skipped where CUDA is absent (tests/conftest.py).
"""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from keel.cli.main import main
from keel.config import load_config
from keel.diagnose.findings import read_diagnosis
from keel.errors import KeelError
from keel.models.memory import available_memory
from keel.rundir.metrics import read_metrics
from keel.train import train
from tiny_config import TINY

pytestmark = pytest.mark.gpu

ON_GPU = [*(o for o in TINY if o != "device=cpu"), "device=cuda"]
DIGITS = ["task=digits", "device=cuda", "eval_interval=10", "checkpoint_interval=1000", "data.batch_size=32"]


def test_averaging_and_the_commands_that_read_runs(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(load_config(None, [*ON_GPU, "max_steps=40", "eval_interval=20", "checkpoint_interval=20",
                                       "sample.tokens=0", "ema.enabled=true", "ema.decay=0.9", "swa.enabled=true",
                                       "swa.start=50%", f"out_dir={run}"]), quiet=True)
    assert all(math.isfinite(summary[k]) for k in ("val_loss", "val_loss_ema", "val_loss_swa"))
    capsys.readouterr()
    assert main(["average", str(run), "--last", "2", "--out", str(tmp_path / "avg.safetensors"), "--eval",
                 "--device", "cuda"]) == 0
    assert "(average)" in capsys.readouterr().out
    members = [str(run / "checkpoints" / "step_00000020"), str(run / "checkpoints" / "step_00000040")]
    assert main(["ensemble", *members, "--device", "cuda", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["ensemble_val_loss"])
    assert result["ensemble_val_loss"] <= result["mean_member_val_loss"] + 1e-6
    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0


def test_init_from_and_early_stopping_restore_weights(tmp_path):
    pretrained, run = tmp_path / "pretrained", tmp_path / "run"
    train(load_config(None, [*DIGITS, "max_steps=30", f"out_dir={pretrained}"]), quiet=True)
    result = train(load_config(None, [*DIGITS, "max_steps=400", f"init_from={pretrained}", "optimizer.lr=3e-2",
                                      "schedule.warmup=0", "early_stopping.metric=val_accuracy",
                                      "early_stopping.mode=max", "early_stopping.patience=2",
                                      "early_stopping.min_delta=0.5", f"out_dir={run}"]), quiet=True)
    # min_delta 0.5 accuracy: nothing after the first evaluation counts as an improvement, on any device
    assert result["step"] == 30 and result["best_step"] == 10 and result["stopped_early"]
    exported = load_file(str(run / "model.safetensors"))
    kept = load_file(str(run / "checkpoints" / "step_00000010" / "model.safetensors"))
    assert all(torch.equal(exported[k], kept[k]) for k in kept)  # the best weights, read back onto the GPU


def test_the_fast_recipe_trains(tmp_path):
    """Muon (its hidden matrices) with AdamW, the WSD schedule and a sequence-length warmup from 32 to 64 tokens."""
    overrides = [o for o in ON_GPU if not o.startswith(("recipe", "optimizer.", "schedule."))]
    config = load_config(None, [*overrides, "recipe=fast", "model.block_size=64", "max_steps=40",
                                "sample.tokens=0", f"out_dir={tmp_path / 'run'}"])
    result = train(config, quiet=True)
    assert result["step"] == 40 and result["val_loss"] < 4.0  # below the uniform byte model's ln(256) = 5.55
    lengths = [r["seq_len"] for r in result["history"] if "seq_len" in r]
    assert lengths[0] < lengths[-1] == 64


def test_the_hugging_face_task_trains(tmp_path):
    pytest.importorskip("transformers")
    gpt2 = ["model.hf_config.model_type=gpt2", "model.hf_config.n_layer=1", "model.hf_config.n_embd=32",
            "model.hf_config.n_head=2", "model.hf_config.n_positions=64"]
    result = train(load_config(None, [*ON_GPU, *gpt2, "max_steps=30", "eval_interval=30", "sample.tokens=8",
                                      f"out_dir={tmp_path / 'run'}"]), quiet=True)
    losses = [r["loss"] for r in result["history"] if "grad_norm" in r]
    assert losses[-1] < losses[0] - 1.0


def test_a_sweep_trains_its_trials(tmp_path):
    pytest.importorskip("optuna")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "digits", "device": "cuda", "max_steps": 30, "eval_interval": 10,
                                      "checkpoint_interval": 10, "sweep": {"optimizer.lr": [1e-3, 3e-3]}}))
    assert main(["sweep", str(config), "--out", str(tmp_path / "sweep")]) == 0
    best = load_config(tmp_path / "sweep" / "best.yaml")
    assert best.device == "cuda" and best.optimizer["lr"] in (1e-3, 3e-3)


def test_nproc_1_trains_on_the_gpu_through_the_launcher(tmp_path):
    """keel train --nproc 1 on CUDA: torchrun's agent and one rank on the GPU. (One process makes no process group;
    NCCL between ranks needs a GPU per rank.)"""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "keel", "train", *ON_GPU, "max_steps=20", "eval_interval=20",
                           "sample.tokens=0", "--nproc", "1", "--out", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final val_loss" in done.stdout
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(20)) and all(math.isfinite(r["loss"]) for r in steps)


def test_the_memory_check_reads_the_gpus_free_memory():
    free, total = torch.cuda.mem_get_info()
    seen = available_memory("cuda")
    assert 0 < seen <= total and abs(seen - free) < 0.05 * total  # free memory moves a little between two reads
    huge = ["model.n_layer=48", "model.n_embd=16384", "data.batch_size=64"]  # ~155B parameters
    for device in (["device=cuda"], []):  # device auto means CUDA on this machine
        with pytest.raises(KeelError, match=r"needed \(parameters .*\), .* available on cuda; allowed: a smaller"):
            load_config(None, [*device, *huge])
    load_config(None, ["device=cuda", "model.n_layer=2"])  # a small model fits


def test_diagnose_config_within_a_small_budget(tmp_path):
    raw = {"recipe": "baseline", "device": "cuda", "max_steps": 200, "eval_interval": 50,
           "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
           "data": {"batch_size": 8, "eval_tokens": 4096}, "optimizer": {"lr": 3e-3},
           "schedule": {"warmup": 10, "min_lr": 3e-4}}
    config, out = tmp_path / "c.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(raw))
    assert main(["diagnose", "--config", str(config), "--budget", "60s", "--out", str(out), "--quiet"]) == 0
    diagnosis = read_diagnosis(out)
    assert "config_stable" in {f.kind for f in diagnosis.findings}
    assert load_config(out / "recommended.yaml").device == "cuda"
