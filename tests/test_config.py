"""Every bad-input case gets one clear line naming the key and what is allowed, exit code 2, before training."""

import pytest

from keel.cli.main import main
from keel.config import TrainConfig, describe_fields, load_config, parse_overrides
from keel.errors import KeelError


def run_cli(capsys, *argv):
    code = main(["train", *argv])
    err = capsys.readouterr().err
    return code, err


def test_defaults_validate():
    config = load_config()
    assert isinstance(config, TrainConfig)
    assert config.max_steps > 0 and config.seed == 1337 and config.out_dir is None
    assert config.recipe == "fast" and config.optimizer["name"] == "muon"  # the language model's default recipe
    digits = load_config(None, ["task=digits"])
    assert digits.recipe == "baseline" and digits.optimizer["name"] == "adamw"  # every other task's


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: baseline\nmax_steps: 50\nmodel:\n  n_layer: 2\noptimizer:\n  lr: 1.0e-3\n")
    config = load_config(path, ["model.n_embd=64", "optimizer.betas=[0.9, 0.99]"])
    assert config.max_steps == 50 and config.model.n_layer == 2 and config.model.n_embd == 64
    assert config.optimizer["lr"] == 1e-3 and config.optimizer["betas"] == [0.9, 0.99]
    assert config.optimizer["name"] == "adamw"  # merged key by key, not replaced


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["a.b.c=3", "a.d=true", "e=x"]) == {"a": {"b": {"c": 3}, "d": True}, "e": "x"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["model.n_layr=2"], "unknown key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["max_step=5"], "did you mean 'max_steps'?"),
        (["max_steps=abc"], "max_steps: Input should be a valid integer"),
        (["max_steps=-3"], "max_steps: Input should be greater than or equal to 1 (got -3)"),
        (["data.val_fraction=1.5"], "data.val_fraction: Input should be less than 1"),
        (["model.n_head=3"], "model.n_head: 3 does not divide model.n_embd: 128"),
        (["max_steps=20", "schedule.warmup=50"], "schedule.warmup"),
        (["data.source=no/such/file.txt"], "data.source: 'no/such/file.txt' does not exist; allowed: pydoc, stdlib, a text file"),
        (["optimizer.name=adamm"], "optimizer.name"),
        (["precision=fp8"], "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        (["device=tpu"], "device: 'tpu' is not a device; allowed: auto, cpu, cuda, cuda:N"),
        (["notakeyvalue"], "config file 'notakeyvalue' does not exist"),
        (["clip.mode=sometimes"], "clip.mode: Input should be 'norm', 'value', 'agc', 'percentile' or 'none'"),
        (["recipe=fastest"], "recipe: Input should be 'baseline', 'gpt-loop' or 'fast' (got 'fastest')"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, expected):
    code, err = run_cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("keel train: error: ")
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_bad_yaml_file(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: [1, 2\n")
    code, err = run_cli(capsys, str(path))
    assert code == 2 and "is not valid YAML" in err
    path.write_text("- 1\n- 2\n")
    code, err = run_cli(capsys, str(path))
    assert code == 2 and "holds a list; allowed: a mapping of config keys" in err


def test_existing_run_is_never_overwritten(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    code, err = run_cli(capsys, "max_steps=2", "--out", str(run))
    assert code == 2 and "already holds (part of) a run: metrics.jsonl" in err and "--resume" in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_resume_of_a_folder_that_is_no_run(capsys, tmp_path):
    code = main(["train", "--resume", str(tmp_path)])
    assert code == 2 and "is not a keel run directory" in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("max_steps", "seed", "out_dir", "model.n_layer", "data.source", "clip.max_norm", "grad_accum"):
        assert f"  {key} = " in out
    assert len(describe_fields()) > 30


def test_config_error_is_keel_error():
    with pytest.raises(KeelError, match="unknown key 'model.depth'"):
        load_config(None, ["model.depth=3"])


def test_tensorboard_without_the_package_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("torch")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        code, err = run_cli(capsys, "tensorboard=true", "--out", str(tmp_path / "run"))
        assert code == 2 and "tensorboard: true needs the tensorboard package" in err
    else:
        pytest.skip("tensorboard is installed here")


def test_console_script_exit_code(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "keel.cli.main", "train", "model.n_layer=0"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "keel train: error: model.n_layer: Input should be greater than or equal to 1 (got 0)"
