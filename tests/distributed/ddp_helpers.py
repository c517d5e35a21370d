"""Helpers for the data-parallel tests: ranks as forked processes (keel already imported, so a 2-rank run costs
what its training costs; spawned instead once this process has initialised CUDA: tests/start_method.py), torchrun
launches as subprocesses, and comparisons of runs. (Not a conftest.py: other test modules import tests/conftest.py
by the name ``conftest``.)"""

import faulthandler
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  (heavy imports done once here, not in every forked rank: loss.png)
import pytest
import torch
import torch._dynamo  # noqa: F401  (DDP imports it when constructed)
from safetensors.torch import load_file

try:
    import sklearn.datasets  # noqa: F401  (task digits)
except ImportError:
    pass
from keel.rundir.metrics import read_metrics
from start_method import process_context

HERE = Path(__file__).resolve().parent
TASKS = HERE.parent / "tasks"

# A tiny GPT whose global batch (16 windows) is the same whatever the number of ranks; on the CPU (gloo), whatever the
# machine: the ranks are compared with one process, and two ranks cannot share one GPU.
TINY_LM = [
    "recipe=baseline",  # AdamW: Muon's bf16 Newton-Schulz is not bitwise stable across reduction orders
    "device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "data.global_batch_size=16", "data.eval_tokens=4096", "sample.tokens=0", "optimizer.lr=3e-3",
    "schedule.warmup=4", "schedule.min_lr=3e-4", "progress_interval=1000",
]


@pytest.fixture(autouse=True)
def task_modules_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TASKS))
    monkeypatch.syspath_prepend(str(HERE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, target, args, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(max(1, timeout - 5), exit=True, file=sys.__stderr__)  # where a hang is
    try:
        code = target(*args)
    except BaseException:  # noqa: BLE001 (report anything, then exit non-zero)
        traceback.print_exc(file=sys.__stderr__)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def start_ranks(world_size, target, *args, timeout=180):
    """Start ``target(*args)`` in ``world_size`` processes set up as torchrun sets up its ranks."""
    port, context = free_port(), process_context()
    procs = [context.Process(target=_rank_main, args=(rank, world_size, port, target, args, timeout))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def run_ranks(world_size, target, *args, timeout=180):
    """Run ``target(*args)`` in ``world_size`` forked ranks (see ``start_ranks``); their exit codes."""
    procs = start_ranks(world_size, target, *args, timeout=timeout)
    deadline = time.time() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def cli_main(*argv):
    from keel.cli.main import main

    return main(list(argv))


def keel_in_ranks(world_size, *argv, timeout=180):
    """``keel <argv>`` in ``world_size`` forked ranks; asserts that every rank succeeded."""
    codes = run_ranks(world_size, cli_main, *argv, timeout=timeout)
    assert codes == [0] * world_size, f"exit codes {codes}"


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TASKS), str(HERE), env.get("PYTHONPATH", "")])
    env.pop("OMP_NUM_THREADS", None)
    return env


def keel_command(*args):
    return [sys.executable, "-m", "keel", *args]


def torchrun_command(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def step_reached(metrics: Path, step: int, seen: list) -> bool:
    """Whether ``metrics`` has a record of ``step`` or later (read again only when it grew: the ranks need the
    CPU more than this poll does)."""
    try:
        size = metrics.stat().st_size
    except FileNotFoundError:
        return False
    if size == seen[0]:
        return False
    seen[0] = size
    return any(r.get("step", -1) >= step for r in read_metrics(metrics))


def kill_job_when_step_reached(cmd, run: Path, step: int, timeout: float = 120.0) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``run``'s metrics reach ``step``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env(),
                            start_new_session=True)
    metrics, seen = run / "metrics.jsonl", [-1]
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if step_reached(metrics, step, seen):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {step}: {proc.stderr.read().decode()}"


def kill_ranks_when_step_reached(world_size, argv, run: Path, step: int, timeout: float = 120.0) -> None:
    """Run ``keel <argv>`` in forked ranks and SIGKILL all of them once ``run``'s metrics reach ``step``."""
    procs = start_ranks(world_size, cli_main, *argv, timeout=timeout)
    metrics, seen = run / "metrics.jsonl", [-1]
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and all(proc.is_alive() for proc in procs):
            if step_reached(metrics, step, seen):
                for proc in procs:
                    os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        for proc in procs:
            if proc.is_alive() and time.time() >= deadline:
                proc.kill()
            proc.join()
    assert [proc.exitcode for proc in procs] == [-signal.SIGKILL] * world_size, f"the run ended before step {step}"


def step_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]


def run_records(run: Path) -> list[dict]:
    """What each start of the run resolved (world size, global batch, LR scaling, kernels)."""
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "run"]


def eval_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_run(a: Path, b: Path, rtol=2e-6, atol=2e-5):
    """Two runs that trained on the same global batches: the same logged losses (and clipping decisions) step by
    step, and the same final weights, within float32 reduction tolerance."""
    ra, rb = step_records(a), step_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    assert [r["clipped"] for r in ra] == [r["clipped"] for r in rb]
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([r[key] for r in ra], dtype=torch.float64),
                                   torch.tensor([r[key] for r in rb], dtype=torch.float64), rtol=rtol, atol=atol)
    ea, eb = eval_records(a), eval_records(b)
    assert [sorted(r) for r in ea] == [sorted(r) for r in eb]
    for x, y in zip(ea, eb):
        for key in x:
            if key.startswith(("val_", "train_eval_")):
                assert x[key] == pytest.approx(y[key], rel=rtol, abs=atol), key
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def assert_bitwise_same_run(a: Path, b: Path):
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in step_records(a)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in step_records(b)]
    assert eval_records(a) == eval_records(b)  # val_loss, train_eval_loss, val_loss_ema ...
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload))
