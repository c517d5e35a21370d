"""The sweep: and sweep_options: blocks: distributions parse, bad ones fail with one line (exit 2), keel train
ignores the block with a note; check_space tries every value in the whole config. No Optuna needed."""

import pytest

from keel.cli.main import main
from keel.config import load_config, validate
from keel.errors import KeelError
from keel.sweep.space import apply_params, check_space, parse_distribution, space_of


def test_distributions_parse():
    d = parse_distribution("optimizer.lr", "loguniform(1e-4, 1e-1)")
    assert (d.kind, d.low, d.high, d.log) == ("loguniform", 1e-4, 1e-1, True)
    assert parse_distribution("model.dropout", "uniform(0, 0.3)").representatives()[-1] == 0.3
    d = parse_distribution("model.n_layer", "int(1, 8, log)")
    assert (d.kind, d.low, d.high, d.log) == ("int", 1, 8, True)
    assert parse_distribution("optimizer.name", "choice([adamw, lion])").choices == ("adamw", "lion")
    assert parse_distribution("optimizer.weight_decay", [0, 1e-5]).kind == "grid"


@pytest.mark.parametrize("item, message", [
    ("sweep.model.n_layr=int(1, 3)", "'model.n_layr' is not a config key; did you mean 'model.n_layer'?"),
    ("sweep.optimizer.lr=loguniform(1e-1, 1e-4)", "is an empty range"),
    ("sweep.optimizer.lr=loguniform(0, 1e-1)", "0 < low < high"),
    ("sweep.model.n_layer=int(4, 2)", "empty range (high 2 < low 4)"),
    ("sweep.model.n_layer=uniform(1, 4)", "samples floats, but model.n_layer is an integer"),
    ("sweep.precision=uniform(0, 1)", "precision is a word"),
    ("sweep.model.bias=int(0, 1)", "model.bias is true or false"),
    ("sweep.optimizer.lr=logunif(1e-4, 1e-1)", "did you mean loguniform?"),
    ("sweep.optimizer.lr=0.1", "is not a distribution"),
    ("sweep.optimizer.lr=choice([])", "needs one non-empty list"),
    ("sweep.out_dir=[a, b]", "cannot be searched"),
    ("sweep_options.sampler=annealing", "sweep_options.sampler"),
])
def test_a_bad_sweep_block_is_one_line_and_exit_2(item, message, capsys, tmp_path):
    code = main(["train", item, f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_keel_train_trains_the_config_as_written_and_says_so(tmp_path, capsys):
    code = main(["train", "task=digits", "max_steps=3", "device=cpu", "threads=1",
                 "sweep.optimizer.lr=loguniform(1e-4, 1e-1)", "--out", str(tmp_path / "run")])
    assert code == 0
    assert "note: the sweep: block (optimizer.lr) is for `keel sweep`" in capsys.readouterr().out


def test_check_space_tries_each_value_in_the_whole_config():
    raw = {"task": "digits", "sweep": {"optimizer.betas": "uniform(0.8, 0.99)"}}
    with pytest.raises(KeelError, match=r"sweep.optimizer.betas: uniform\(0.8, 0.99\) takes the value 0.8.*betas"):
        check_space(raw, space_of(raw))
    # momentum belongs to sgd_hd: it fits the config with the choice that has it
    raw = {"task": "digits", "sweep": {"optimizer.name": ["adamw", "sgd_hd"], "optimizer.momentum": [0.0, 0.9]}}
    check_space(raw, space_of(raw))
    raw = {"task": "digits", "sweep": {"optimizer.name": ["adamw", "lion"], "optimizer.momentum": [0.0, 0.9]}}
    with pytest.raises(KeelError, match="sweep.optimizer.momentum"):
        check_space(raw, space_of(raw))


def test_apply_params_sets_dotted_keys_and_drops_the_sweep_blocks():
    raw = {"task": "lm", "optimizer": {"name": "adamw"}, "sweep": {"optimizer.lr": "uniform(0.1, 1)"},
           "sweep_options": {"trials": 3}}
    out = apply_params(raw, {"optimizer.lr": 0.5, "model.n_layer": 2})  # model: a block of task lm
    assert out == {"task": "lm", "optimizer": {"name": "adamw", "lr": 0.5}, "model": {"n_layer": 2}}
    validate(out)


def test_command_line_overrides_of_the_block_become_dotted_keys():
    config = load_config(None, ["sweep.optimizer.lr=loguniform(1e-4, 1e-1)", "sweep.model.n_layer=[1, 2]"])
    assert set(config.sweep.space()) == {"optimizer.lr", "model.n_layer"}


def test_sweep_help_lists_the_options_derived_from_sweep_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--trials", "--workers", "--storage", "--study", "--resume", "--out", "--sampler",
                 "--pruner", "--seeds", "--budget"):
        assert flag in out, flag
