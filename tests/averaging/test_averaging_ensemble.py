"""Ensembles beyond cross-entropy: the argmax of the mean distribution, its accuracy, and `predict`."""

import json
import math

import pytest
import torch
from torch import nn

from keel.averaging import evaluate_ensemble, predict, predict_proba
from keel.cli.main import main
from keel.config import load_config
from keel.train import train
from keel.train.scoring import ValidationScorer


class Fixed(nn.Module):
    """A classifier whose predicted distribution is the same for every input."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_predict_averages_the_distributions_then_takes_the_argmax():
    a, b = Fixed([0.6, 0.4, 1e-6]), Fixed([1e-6, 0.45, 0.55])
    x = torch.zeros(5, 2)
    mean = predict_proba([a, b], x)
    torch.testing.assert_close(mean[0], torch.tensor([0.3, 0.425, 0.275]), atol=1e-6, rtol=0)
    # each member votes for another class (0 and 2): the mean distribution picks class 1
    assert predict([a, b], x).tolist() == [1] * 5
    assert predict([a], x).tolist() == [0] * 5 and predict([lambda: b], x).tolist() == [2] * 5


def test_evaluate_ensemble_reports_accuracy_for_classifiers():
    a, b = Fixed([0.6, 0.4, 1e-6]), Fixed([1e-6, 0.45, 0.55])
    batches = [(torch.zeros(4, 2), torch.tensor([1, 1, 0, 2]))]
    result = evaluate_ensemble([a, b], batches)
    assert result["member_accuracy"] == [0.25, 0.25]
    assert result["ensemble_accuracy"] == 0.5 and result["accuracy_gain"] == 0.25
    expected = -torch.tensor([0.425, 0.425, 0.3, 0.275]).log().double().mean()
    assert result["ensemble_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_sequence_models_report_no_accuracy():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Embedding(16, 16), nn.Linear(16, 16)) for _ in range(2)]
    batches = [(torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8)))]
    result = evaluate_ensemble(members, batches)
    assert "ensemble_accuracy" not in result and math.isfinite(result["ensemble_loss"])


def test_keel_ensemble_of_digits_runs_reports_the_ensembles_accuracy(tmp_path, capsys):
    runs, results = [], []
    for seed in (1, 2, 3):
        run = tmp_path / f"seed{seed}"
        config = load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=15", "eval_interval=15",
                                    "checkpoint_interval=15", f"seed={seed}", f"out_dir={run}"])
        results.append(train(config, quiet=True))
        runs.append(run)
    assert main(["ensemble", *map(str, runs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["val_accuracy"] for m in result["members"]] == pytest.approx([r["val_accuracy"] for r in results])
    scorer = ValidationScorer.from_config_file(runs[0] / "config.yaml")
    found = [scorer.predictions(run / "model.safetensors") for run in runs]
    mean = torch.stack([f.probs for f in found]).mean(0)
    expected = float((mean.argmax(-1) == found[0].targets).double().mean())
    assert result["ensemble_val_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert result["accuracy_gain"] == pytest.approx(expected - max(r["val_accuracy"] for r in results))
    assert main(["ensemble", *map(str, runs)]) == 0
    assert "ensemble val_accuracy" in capsys.readouterr().out
