"""The trainer trains whatever a task hands it: the built-in digits task, a user's task named by import path, and
plain PyTorch objects passed to ``keel.train``; bad tasks are one-line errors with nothing written."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from keel.cli.main import main
from keel.config import load_config
from keel.data import IndexSampler
from keel.train import train

HERE = Path(__file__).parent
DIGITS = ["task=digits", "device=cpu", "threads=1", "max_steps=300", "eval_interval=300", "checkpoint_interval=300"]
USER = ["task=user_task:make", "device=cpu", "threads=1", "max_steps=150", "eval_interval=75", "checkpoint_interval=75",
        "data.batch_size=16", "optimizer.lr=3e-2", "schedule.warmup=5"]


@pytest.fixture(autouse=True)
def user_module_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_digits_reaches_95_percent_validation_accuracy(tmp_path):
    result = train(load_config(None, DIGITS + [f"out_dir={tmp_path / 'r'}"]), quiet=True)
    assert result["val_accuracy"] >= 0.95
    assert result["val_loss"] < 0.3
    evals = [r for r in result["history"] if "val_loss" in r]
    assert {"val_loss", "val_accuracy", "train_eval_loss", "train_eval_accuracy"} <= evals[-1].keys()
    assert result["examples"] == 300 * 32  # the clock counts examples seen, not steps x a constant
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_user_task_by_import_path_trains_and_records_itself(tmp_path):
    run = tmp_path / "r"
    result = train(load_config(None, USER + ["task_args.hidden=16", f"out_dir={run}"]), quiet=True)
    train_losses = [r["loss"] for r in result["history"] if "grad_norm" in r]
    assert np.mean(train_losses[-10:]) < np.mean(train_losses[:10]) - 0.2
    assert "val_accuracy" in result
    text = (run / "config.yaml").read_text()
    assert "task: user_task:make" in text and "hidden: 16" in text


def test_plain_pytorch_objects_through_train(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    config = load_config(None, ["max_steps=150", "eval_interval=75", "device=cpu", "threads=1", "data.batch_size=32",
                                "optimizer.lr=1e-2", f"out_dir={tmp_path / 'r'}"])
    result = train(config, model=model, train_data=data, val_data=data, loss_fn=nn.functional.cross_entropy,
                   quiet=True)
    assert result["val_accuracy"] > 0.9
    assert "task: python" in (tmp_path / "r" / "config.yaml").read_text()
    assert result["examples"] == 150 * 32


def test_a_batch_function_instead_of_a_dataset(tmp_path):
    def batches(index):
        g = torch.Generator().manual_seed(index)
        x = torch.randn(16, 3, generator=g)
        return x, x.sum(dim=1, keepdim=True)

    config = load_config(None, ["max_steps=100", "eval_interval=100", "device=cpu", "threads=1", "optimizer.lr=5e-2",
                                f"out_dir={tmp_path / 'r'}"])
    result = train(config, model=nn.Linear(3, 1), train_data=batches, val_data=batches,
                   loss_fn=nn.functional.mse_loss, quiet=True)
    assert result["val_loss"] < 1.0 and "val_accuracy" not in result


def test_index_sampler_is_a_permutation_per_epoch_and_ranks_split_the_global_batch():
    sampler = IndexSampler(10, 4, seed=3)
    stream = np.concatenate([sampler.indices(i) for i in range(5)])  # 20 items: two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    two = IndexSampler(10, 2, seed=3)
    for i in range(5):
        assert np.array_equal(np.concatenate([two.indices(i, 0, 2), two.indices(i, 1, 2)]), sampler.indices(i))


@pytest.mark.parametrize("override, message", [
    ("task=no_such_module:make", "module 'no_such_module' does not import"),
    ("task=user_task:missing", "has no attribute 'missing'"),
    ("task=user_task:NOT_CALLABLE", "not callable"),
    ("task=user_task:not_a_task", "returned a Linear; allowed: a keel.tasks.Task"),
    ("task=user_task:frozen", "no trainable parameters"),
    ("task=user_task:wrong_shape", "the first training batch fails in the model or loss"),
    ("task=user_task:vector_loss", "the loss has shape (16,); allowed: a scalar"),
    ("task=not a path", "is not a task"),
    ("task_args.colour=red", "task_args: got an unexpected keyword argument 'colour'"),
    ("init_from=nowhere/at/all", "init_from: 'nowhere/at/all' does not exist"),
])
def test_bad_tasks_are_one_line_errors_and_write_nothing(tmp_path, capsys, override, message):
    run = tmp_path / "r"
    args = [*USER, override] if override.startswith(("task_args", "init_from")) else [*USER[1:], override]
    assert main(["train", *args, "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_duplicate_callback_names_are_refused(tmp_path):
    from keel.techniques import Callback

    class Probe(Callback):
        name = "probe"

    with pytest.raises(Exception, match="two callbacks are named 'probe'"):
        train(load_config(None, USER + [f"out_dir={tmp_path / 'r'}"]), callbacks=[Probe(), Probe()], quiet=True)


def test_batch_event_sees_and_replaces_each_micro_batch(tmp_path):
    from keel.techniques import Callback

    class HalfBatch(Callback):
        name = "half"
        seen = 0

        def on_batch(self, trainer, batch):
            self.seen += 1
            x, y = batch
            return x[:8], y[:8]

    probe = HalfBatch()
    result = train(load_config(None, USER + ["max_steps=10", "grad_accum=2", f"out_dir={tmp_path / 'r'}"]),
                   callbacks=[probe], quiet=True)
    assert probe.seen == 20
    assert result["examples"] == 10 * 2 * 8  # the clock counts what was trained on


def test_a_registered_technique_gets_a_config_block_and_a_callback(tmp_path):
    from pydantic import BaseModel, ConfigDict

    from keel.techniques import Callback, register_technique, techniques

    class CountConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        every: int | None = None

    class Count(Callback):
        name = "count_steps"

        def __init__(self, block):
            self.block, self.steps = block, 0

        def on_step_end(self, trainer):
            self.steps += 1

        def on_run_end(self, trainer, summary):
            summary["counted"] = self.steps

    register_technique("count_steps", CountConfig, lambda b: Count(b) if b.every else None)
    try:
        config = load_config(None, USER + ["max_steps=7", "count_steps.every=1", f"out_dir={tmp_path / 'r'}"])
        assert train(config, quiet=True)["counted"] == 7
        with pytest.raises(Exception, match="count_steps.colour"):
            load_config(None, ["count_steps.colour=1"])
    finally:
        techniques().pop("count_steps")


def test_no_import_cycles_between_keel_packages():
    """Module-level imports between keel's subpackages form no cycle (imports inside functions are lazy)."""
    import ast

    root = Path(__file__).resolve().parents[2] / "src" / "keel"
    edges: dict[str, set[str]] = {}

    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])

    for path in root.rglob("*.py"):
        module = "keel." + ".".join(path.relative_to(root).with_suffix("").parts)
        source = package(module.removesuffix(".__init__"))
        for node in ast.parse(path.read_text()).body:  # top level only
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keel.") and not (
                    isinstance(getattr(node, "parent", None), ast.If)):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("keel.")]
            for target in targets:
                if package(target) != source:
                    edges.setdefault(source, set()).add(package(target))

    def reach(start, node, seen):
        for nxt in edges.get(node, ()):
            if nxt == start:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reach(start, nxt, seen):
                    return True
        return False

    cyclic = sorted(p for p in edges if reach(p, p, set()))
    assert not cyclic, {p: sorted(edges[p]) for p in cyclic}


def test_progress_lines_without_a_terminal(tmp_path, capsys):
    train(load_config(None, USER + ["max_steps=20", "progress_interval=10", f"out_dir={tmp_path / 'r'}"]))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ") and "ETA" in line]
    assert [line.split()[1] for line in lines] == ["1/20", "10/20", "20/20"]
    assert "loss" in lines[-1] and "lr" in lines[-1]


def test_average_and_ensemble_rebuild_the_digits_task(tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        train(load_config(None, ["task=digits", "device=cpu", "threads=1", "max_steps=60", "eval_interval=30",
                                 "checkpoint_interval=30", f"seed={seed}", f"out_dir={run}"]), quiet=True)
    capsys.readouterr()
    assert main(["average", str(runs[0]), "--last", "2", "--out", str(tmp_path / "avg.safetensors"), "--eval"]) == 0
    out = capsys.readouterr().out
    assert "(average)" in out and "step_00000060" in out
    assert main(["ensemble", *map(str, runs), "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 180  # one target per validation image
    assert result["ensemble_val_loss"] <= result["mean_member_val_loss"] + 1e-9
