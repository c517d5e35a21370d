"""Every bad input found by fuzzing ``keel train`` (issue 10): one line on stderr naming the key, exit code 2.

Run in-process through ``run_keel_train`` (tests/cli/cli_runner.py): everything but the training loop is real.
"""

from __future__ import annotations

import pytest

from keel import rundir
from keel.cli.main import main

from cli_runner import run_keel_train  # pytest's prepend import mode puts this folder on sys.path

LENGTH_KEYS = ["schedule.warmup", "ema.start", "ema.every", "ema.half_life", "polyak.start", "polyak.every",
               "swa.start", "swa.every", "swa.anneal_steps", "snapshot.cycle"]
SMALL = ["recipe=baseline", "device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
         "model.block_size=16", "data.batch_size=2", "data.eval_tokens=256"]
TECHNIQUE_ON = {"ema": "ema.enabled=true", "polyak": "polyak.enabled=true", "swa": "swa.enabled=true",
                "snapshot": "snapshot.enabled=true"}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "afile").write_text("x\n")
    (tmp_path / "short.txt").write_text("keel " * 600)
    (tmp_path / "not_utf8.yaml").write_bytes(b"seed: \xff\xfe\n")
    (tmp_path / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "nested.yaml").write_text("task_args: " + "[" * 100 + "]" * 100 + "\n")
    (tmp_path / "anchors.yaml").write_text("task_args: &a {b: *a}\n")
    (tmp_path / "small.yaml").write_text("max_steps: 7\nthreads: 1\ndevice: cpu\nmodel: {n_layer: 1, n_embd: 16, "
                                         "n_head: 2, block_size: 16}\ndata: {batch_size: 2, eval_tokens: 256}\n")
    return tmp_path


