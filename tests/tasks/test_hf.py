"""Hugging Face causal LMs on keel's LM data (optional extra keel[hf]): built from a config, or loaded from a local
directory; nothing is downloaded. Skipped without transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from keel.cli.main import main  # noqa: E402
from keel.config import load_config  # noqa: E402
from keel.train import train  # noqa: E402

TINY_GPT2 = ["model.hf_config.model_type=gpt2", "model.hf_config.n_layer=1", "model.hf_config.n_embd=32",
             "model.hf_config.n_head=2", "model.hf_config.n_positions=64", "model.block_size=32",
             "data.batch_size=8", "data.eval_tokens=2048", "device=cpu", "threads=1", "max_steps=30",
             "eval_interval=30", "checkpoint_interval=30", "sample.tokens=8", "optimizer.lr=3e-3", "schedule.warmup=3"]


def test_a_tiny_gpt2_from_its_config_trains_and_samples(tmp_path, capsys):
    run = tmp_path / "r"
    result = train(load_config(None, TINY_GPT2 + [f"out_dir={run}"]))
    losses = [r["loss"] for r in result["history"] if "grad_norm" in r]
    assert losses[-1] < losses[0] - 1.0
    assert "sample: 'The " in capsys.readouterr().out
    # the run's config rebuilds the same model for keel average --eval
    assert main(["average", str(run), "--last", "1", "--out", str(tmp_path / "avg.safetensors"), "--eval"]) == 0
    assert "(average)" in capsys.readouterr().out


def test_from_pretrained_directory_and_init_from_it(tmp_path, capsys):
    config = transformers.GPT2Config(vocab_size=256, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    torch.manual_seed(0)
    saved = tmp_path / "hf"
    transformers.GPT2LMHeadModel(config).save_pretrained(saved)
    base = [a for a in TINY_GPT2 if not a.startswith("model.hf_config")] + ["max_steps=2", "schedule.warmup=0"]
    train(load_config(None, base + [f"model.hf_pretrained={saved}", f"out_dir={tmp_path / 'a'}"]), quiet=True)
    # the same weights through init_from, into a model built from the same config
    hf = [f"model.hf_config.{k}={v}" for k, v in
          dict(model_type="gpt2", vocab_size=256, n_layer=1, n_embd=32, n_head=2, n_positions=64).items()]
    train(load_config(None, base + hf + [f"init_from={saved}", f"out_dir={tmp_path / 'b'}"]))
    assert "init_from: loaded" in capsys.readouterr().out


def test_hf_config_errors_are_one_line(tmp_path, capsys):
    args = ["train", *TINY_GPT2, "model.hf_config.n_positions=16", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 2
    assert "exceeds the Hugging Face model's 16 positions" in capsys.readouterr().err
    assert main(["train", "model.hf_config.n_layer=1", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "no model_type" in capsys.readouterr().err
