"""Launching: two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1) equal one node of the same world
size; bad input to ``keel train --nproc`` is one line and exit code 2 with nothing started; LR scaling by the
global batch is applied, printed and recorded."""

import subprocess

import pytest
import yaml
from ddp_helpers import (
    TINY_LM,
    assert_bitwise_same_run,
    free_port,
    keel_in_ranks,
    run_records,
    step_records,
    subprocess_env,
    task_modules_importable,  # noqa: F401  (an autouse fixture)
    torchrun_command,
)

from keel.cli.main import main
from keel.train.launch import available_cores

STEPS = ["max_steps=12", "eval_interval=6", "checkpoint_interval=6"]


def test_two_nodes_with_c10d_rendezvous_equal_one_node_of_the_same_world_size(tmp_path):
    one_node = tmp_path / "one_node"
    keel_in_ranks(2, "train", *TINY_LM, *STEPS, "--out", str(one_node), "--quiet")

    run, port = tmp_path / "two_nodes", free_port()
    node = torchrun_command("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "keel-test", "--max-restarts", "0",
                            "-m", "keel", "train", *TINY_LM, *STEPS, "--out", str(run))
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = []
    for proc in nodes:
        try:
            outputs.append(proc.communicate(timeout=240))
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], outputs
    printed = "".join(out for out, _ in outputs)
    assert printed.count("distributed: 2 ranks (ddp, gloo)") == 1  # rank 0 speaks, whichever node holds it
    assert_bitwise_same_run(one_node, run)


def test_nproc_beyond_the_cores_is_one_line_and_exit_2(tmp_path, capsys):
    cores = available_cores()
    assert main(["train", *TINY_LM, "--nproc", str(cores + 1), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == (f"keel train: error: --nproc: {cores + 1} processes on a machine with {cores} CPU cores; "
                   f"allowed: 1 to {cores} (one process per CPU core; more machines: torchrun --nnodes, see "
                   "docs/distributed.md)\n")
    assert not (tmp_path / "r").exists()


def test_a_global_batch_the_ranks_do_not_divide_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", *TINY_LM, "data.global_batch_size=15", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "data.global_batch_size: 15 does not divide into 2 processes x grad_accum 1; allowed: a multiple of 2" \
        in err
    assert not (tmp_path / "r").exists()


def test_fsdp_where_torch_lacks_it_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import torch.distributed.fsdp

    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")
    assert main(["train", *TINY_LM, "strategy=fsdp", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strategy: fsdp needs FSDP2" in err and "allowed here: ddp" in err


def test_fsdp_with_a_whole_model_average_is_refused(tmp_path, capsys):
    assert main(["train", *TINY_LM, "strategy=fsdp", "ema.enabled=true", "--nproc", "2",
                 "--out", str(tmp_path / "r")]) == 2
    assert "strategy: fsdp shards the model, and ema keep a whole copy of it" in capsys.readouterr().err


def test_nproc_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *TINY_LM, "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--nproc: this process already runs under torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("rule, factor", [("linear", 2.0), ("sqrt", 2.0**0.5)])
def test_lr_scaling_multiplies_every_lr_by_the_global_batch_ratio(tmp_path, capsys, rule, factor):
    base = [*TINY_LM, *STEPS, "schedule.warmup=2"]
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    assert main(["train", *base, "--out", str(plain), "--quiet"]) == 0
    assert main(["train", *base, f"lr_scaling.rule={rule}", "lr_scaling.base_batch=8", "--out", str(scaled)]) == 0
    assert f"lr_scaling: {rule} rule, global batch 16 / base batch 8: every LR x {factor:.6g} (optimizer.lr 0.003 " \
           f"-> {0.003 * factor:.6g})" in capsys.readouterr().out
    lrs = [r["lr"] for r in step_records(scaled)]
    assert lrs == pytest.approx([r["lr"] * factor for r in step_records(plain)], rel=1e-12)
    # What the scaling resolved to is the run's record, not a change to its config.
    assert yaml.safe_load((scaled / "config.yaml").read_text())["lr_scaling"] == {"rule": rule, "base_batch": 8}
    record = run_records(scaled)[0]
    assert record["global_batch"] == 16 and record["lr_scaling"] == {
        "rule": rule, "base_batch": 8, "factor": pytest.approx(factor), "lr": pytest.approx(0.003 * factor)}
    # Resume computes it again from the run's own global batch: the same values, so nothing new is recorded.
    assert main(["train", "--resume", str(scaled), "max_steps=14", "resume_policy=keep_schedule", "--quiet"]) == 0
    assert run_records(scaled) == [record]


def test_lr_scaling_follows_the_world_size(tmp_path):
    """data.batch_size is per rank: two ranks double the global batch, so the linear rule doubles the LR."""
    run = tmp_path / "two"
    keel_in_ranks(2, "train", *TINY_LM, *STEPS, "data.global_batch_size=null", "data.batch_size=8",
                  "lr_scaling.rule=linear", "lr_scaling.base_batch=8", "--out", str(run), "--quiet")
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    record = run_records(run)[0]
    assert record["world_size"] == 2 and record["global_batch"] == 16 and record["lr_scaling"]["factor"] == 2.0
    assert recorded["data"]["batch_size"] == 8
    assert max(r["lr"] for r in step_records(run)) == pytest.approx(2 * 0.003)
