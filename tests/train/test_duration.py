"""One clock: the run length and every interval are typed times compared with what the trainer counted, and
lengths a schedule needs in steps resolve to the first step at which the counted clock reaches them."""

import pytest
import torch

from keel.config import load_config
from keel.errors import KeelError
from keel.techniques import Callback
from keel.train import train

# 32 windows of 64 tokens: 2,048 tokens a step at full length. Truncating sequence-length warmup from 8 tokens
# over the first 30 steps trains 256, 512, ... tokens a step while it lasts.
TRUNCATED = ["recipe=baseline", "threads=1", "device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
             "model.block_size=64", "data.batch_size=32", "data.eval_tokens=2048", "sample.tokens=0",
             "eval_interval=1000", "checkpoint_interval=1000", "seq_warmup.enabled=true", "seq_warmup.start=8",
             "seq_warmup.duration=30", "seq_warmup.keep_tokens_per_step=false"]
DIGITS = ["task=digits", "threads=1", "device=cpu", "data.batch_size=64", "checkpoint_interval=1000"]


class Lengths(Callback):
    name = "lengths"

    def on_run_start(self, trainer):
        self.total_steps = trainer.total_steps


def step_records(result):
    return [r for r in result["history"] if "grad_norm" in r]


def test_a_warmup_in_tokens_peaks_where_the_counted_tokens_reach_it(tmp_path):
    """schedule.warmup: 100ktok peaks at the first step whose counted tokens (logged before the step) reach 100,000,
    not at 100,000 / 2,048 = 49 steps; duration: 110ktok ends at the first step at which they reach 110,000."""
    lengths = Lengths()
    config = load_config(None, TRUNCATED + ["duration=110ktok", "schedule={name: constant, warmup: 100ktok}",
                                            "optimizer.lr=1e-3", f"out_dir={tmp_path / 'r'}"])
    result = train(config, callbacks=[lengths], quiet=True)
    records = step_records(result)
    assert [r["step"] for r in records] == list(range(len(records)))
    tokens = [r["tokens"] for r in records]
    assert tokens[:3] == [0, 256, 512]  # the counted clock: 32 rows of 8 tokens in the first steps
    peak = next(i for i, r in enumerate(records) if r["lr"] == pytest.approx(1e-3, rel=1e-12))
    assert peak == next(i for i, t in enumerate(tokens) if t >= 100_000) and peak > 49
    assert all(r["lr"] < 1e-3 * (1 - 1e-9) for r in records[:peak])
    assert tokens[-1] < 110_000 <= result["tokens"]  # the last step is the first to reach the duration
    assert lengths.total_steps == result["step"]  # projected exactly: the schedule knew the run's length


def test_duration_in_epochs_trains_exactly_two_epochs_of_digits(tmp_path):
    """1,617 training images, 64 a step: two epochs are complete at the first step with 3,234 examples counted
    (step 51); evaluations every epoch fire as the clock passes 1,617 and 3,234 examples."""
    result = train(load_config(None, DIGITS + ["duration=2ep", "eval_interval=1ep", f"out_dir={tmp_path / 'r'}"]),
                   quiet=True)
    train_size = 1797 - round(1797 * 0.1)
    assert result["examples"] == 51 * 64 >= 2 * train_size > 50 * 64
    assert result["step"] == 51
    assert [r["step"] for r in result["history"] if "val_loss" in r] == [26, 51]  # 26 x 64 >= 1617 > 25 x 64
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "duration: 2ep" in config and "max_steps: null" in config


def test_run_length_in_steps_keeps_max_steps(tmp_path):
    config = load_config(None, ["duration=2000"])
    assert (config.max_steps, config.duration) == (2000, None)
    assert load_config(None, []).max_steps == 600
    with pytest.raises(KeelError, match="duration: '3ep' and max_steps: 100 are both given; allowed: one of the two"):
        load_config(None, ["duration=3ep", "max_steps=100"])
    with pytest.raises(KeelError, match="duration: '30%' is a share of the run itself"):
        load_config(None, ["duration=30%"])
    with pytest.raises(KeelError, match="eval_interval: '0ep' is not an interval"):
        load_config(None, ["eval_interval=0ep"])


