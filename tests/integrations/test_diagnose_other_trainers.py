"""`keel diagnose` and `keel report` on real Lightning and Hugging Face runs: a diverging run of each is flagged as
unstable, as keel's own diverging run is, and the gradient-norm and learning-curve readings use their logs."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import batch, keel_config
from torch import nn

from keel.cli.main import main
from keel.diagnose.readers import read_other_run
from keel.diagnose.report import build_report
from keel.diagnose.run import diagnose_run
from keel.errors import TrainingUnstableError

STEPS = 30
UNSTABLE = {"instability_early", "instability_sudden"}
DIVERGING = {"optimizer": {"name": "sgd", "lr": 3.0}, "schedule": {"name": "constant"}}  # |1 - 3 * 2| = 5 per step


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1)  # float32: the loss overflows to inf, then NaN, within STEPS steps


def data(i):
    x, y = batch(i)
    return x.float(), y.float()


def kinds(path) -> set[str]:
    diagnosis, _ = diagnose_run(path)
    return {f.kind for f in diagnosis.findings}


def lightning_run(tmp_path, tensorboard=False):
    L = pytest.importorskip("lightning")
    from keel.integrations.lightning import GradNorm, keel_optimizers

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return keel_optimizers(self, {**DIVERGING, "max_steps": STEPS})

    loader = torch.utils.data.DataLoader([data(i) for i in range(STEPS)], batch_size=None)
    logger = (L.pytorch.loggers.TensorBoardLogger if tensorboard else L.pytorch.loggers.CSVLogger)(str(tmp_path))
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[GradNorm(), L.pytorch.callbacks.LearningRateMonitor("step")])
    trainer.fit(Module(), loader)
    return tmp_path / "lightning_logs"


def hf_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from keel.integrations.hf import keel_optimizers

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, x, labels=None):
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    class Data(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(STEPS):
                x, y = data(i)
                yield {"x": x, "labels": y}

    model = Model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=1,
                             max_grad_norm=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), data_collator=lambda items: items[0],
                      optimizers=keel_optimizers(model, {**DIVERGING, "max_steps": STEPS}))
    trainer.train()
    trainer.save_state()
    return tmp_path / "trainer_state.json"


def test_a_diverging_lightning_run_is_flagged_unstable(tmp_path):
    root = lightning_run(tmp_path)
    records = read_other_run(root)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert all("lr" in r and "grad_norm" in r for r in steps) and steps[0]["lr"] == 3.0
    assert UNSTABLE & kinds(root)


def test_a_diverging_lightning_run_logged_to_tensorboard_is_flagged_unstable(tmp_path):
    pytest.importorskip("tensorboard")
    root = lightning_run(tmp_path, tensorboard=True)
    steps = [r for r in read_other_run(root) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(STEPS)) and all("grad_norm" in r for r in steps)
    assert UNSTABLE & kinds(root)


def test_a_diverging_hf_run_is_flagged_unstable(tmp_path):
    state = hf_run(tmp_path)
    steps = [r for r in read_other_run(state) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(STEPS)) and steps[0]["lr"] == 3.0
    assert UNSTABLE & kinds(state)
    assert main(["diagnose", str(state)]) in (0, 2)  # the CLI writes its outputs beside trainer_state.json
    assert (tmp_path / "diagnosis.json").is_file()


def test_keels_own_diverging_run_is_flagged_alike(tmp_path):
    from keel.train import train

    config = keel_config(STEPS, tmp_path / "keel", clip={"mode": "none"}, **DIVERGING,
                         nonfinite={"max_consecutive_skips": STEPS})
    with pytest.raises(TrainingUnstableError, match="consecutive updates skipped"):
        train(config, model=net(), train_data=data, loss_fn=nn.functional.mse_loss, quiet=True)
    assert UNSTABLE & kinds(tmp_path / "keel")


@pytest.mark.slow
def test_keel_report_reads_lightning_and_hf_runs(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    page = build_report([lightning_run(tmp_path / "l"), hf_run(tmp_path / "h")])
    assert page.count("<img") >= 3 and "lightning_logs" in page and "trainer_state.json" in page
