"""keel sweep's own bad input, each one line and exit code 2 with nothing written: a damaged sweep.yaml on --resume,
a directory or a device as the config file, a YAML syntax error (its line and column), and errors every trial would
meet (found before the sweep directory is made); overrides may follow the options, as in keel train."""

import pytest
import yaml

pytest.importorskip("optuna")

from keel.cli.main import main  # noqa: E402

CONFIG = {"task": "digits", "max_steps": 5, "eval_interval": 5, "checkpoint_interval": 5, "threads": 1,
          "sweep": {"optimizer.lr": [1e-3, 2e-3]}}


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("keel sweep: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["sweep", str(root / "c.yaml"), "--trials", "1", "--out", str(root / "s")]) == 0
    return root / "s"


@pytest.mark.parametrize("content, said", [
    (b"config: {}\n", "the config has no sweep: block"),
    (b"- 1\n- 2\n", "holds a list"),
    (b"\xff\xfeconfig: 1\n", "is not UTF-8 text"),
    (b"config: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    (b"!!python/name:os.system\n", "could not determine a constructor"),
    (b"config: {task: digits, sweep: {x: [1]}}\noptions: {}\n", "'x' is not a config key"),
    (b"x: 1\n", "has no config: and options: mappings"),
    (b"config: {task: digits, sweep: {optimizer.lr: [0.1]}}\noptions: []\n", "has no config: and options:"),
    (b"config: {task: digits, sweep: {optimizer.lr: [0.1]}}\npreset: [1]\n", "preset is [1]"),
    (b"config: {task: digits, sweep: {optimizer.lr: [0.1]}}\npreset: bogus\n", "'bogus' is not a preset"),
    (b"config: {task: digits, sweep: {optimizer.lr: [0.1]}}\noptions: {trials: -1}\n", "trials"),
    (b"config: [", "is not valid YAML at line 1, column 10"),
])
def test_a_damaged_sweep_yaml_on_resume_is_one_line_and_exit_2(finished_sweep, tmp_path, capsys, content, said):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(finished_sweep, copy)
    (copy / "sweep.yaml").write_bytes(content)
    assert main(["sweep", "--resume", str(copy)]) == 2
    assert said in one_line(capsys)
    assert (copy / "sweep.yaml").read_bytes() == content  # left as it was


def test_overrides_may_follow_the_options(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "s"
    assert main(["sweep", str(tmp_path / "c.yaml"), "--trials", "1", "--out", str(out),
                 "optimizer.weight_decay=0.25", "--workers", "1", "max_steps=3"]) == 0
    spec = yaml.safe_load((out / "sweep.yaml").read_text())
    assert spec["config"]["optimizer"]["weight_decay"] == 0.25 and spec["config"]["max_steps"] == 3


@pytest.mark.parametrize("what, said", [("directory", "is a directory"), ("/dev/null", "is not a regular file"),
                                        ("missing", "does not exist")])
def test_a_config_file_that_is_not_a_file_says_what_it_is(tmp_path, capsys, what, said):
    (tmp_path / "directory").mkdir()
    path = what if what.startswith("/") else str(tmp_path / what)
    assert main(["sweep", path, "--out", str(tmp_path / "s")]) == 2
    assert said in one_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("task: digits\nmodel: {n_layer: 1\nseed: 3\n")
    assert main(["sweep", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert "is not valid YAML at line 3, column 5" in one_line(capsys)


@pytest.mark.parametrize("changes, said", [
    ({"early_stopping": {"patience": 2, "metric": "val_los"}}, "early_stopping.metric: 'val_los' is not in the"),
    ({"task": "user_task:no_validation", "early_stopping": {"patience": 2}}, "needs validation data"),
    ({"task": "user_task:make", "seq_warmup": {"enabled": True}}, "has no block_size"),
])
def test_what_every_trial_would_meet_is_found_before_the_sweep_directory(tmp_path, capsys, monkeypatch, changes,
                                                                        said):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tasks"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, **changes}))
    out = tmp_path / "s"
    assert main(["sweep", str(tmp_path / "c.yaml"), "--trials", "1", "--out", str(out)]) == 2
    assert said in one_line(capsys)
    assert not out.exists()
    fixed = {**CONFIG, **changes, "early_stopping": {"patience": None}, "seq_warmup": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(fixed))
    assert main(["sweep", str(tmp_path / "c.yaml"), "--trials", "1", "--out", str(out)]) == 0  # the same --out