def test_a_later_layer_replaces_the_other_spelling_of_the_run_length(tmp_path):
    from keel.config import merge, parse_overrides, validate

    config = validate(merge({"duration": "3ep", "max_steps": None}, parse_overrides(["max_steps=10"])))
    assert (config.max_steps, config.duration) == (10, None)
    config = validate(merge({"max_steps": 600}, parse_overrides(["duration=5Mtok"])))
    assert config.max_steps is None and str(config.duration) == "5Mtok"


def test_epochs_on_a_batch_function_are_an_error_naming_the_key(tmp_path):
    from keel.tasks import PlainTask, Task

    class NoEpochs(PlainTask):
        def epoch(self):
            return None

    def batches(index):
        g = torch.Generator().manual_seed(index)
        return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)

    config = load_config(None, ["duration=2ep", "threads=1", "device=cpu", f"out_dir={tmp_path / 'r'}"])
    task = NoEpochs(torch.nn.Linear(3, 1), batches, batches, loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(KeelError, match="duration: '2ep' is in epochs, but task 'python' has no epoch"):
        train(config, task=task, quiet=True)
    assert not (tmp_path / "r").exists()
    assert isinstance(task, Task)


def _batches(index):
    g = torch.Generator().manual_seed(index)
    x = torch.randn(8, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def test_a_batch_function_has_no_epoch(tmp_path):
    """Batches from a function have no epoch: duration=3ep is refused, naming the key, before anything is
    written (it trained 3 one-batch 'epochs' before); a task that sets batches_per_epoch has one."""
    from keel.tasks import PlainTask

    config = load_config(None, ["duration=3ep", "threads=1", "device=cpu", f"out_dir={tmp_path / 'r'}"])
    with pytest.raises(KeelError) as error:
        train(config, model=torch.nn.Linear(4, 2), train_data=_batches, val_data=_batches, quiet=True)
    assert str(error.value) == ("duration: '3ep' is in epochs, but task 'python' has no epoch; allowed: steps, "
                                "tokens, examples or a share of the run")
    assert not (tmp_path / "r").exists()
    task = PlainTask(torch.nn.Linear(4, 2), _batches, _batches)
    task.batches_per_epoch = 5
    lengths = Lengths()
    train(load_config(None, ["duration=2ep", "threads=1", "device=cpu", f"out_dir={tmp_path / 's'}"]),
          callbacks=[lengths], task=task, quiet=True)
    assert lengths.total_steps == 10


def test_a_duration_beyond_the_run_bound_is_refused_before_the_run_directory(tmp_path):
    from keel.train.loop import Trainer

    config = load_config(None, DIGITS + ["duration=1e14ex", f"out_dir={tmp_path / 'r'}"])  # 1.6e12 steps of 64
    with pytest.raises(KeelError, match=r"^duration: '1e14ex' is 1,562,500,000,000 steps for task 'digits'; "
                                        r"allowed: a run of at most 1e\+12 steps"):
        Trainer(config, quiet=True)
    assert not (tmp_path / "r").exists()


def test_milestones_as_shares_of_a_run_in_epochs(tmp_path):
    """docs/schedules.md's `milestones: [30%, 60%]` with a run in epochs: checked at load, placed by the trainer
    (3 epochs of 1,617 digits at 64 a step: 76 steps; 30% and 60% of 4,851 examples are reached at 23 and 46)."""
    from keel.train.loop import Trainer

    config = load_config(None, DIGITS + ["duration=3ep", "schedule={name: multistep, milestones: [30%, 60%]}",
                                         f"out_dir={tmp_path / 'r'}"])
    trainer = Trainer(config, quiet=True)
    assert trainer.total_steps == 76 and trainer.schedule.params["milestones"] == (23, 46)
