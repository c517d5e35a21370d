"""keel's TrainerCallbacks on a real Hugging Face Trainer (tiny float64 model, CPU): the same LR and EMA as keel's
own trainer, the EMA state reloaded on resume, non-finite updates skipped, checkpoint averaging."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import (
    FROZEN_OPTIMIZER,
    assert_close_tensors,
    assert_trains_from_the_unfreeze_step,
    batch,
    keel_config,
    keel_run,
    make_net,
)
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from keel.errors import KeelError  # noqa: E402
from keel.integrations.hf import (  # noqa: E402
    EMA,
    SWA,
    CheckpointAverage,
    Clip,
    NonFinite,
    Polyak,
    UpdateRatio,
    keel_optimizers,
)


class Regression(nn.Module):
    """The tiny regression with the Trainer's calling convention: ``forward(x, labels)`` returns the loss.
    ``poison`` maps a step to a loss factor (NaN) to inject."""

    def __init__(self, net: nn.Module, poison=None):
        super().__init__()
        self.net, self.poison, self.step = net, poison or {}, 0

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = nn.functional.mse_loss(out, labels)
        return {"loss": loss * self.poison.get(self.step, 1.0), "logits": out}


class Batches(torch.utils.data.IterableDataset):
    """Batch i of integration_helpers as one item, in order (an IterableDataset: the Trainer does not shuffle)."""

    def __init__(self, count: int, start: int = 0):
        self.count, self.start = count, start

    def __iter__(self):
        for i in range(self.start, self.start + self.count):
            x, y = batch(i)
            yield {"x": x, "labels": y}


class Recorder(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        group = optimizer.param_groups[0]
        self.lrs.append(group["lr"] / group["lr_scale"])


class SizedBatches(torch.utils.data.Dataset):
    """``count`` batches with a length: the Trainer knows its epoch (and shuffles them)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        x, y = batch(i)
        return {"x": x, "labels": y}