BAD = {
    "control character": (["seed=\x01"], "seed: value '\\x01' is not valid YAML (unacceptable character"),
    "deeply nested YAML": (["deep.yaml"], "config file 'deep.yaml' is nested too deeply"),
    "nested deeper than 64": (["nested.yaml"], "config file 'nested.yaml' is nested too deeply"),
    "a recursive anchor": (["anchors.yaml"], "contains itself"),
    "not UTF-8": (["not_utf8.yaml"], "config file 'not_utf8.yaml' is not UTF-8 text (byte 6 is b'\\xff')"),
    "huge seed": (["seed=99999999999999999999999"], "seed: Input should be less than 4294967296"),
    "negative seed": (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    "huge block_size": (["model.block_size=99999999999"], "model.block_size: Input should be less than or equal"),
    "block longer than the data": (["model.block_size=1000000"], "model.block_size: 1000000 is too long for the "),
    "a validation split shorter than a window": (["data.source=short.txt", "data.val_fraction=0.002"],
                                                 "data.val_fraction: 0.002 leaves 6 validation tokens"),
    "huge n_embd": (["model.n_embd=100000000000"], "model.n_embd: Input should be less than or equal to 65536"),
    "huge batch": (["data.batch_size=100000000000"], "data.batch_size: Input should be less than or equal"),
    "billion layers": (["model.n_layer=1e9"], "model.n_layer: Input should be"),
    "billion layers, an int": (["model.n_layer=1000000000"], "model.n_layer: Input should be less than or equal"),
    "too many threads": (["threads=99999999"], "threads: 99999999 threads is more than this machine runs well"),
    "huge grad_accum": (["grad_accum=99999999999"], "grad_accum: Input should be less than or equal to 65536"),
    "huge max_steps": (["max_steps=99999999999999"], "max_steps: Input should be less than or equal"),
    "endless sample": (["sample.tokens=1000000000"], "sample.tokens: Input should be less than or equal to 65536"),
    "--out at a file": (["--out", "afile"], "out_dir: 'afile' is a file"),
    "--out under /proc": (["--out", "/proc/keel-test-run"], "out_dir: cannot use '/proc/keel-test-run'"),
    "--out with a 300-character name": (["--out", "a" * 300], "(File name too long, ENAMETOOLONG)"),
    "--out below a file": (["--out", "afile/run"], "out_dir: cannot use 'afile/run'"),
    "an empty out_dir": (["out_dir="], "out_dir: '' is not a path"),
    "lr at the top level": (["lr=1e-3"], "unknown key 'lr'; did you mean 'optimizer.lr'?"),
    "warmup at the top level": (["warmup=5"], "did you mean 'schedule.warmup'?"),
    "n_layer at the top level": (["n_layer=2"], "did you mean 'model.n_layer'?"),
    "heads that do not divide": (["model.n_head=3"], "model.n_head: 3 does not divide model.n_embd: 16"),
    "two config files": (["small.yaml", "afile"], "'afile' is not key=value, and 'small.yaml' is the config file"),
    "unknown option": (["--bogus"], "keel train: error: unrecognized arguments: --bogus; see keel train --help"),
    "--out without its value": (["--out"], "keel train: error: argument --out: expected one argument"),
    **{f"{key}=1e400ep": ([TECHNIQUE_ON.get(key.split(".")[0], "seed=1"), f"{key}=1e400ep"], f"{key}: '1e400ep' is")
       for key in LENGTH_KEYS},
    **{f"{key}=1e400Ttok": ([TECHNIQUE_ON.get(key.split(".")[0], "seed=1"), f"{key}=1e400Ttok"], f"{key}:")
       for key in LENGTH_KEYS},
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_naming_the_key_and_exit_code_2(workdir, name):
    argv, needle = BAD[name]
    outcome = run_keel_train([*SMALL, *argv], workdir)
    assert outcome.code == 2, f"accepted: {argv!r}"
    assert needle in outcome.stderr
    assert outcome.stderr.startswith("keel train: error: ")
    assert "model: model." not in outcome.stderr  # the key is not repeated
    assert not outcome.trainers


def test_a_config_that_cannot_fit_in_memory_says_how_much_it_needs(workdir):
    outcome = run_keel_train([*SMALL, "model.n_layer=64", "model.n_embd=4096", "data.batch_size=8"], workdir,
                         memory=23 << 30)
    assert outcome.code == 2
    assert "keel train: error: model: about 194 GiB needed (parameters 48 GiB, gradients 48 GiB, optimizer state " \
        "96 GiB, activations 2.0 GiB" in outcome.stderr
    assert "23 GiB available on cpu; allowed: a smaller model.n_layer/n_embd/block_size or data.batch_size" \
        in outcome.stderr
    assert not (workdir / "runs").exists()  # refused before anything was built or written


def test_the_memory_check_uses_what_this_machine_has(workdir):
    assert run_keel_train([*SMALL, "--out", "fits"], workdir, memory=None).code == 0
    outcome = run_keel_train([*SMALL, "model.n_layer=1024", "model.n_embd=65536", "--out", "huge"], workdir,
                             memory=None)
    assert outcome.code == 2 and "TiB needed (parameters" in outcome.stderr and " available on cpu" in outcome.stderr


def test_huge_learning_rate_is_accepted_and_sampling_survives_it(workdir):
    outcome = run_keel_train([*SMALL, "optimizer.lr=1e18", "--out", "lr"], workdir)  # diverging is not bad input
    assert outcome.code == 0


@pytest.mark.parametrize("order", [
    ["small.yaml", "--out", "run", "seed=5", "--quiet"],
    ["--out", "run", "small.yaml", "seed=5"],
    ["seed=5", "--quiet", "small.yaml", "--out", "run"],
    ["--quiet", "seed=4", "--out=run", "seed=5", "small.yaml"],
])
def test_options_and_overrides_mix_in_any_order(workdir, order):
    outcome = run_keel_train(order, workdir)
    assert outcome.code == 0, outcome.stderr
    config = outcome.trainers[0].config
    assert config.seed == 5 and config.max_steps == 7 and config.out_dir == "run"  # overrides in order, after the file
    assert outcome.trainers[0].run_dir.name == "run"


def test_other_commands_still_refuse_stray_arguments(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["schedule", "cosine", "--bogus"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == "keel schedule: error: unrecognized arguments: --bogus; see keel schedule --help\n"


def test_average_last_more_than_the_run_kept_names_how_many_exist(tmp_path, capsys):
    import torch

    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        rundir.write_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {"step": step}, {"step": step})
    assert main(["average", str(tmp_path / "run"), "--last", "5", "--out", str(tmp_path / "avg.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "last: 5 checkpoints asked for, but only 2 exist" in err and "allowed: --last 2 or fewer" in err
    assert not (tmp_path / "avg.safetensors").exists()
    assert main(["average", str(tmp_path / "run"), "--last", "2", "--out", str(tmp_path / "avg.safetensors")]) == 0
