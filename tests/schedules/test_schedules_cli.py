"""`keel schedule`: prints LRs at chosen steps, writes a PNG, reads run configs, fails with one line and exit 2."""

import pytest

from keel.cli.main import main


def test_table_and_png(tmp_path, capsys):
    out = tmp_path / "s.png"
    code = main(["schedule", "cosine,warmup=100,min_lr=1e-5", "wsd,warmup=5%,decay=20%", "--lr", "3e-4",
                 "--steps", "1000", "--at", "0,100,50%,999,1000", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "cosine,warmup=100,min_lr=1e-5", "wsd,warmup=5%,decay=20%"]
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in lines[1:6]}
    assert rows[0] == [0.0, 0.0]
    assert rows[100] == [3e-4, 3e-4]
    assert rows[500][1] == 3e-4
    assert rows[1000] == [1e-5, 0.0]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_run_config_and_run_config_file(tmp_path, capsys):
    assert main(["schedule", "--no-plot", "--at", "0,100%"]) == 0
    assert "default run config" in capsys.readouterr().out
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 200\noptimizer: {lr: 0.01}\nschedule: {name: linear, warmup: 20}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: constant\nlr: 0.5\n")
    assert main(["schedule", str(config), str(spec), "--no-plot", "--at", "0,20,200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "run.yaml", "spec.yaml"]
    assert [float(x) for x in lines[2].split()[1:]] == [0.01, 0.5]
    assert [float(x) for x in lines[3].split()[1:]] == [0.0, 0.5]


def test_nested_yaml_spec_and_log_plot(tmp_path, capsys):
    out = tmp_path / "j.png"
    spec = "{name: join, schedules: [constant, {name: exponential, rate: 0.99}], boundaries: [10%]}"
    assert main(["schedule", spec, "plateau,warmup=10", "--steps", "300", "--log", "--out", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["cosin", "--steps", "10"], "schedule.name: 'cosin' is not a schedule; did you mean 'cosine'?"),
        (["cosine", "cosine,warmup=20", "--steps", "10"], "schedule[2].warmup: 20 (20 steps) is at or beyond"),
        (["noam,model_dim=4,warmup=10"], "--steps: missing"),
        (["cosine", "--steps", "0"], "--steps: 0 is not allowed"),
        (["cosine", "--steps", "10", "--lr", "-1"], "--lr: -1.0 is not allowed"),
        (["cosine", "--steps", "10", "--at", "5,x"], "--at: 'x' is not a length"),
        (["cosine,min_lr", "--steps", "10"], "'min_lr' in 'cosine,min_lr' is not KEY=VALUE"),
        (["cosine", "--steps", "10", "--out", "no/such/dir/x.png"], "--out: the directory of 'no/such/dir/x.png'"),
        (["cosine,warmup=1ep", "--steps", "100", "--steps-per-epoch", "-5"],
         "--steps-per-epoch: -5.0 is not allowed; must be a finite number > 0"),
        (["cosine,warmup=1ep", "--steps", "100", "--steps-per-epoch", "nan"], "--steps-per-epoch: nan is not allowed"),
        (["cosine,warmup=1Mtok", "--steps", "100", "--tokens-per-step", "0"], "--tokens-per-step: 0.0 is not allowed"),
        (["cosine,warmup=1e30ex", "--steps", "100", "--examples-per-step", "1e-300"],
         "schedule.warmup: '1e30ex' is too long"),
        (["cosine", "--steps", "100", "--at", "5ep"], "--at: '5ep' is in epochs, but the steps per epoch are not known "
         "here; allowed: steps, tokens, examples or a share of the run, or give --steps-per-epoch"),
        (["cosine,warmup=1Mtok", "--steps", "100"], "(or give --tokens-per-step)"),
    ],
)
def test_errors_are_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("keel schedule: error: ")
    assert needle in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "NAME,KEY=VALUE" in out and "--at" in out and "'2%'" in out


def test_a_run_config_resolves_tokens_with_the_runs_own_counts(tmp_path, capsys):
    """The language model's packed batches hold 32 x 128 = 4,096 tokens a step: a warmup of 100ktok ends at the
    first step at which the clock reaches 100,000 tokens, step 25 (the trainer's timeline, not a rate given)."""
    config = tmp_path / "run.yaml"
    config.write_text("recipe: baseline\nmax_steps: 200\noptimizer: {lr: 0.01}\n"
                      "schedule: {name: constant, warmup: 100ktok}\n")
    assert main(["schedule", str(config), "--no-plot", "--at", "24,25"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert float(rows[0][1]) < 0.01 and float(rows[1][1]) == 0.01
    assert main(["schedule", "constant,warmup=1Mtok", "--steps", "500", "--tokens-per-step", "4096", "--no-plot",
                 "--at", "244,245"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert float(rows[0][1]) < 1.0 and float(rows[1][1]) == 1.0  # 245 x 4096 >= 1,000,000 > 244 x 4096


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`keel schedule ... | head -1`: the reader closes the pipe while keel still writes. keel stops with the shell's
    code for SIGPIPE (141) and writes nothing to stderr, rather than an 'error: Broken pipe' line or a traceback."""
    import signal
    import subprocess
    import sys

    steps = ",".join(str(s) for s in range(0, 20000, 2))  # ~10,000 rows: more than a pipe's buffer holds
    process = subprocess.Popen([sys.executable, "-m", "keel", "schedule", "cosine", "--steps", "20000", "--at", steps,
                                "--no-plot"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().split() == [b"step", b"cosine"]
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE, stderr
    assert stderr == b""


def test_a_run_config_with_a_global_batch_previews_the_trainers_steps(tmp_path, capsys):
    """data.global_batch_size: 128 on one process is batch_size 128, as the trainer resolves it: one epoch of
    1,617 digits is 13 steps (51 at the default 32 a step)."""
    config = tmp_path / "gb.yaml"
    config.write_text("task: digits\ndevice: cpu\nduration: 1ep\ndata: {global_batch_size: 128}\n")
    assert main(["schedule", str(config), "--no-plot"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "13"