def train(tmp_path, module, config, steps, callbacks, *, resume=None, start=0, dataset=None, **arguments):
    optimizer, scheduler = keel_optimizers(module, config)
    options = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=1, max_grad_norm=0,
                   logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                   dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=module, args=TrainingArguments(**{**options, **arguments}),
                      train_dataset=dataset or Batches(steps - start, start), eval_dataset=Batches(2, 100),
                      data_collator=lambda items: items[0], optimizers=(optimizer, scheduler), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hf_trainer_with_keels_callbacks_matches_keel_train(tmp_path):
    """Same model, data order and settings: the LR of every update and the EMA (dynamic decay) equal keel train's
    in float64 (rel 1e-10), and so do the final weights; the EMA is evaluated swapped in."""
    steps = 12
    config = keel_config(steps, tmp_path / "keel", ema={"enabled": True, "decay": 0.99, "dynamic_decay": True})
    expected = keel_run(config, make_net())

    module, recorder, ema = Regression(make_net()), Recorder(), EMA(0.99, dynamic_decay=True)
    trainer = train(tmp_path / "hf", module, config, steps, [recorder, ema, Clip(max_norm=1.0)],
                    eval_strategy="steps", eval_steps=steps)
    assert recorder.lrs == pytest.approx(expected["lrs"], rel=1e-12, abs=0)
    assert ema.unit.num_updates == steps
    assert_close_tensors(ema.unit.averaged_state_dict(), expected["ema"], prefix="net.")
    for got, want in zip(module.net.parameters(), expected["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    evaluated = [r for r in trainer.state.log_history if "eval_loss_ema" in r]
    assert len(evaluated) == 1 and evaluated[0]["step"] == steps


def test_resume_reloads_the_ema_saved_beside_the_checkpoint(tmp_path):
    steps, stop = 8, 4
    config = keel_config(steps, tmp_path / "unused")
    whole_ema = EMA(0.9, dynamic_decay=True)
    train(tmp_path / "whole", Regression(make_net()), config, steps, [whole_ema])

    first_ema = EMA(0.9, dynamic_decay=True)
    train(tmp_path / "run", Regression(make_net()), config, stop, [first_ema], save_strategy="steps",
          save_steps=stop)
    assert (tmp_path / "run" / f"checkpoint-{stop}" / "keel_ema.safetensors").is_file()
    resumed_ema = EMA(0.9, dynamic_decay=True)
    train(tmp_path / "run", Regression(make_net()), config, steps, [resumed_ema],
          resume=str(tmp_path / "run" / f"checkpoint-{stop}"), ignore_data_skip=True, start=stop)
    assert resumed_ema.unit.num_updates == steps
    for name, value in whole_ema.unit.shadow.items():
        torch.testing.assert_close(resumed_ema.unit.shadow[name], value, rtol=0, atol=0)

    missing = tmp_path / "run" / f"checkpoint-{stop}" / "keel_ema.safetensors"
    missing.unlink()
    with pytest.raises(KeelError, match="keel_ema.safetensors"):
        train(tmp_path / "run", Regression(make_net()), config, steps, [EMA(0.9)],
              resume=str(tmp_path / "run" / f"checkpoint-{stop}"), ignore_data_skip=True, start=stop)


def test_swa_sets_keel_trains_lr_phase(tmp_path):
    """SWA with its own LR: from the phase start the LR anneals from the schedule's to swa.lr, update by update as
    keel train applies it, and the mean counts the updates of the phase."""
    steps, start = 10, 6
    swa = {"start": start, "lr": 0.01, "anneal_steps": 2, "bn_update": False, "evaluate": False}
    config = keel_config(steps, tmp_path / "keel", swa={"enabled": True, **swa})
    expected = keel_run(config, make_net())
    recorder, average = Recorder(), SWA(**swa, apply_at_end=False)
    train(tmp_path / "hf", Regression(make_net()), config, steps, [recorder, average, Clip(max_norm=1.0)])
    assert recorder.lrs == pytest.approx(expected["lrs"], rel=1e-12, abs=0)
    assert recorder.lrs[-1] == pytest.approx(0.01) and average.unit.num_updates == steps - start


class FirstLayer(TrainerCallback):
    """The first layer's weight after every update."""

    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(model.net[0].weight.detach().clone())


def test_unfreeze_at_trains_the_frozen_layer_from_that_step_as_keel_train(tmp_path):
    """optimizer.freeze with optimizer.unfreeze_at through keel_optimizers: the first layer trains from update
    unfreeze_at on, and the weights equal keel train's; a resume past the unfreeze step trains it at once."""
    steps, stop = 8, 5
    config = keel_config(steps, tmp_path / "keel", optimizer=FROZEN_OPTIMIZER)
    expected = keel_run(config, make_net())

    module, first = Regression(make_net()), FirstLayer()
    initial = module.net[0].weight.detach().clone()
    train(tmp_path / "hf", module, config, steps, [Clip(max_norm=1.0), first])
    assert_trains_from_the_unfreeze_step(first.weights, initial)
    for got, want in zip(module.net.parameters(), expected["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)

    train(tmp_path / "run", Regression(make_net()), config, stop, [Clip(max_norm=1.0)], save_strategy="steps",
          save_steps=stop)
    resumed = Regression(make_net())
    train(tmp_path / "run", resumed, config, steps, [Clip(max_norm=1.0)],
          resume=str(tmp_path / "run" / f"checkpoint-{stop}"), ignore_data_skip=True, start=stop)
    for a, b in zip(module.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_skips_the_update_and_holds_schedule_and_ema(tmp_path):
    steps = 6
    config = keel_config(steps, tmp_path / "unused")
    module, recorder, guard, ema = Regression(make_net(), poison={2: float("nan")}), Recorder(), NonFinite(), EMA(0.9)
    ratio = UpdateRatio()
    trainer = train(tmp_path, module, config, steps, [recorder, guard, ema, ratio])
    assert guard.skipped == 1 and ema.unit.num_updates == steps - 1
    assert recorder.lrs[3] == recorder.lrs[2]  # the schedule held its position over the skipped update
    assert all(torch.isfinite(p).all() for p in module.parameters())
    history = trainer.state.log_history
    assert {"skipped": 1, "step": 3} in history
    ratios = [r for r in history if "update_ratio" in r]
    assert len(ratios) == steps - 1 and set(ratios[0]["update_ratio"]) == {"net.0.weight", "net.2.weight"}


def test_checkpoint_average_at_train_end(tmp_path):
    steps = 6
    config = keel_config(steps, tmp_path / "unused")
    module = Regression(make_net())
    train(tmp_path, module, config, steps, [CheckpointAverage(last=2)], save_strategy="steps", save_steps=2)
    from keel.safetensors_io import SafetensorsReader

    saved = []
    for step in (4, 6):
        with SafetensorsReader(tmp_path / f"checkpoint-{step}" / "model.safetensors") as reader:
            saved.append({name: reader.read(name) for name in reader.tensors})
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, (saved[0][name] + saved[1][name]) / 2, rtol=1e-12, atol=1e-14)
    assert (tmp_path / "averaged.safetensors").is_file()


def test_an_epoch_is_the_trainers_count_of_updates_and_needs_a_sized_loader(tmp_path):
    """7 batches with 2 accumulated: the Trainer steps after batches 2, 4, 6 and the epoch's last, 4 updates an
    epoch (not max_steps / the Trainer's rounded-up epoch count); an unsized loader has no epoch: an error."""
    steps = 6
    config = keel_config(steps, tmp_path / "unused")
    polyak, ema = Polyak(start="1ep", evaluate=False), EMA(0.9, half_life="1ep", start=0, evaluate=False)
    train(tmp_path / "sized", Regression(make_net()), config, steps, [polyak, ema], dataset=SizedBatches(7),
          gradient_accumulation_steps=2)
    assert polyak.start == 4 and polyak.unit.num_updates == steps - 4
    assert ema.unit.half_life == 4
    with pytest.raises(KeelError, match="polyak.start: '1ep' is in epochs, but a train_dataloader without a "
                                        "length has no epoch"):
        train(tmp_path / "unsized", Regression(make_net()), config, steps, [Polyak(start="1ep")])


def test_clip_refuses_the_trainers_own_clipping(tmp_path):
    config = keel_config(4, tmp_path / "unused")
    with pytest.raises(KeelError, match="max_grad_norm"):
        train(tmp_path, Regression(make_net()), config, 4, [Clip()], max_grad_norm=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_trainer_callbacks_skip_average_and_evaluate(tmp_path):
    steps = 8
    config = keel_config(steps, tmp_path / "unused")
    module, recorder, guard, ema = Regression(make_net(), poison={3: float("nan")}), Recorder(), NonFinite(), EMA(0.9)
    trainer = train(tmp_path, module, config, steps, [recorder, guard, ema, Clip(max_norm=1.0)], use_cpu=False,
                    eval_strategy="steps", eval_steps=steps)
    assert all(t.device.type == "cuda" for t in ema.unit.shadow.values())
    assert guard.skipped == 1 and ema.unit.num_updates == steps - 1 and recorder.lrs[4] == recorder.lrs[3]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any("eval_loss_ema" in r for r in trainer.state.log_history)
