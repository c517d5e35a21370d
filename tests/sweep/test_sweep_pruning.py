"""The trial callback: a real Optuna pruner stops a keel run at an evaluation; under torch.distributed (gloo, two
processes) rank 0 alone reports to the trial and every rank gets its parameters and its prune decision."""

import json
import socket
from types import SimpleNamespace

import pytest
import torch.multiprocessing as mp

optuna = pytest.importorskip("optuna")

from keel.config import load_config  # noqa: E402
from keel.sweep.study import TrialCallback, _broadcast  # noqa: E402
from keel.train import train  # noqa: E402


def test_a_pruner_stops_the_run_at_an_evaluation(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss > 0 is pruned
    trial = study.ask()
    callback = TrialCallback(trial, "val_loss", pruning=True)
    config = load_config(None, ["task=digits", "max_steps=30", "eval_interval=10", "device=cpu", "threads=1"])
    summary = train(config, [callback], run_dir=tmp_path / "run", quiet=True)
    assert callback.pruned and callback.should_stop and summary["step"] == 10
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [10]


def test_stop_at_ends_the_run_there_with_a_checkpoint(tmp_path):
    config = load_config(None, ["task=digits", "max_steps=30", "eval_interval=10", "device=cpu", "threads=1"])
    summary = train(config, [TrialCallback(None, "val_loss", stop_at=7)], run_dir=tmp_path / "run", quiet=True)
    assert summary["step"] == 7 and (tmp_path / "run" / "checkpoints" / "step_00000007").is_dir()


class _Trial:
    """Stands in for an Optuna trial on rank 0: prunes from step 20 on, and remembers what it was told."""

    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append(step)

    def should_prune(self):
        return self.reported[-1] >= 20


def _rank_main(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = _broadcast(("trial", 3, {"optimizer.lr": 0.01}) if rank == 0 else None)
        trial = _Trial() if rank == 0 else None
        callback = TrialCallback(trial, "val_loss", pruning=True)
        stops = []
        for step in (10, 20, 30):
            callback.on_eval(SimpleNamespace(state=SimpleNamespace(step=step)), {"val_loss": 1.0 + rank})
            stops.append(callback.should_stop)
        result = {"params": list(params), "stops": stops, "reported": trial.reported if trial else None}
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_under_data_parallelism_rank_0_reports_and_the_decision_is_broadcast(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["params"] == rank1["params"] == ["trial", 3, {"optimizer.lr": 0.01}]
    assert rank0["stops"] == rank1["stops"] == [False, True, True]
    assert rank0["reported"] == [10, 20, 30] and rank1["reported"] is None
