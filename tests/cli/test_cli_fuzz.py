"""Hostile input, generated: every keel command with argument lines (and `keel train` with config files) made by
Hypothesis.

Each example runs the real command in-process (``keel.cli.main.main``): argument parsing, config loading and
validation, the memory estimate, building the task and model, the first-batch check, the run-directory checks and
the lock. Only what would train is replaced by what returns at once (the training loop ``Trainer._fit``, a sweep's
trials, ``keel diagnose --config``'s procedures), so an accepted line costs a model build, not a run; ``keel
diagnose RUN_DIR``, ``report``, ``average``, ``ensemble`` and ``schedule`` run for real, on run directories made
for the test (a trained run, and copies with hostile logs and configs) and on damaged sweep directories. The
property: the command ends with exit code 0 or 2 (one line on stderr, no traceback), never another exception, never
a hang. Lines that once crashed inside the training loop itself are run for real, a few steps each.

A fast subset runs by default; the full matrix (>= 2,000 keel train argument lines, 500 config files, >= 300 lines
of each other command, real short runs) under ``-m faults``. A failure prints the argument line and a
``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from cli_runner import run_keel, run_keel_train  # pytest's prepend import mode puts this folder on sys.path

# Every key of the typed config, and the free-form blocks' usual keys.
KNOWN_KEYS = [
    "task", "task_args", "task_args.x", "init_from", "init_from_strict", "init_from_exclude", "seed", "max_steps",
    "out_dir", "grad_accum", "precision", "device", "deterministic", "threads", "eval_interval", "log_interval",
    "checkpoint_interval", "keep_last", "tensorboard", "progress_interval", "restarts", "recipe",
    "data", "data.source", "data.val_fraction", "data.batch_size", "data.vocab_size", "data.eval_tokens",
    "model", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout", "model.bias",
    "model.hf_config", "model.hf_pretrained",
    "optimizer", "optimizer.name", "optimizer.lr", "optimizer.betas", "optimizer.weight_decay", "optimizer.eps",
    "optimizer.momentum", "optimizer.lr_scales", "optimizer.layer_lr_decay", "optimizer.freeze",
    "optimizer.freeze_depth", "optimizer.unfreeze_at", "optimizer.alpha", "optimizer.ns_steps", "optimizer.precondition_frequency",
    "schedule", "schedule.name", "schedule.warmup", "schedule.min_lr", "schedule.decay", "schedule.total",
    "schedule.lr", "schedule.warmup_init_lr", "schedule.warmup_shape", "schedule.step_start",
    "schedule.step_duration", "schedule.minimum", "schedule.rate", "schedule.interval", "schedule.milestones",
    "schedule.period", "schedule.patience", "schedule.end_lr", "schedule.power", "schedule.schedules",
    "schedule.boundaries",
    "clip.mode", "clip.max_norm", "clip.max_value", "clip.percentile", "clip.window", "clip.calibration_steps",
    "clip.clipping", "clip.eps", "clip.start_after_warmup", "nonfinite.max_consecutive_skips",
    "spike.enabled", "spike.window", "spike.factor", "spike.min_history", "spike.min_rise", "spike.skip_batches",
    "spike.lr_factor", "spike.max_rollbacks",
    "sample.prompt", "sample.tokens", "sample.temperature", "sample.top_k",
    "ema.enabled", "ema.decay", "ema.half_life", "ema.every", "ema.start", "ema.checkpoint_weights", "ema.device",
    "ema.dtype", "polyak.enabled", "polyak.start", "swa.enabled", "swa.start", "swa.lr", "swa.anneal_steps",
    "swa.every", "swa.bn_update", "snapshot.enabled", "snapshot.cycle", "snapshot.keep",
    "early_stopping.metric", "early_stopping.mode", "early_stopping.patience", "early_stopping.min_delta",
    "average.last", "average.weights",
]
# Small sizes put first on every generated line (the generated items come after and override them), so that a
# line that is accepted builds a model in milliseconds.
SMALL = ["device=cpu", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
         "data.batch_size=2", "data.eval_tokens=256"]
NAMES = ["adamw", "adam", "sgd", "momentum", "lion", "muon", "soap", "ademamix", "adafactor", "cosine", "wsd",
         "linear", "constant", "join", "warmup", "plateau", "noam", "lm", "digits", "cpu", "auto", "cuda", "cuda:7",
         "mps", "fp32", "bf16", "fp16", "norm", "value", "agc", "percentile", "none", "pydoc", "min", "max",
         "val_loss", "raw", "ema", "model", "gpt-loop", "baseline", "cos", "float16", "nonexistent_module:factory", "math:sqrt", "keel:nothing"]
YAML_FRAGMENTS = ["[1, 2]", "[]", "{}", "{a: 1}", "{name: adamw, lr: 1e-3}", "null", "~", "true", "no", "''",
                  "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}", "2001-12-14",
                  "&a [*a]", "[" * 3000, "[" * 80 + "]" * 80, "{", "]", "- 1", ": x", '"\\0"', "'", "a: b: c",
                  "[1, [2, [3]]]", "{warmup: 1e400ep}", "*x", "&x 1", "%YAML 1.1", "---", "..."]
TIME_UNITS = ["", "%", "ep", "tok", "ktok", "Ktok", "Mtok", "Gtok", "Btok", "Ttok", "s", "steps", " ep"]
NUMBER_TEXT = ["0", "1", "-1", "2", "3", "7", "16", "100", "0.5", "1e-3", "1e18", "1e400", "-1e400", "1e-400",
               ".nan", ".inf", "-.inf", "nan", "inf", "99999999999", "99999999999999999999999", "4294967296",
               "4294967295", "9223372036854775808", "1_000", "0x10", "0o7", "1e9", "-0", "+5", "3.0", "1.5"]
# argv cannot hold NUL bytes (C strings): every other character may come.
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)
PATHS = ["run", "runs/a", "run dir", "ü/ñ", "a" * 300, "a/" * 200 + "x", "afile", "afile/sub", "/proc/keel-fuzz",
         "/dev/null", "/dev/null/x", "/proc/self/keel", ".", "-", "--", "~keel-nobody/x", "emptydir",
         "holds_run", "x\ny", "x\x01y", "CON", " "]

numbers = st.one_of(
    st.sampled_from(NUMBER_TEXT),
    st.integers(-5, 64).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
lengths = st.builds(lambda number, unit: f"{number}{unit}", numbers, st.sampled_from(TIME_UNITS))
values = st.one_of(numbers, lengths, st.sampled_from(YAML_FRAGMENTS), st.sampled_from(NAMES), TEXT,
                   st.sampled_from(PATHS))
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS).map(lambda key: key.split(".")[-1]),  # a block's key at the top level (lr=1e-3)
    st.sampled_from(KNOWN_KEYS).map(lambda key: key + ".sub"),
    TEXT,
    st.sampled_from(["", ".", "a..b", ".lr", "lr.", "model.", "optimizer.lr.x", "seed.x", "MODEL.N_LAYER"]),
)
overrides = st.builds(lambda key, value: f"{key}={value}", keys, values)
options = st.one_of(
    st.tuples(st.sampled_from(["--out", "--resume"]), st.sampled_from(PATHS) | TEXT),
    st.builds(lambda path: (f"--out={path}",), st.sampled_from(PATHS)),
    st.sampled_from([("--quiet",), ("--out",), ("--resume",), ("--bogus",), ("-x",), ("--",), ("-",), ("--qu",),
                     ("--help",), ("-h",), ("--out", "--quiet"), ("cfg.yaml",), ("missing.yaml",), ("afile",),
                     ("emptydir",)]),
)
junk = st.one_of(TEXT, st.sampled_from(["=", "==", "=x", "x=", "a=b=c", "key", "\x1b[31m", "\u202e", "\ufeff"]))
items = st.one_of(overrides, overrides, overrides, options, junk)
argument_lines = st.lists(items, max_size=8).map(
    lambda parts: [piece for part in parts for piece in (part if isinstance(part, tuple) else (part,))])


# ---------------------------------------------------------------------------------------------- config files

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**25), 10**25), st.floats(), TEXT,
                    st.sampled_from(NAMES), lengths)
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=12)
config_trees = st.dictionaries(st.sampled_from(KNOWN_KEYS) | TEXT, plain, max_size=6)


def _unflatten(flat: dict) -> dict:
    """{"model.n_layer": 2} -> {"model": {"n_layer": 2}}; a key that clashes with a value is dropped."""
    tree: dict = {}
    for key, value in flat.items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = value
    return tree


def _small_base() -> dict:
    return _unflatten({item.split("=")[0]: yaml.safe_load(item.split("=")[1]) for item in SMALL})


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _dump(tree: dict) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode("utf-8")


config_files = st.one_of(
    config_trees.map(lambda flat: _dump(_merge(_small_base(), _unflatten(flat)))),
    st.binary(max_size=64),  # not UTF-8, or not YAML, or not a mapping
    st.builds(lambda text, bad: _dump(_small_base()) + text.encode() + bad,
              TEXT, st.sampled_from([b"", b"\xff", b"\xc3\x28", b"\x00", b"\xed\xa0\x80", b"\xfe\xff"])),
    st.integers(1, 4000).map(lambda n: b"model: " + b"[" * n + b"]" * n),  # nested deeper than anyone means
    st.integers(1, 4000).map(lambda n: b"task_args:\n" + b"".join(b"  " * i + b"a:\n" for i in range(1, n))),
    st.sampled_from([
        b"", b"---\n", b"[]", b"null", b"42", b"'a string'", b"seed: 1\nseed: 2\n", b"a: &x [*x]\n",
        b"task_args: &a {b: *a}\n", b"1: 2\n", b"? [a]\n: b\n", b"seed: !!binary aGk=\n", b"seed: 2001-12-14\n",
        b"seed: !!python/object/apply:os.system ['true']\n", b"\xef\xbb\xbfseed: 3\n", b"model: {n_layer: .nan}\n",
        b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\ntask_args: {f: [*e,*e,*e,*e]}\n",
        b"model: !!map {n_layer: 1}\n", b"optimizer: adamw\n", b"schedule: [cosine]\n", b"out_dir: \"a\\0b\"\n",
        b"data: {source: \"\\0\"}\n", b"init_from: \"\\0\"\n", b"\t- x\n", b"%TAG ! tag:keel,2024:\n--- !x 1\n",
    ]),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with the files the generated lines name: a file, an empty folder, a run, a valid config."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile").write_text("not a directory\n")
    (root / "emptydir").mkdir()
    (root / "holds_run").mkdir()
    (root / "holds_run" / "metrics.jsonl").write_text("")
    (root / "cfg.yaml").write_text("max_steps: 5\nmodel: {n_layer: 1, n_embd: 16, n_head: 2}\n")
    return root


def _profile(examples: int, full: bool = False):
    """The fast subset is the same examples every run (derandomized); the full matrix draws new ones each time."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=not full,
                    suppress_health_check=list(HealthCheck), print_blob=True)


class Counter:
    def __init__(self):
        self.tried = self.accepted = 0


def _check_lines(workdir: Path, counter: Counter):
    @given(argv=argument_lines)
    def check(argv):
        outcome = run_keel_train([*SMALL, *argv], workdir)
        counter.tried += 1
        counter.accepted += outcome.code == 0

    return check


def _check_files(workdir: Path, counter: Counter):
    @given(content=config_files, extra=st.lists(overrides, max_size=2), where=st.integers(0, 2))
    def check(content, extra, where):
        (workdir / "fuzzed.yaml").write_bytes(content)
        argv = ["--quiet", *extra]
        argv.insert(min(where, len(argv)), "fuzzed.yaml")  # the file among the options and overrides
        outcome = run_keel_train(argv, workdir)
        counter.tried += 1
        counter.accepted += outcome.code == 0

    return check


def test_generated_command_lines_exit_0_or_2_in_one_line(workdir, record_property):
    counter = Counter()
    _profile(100)(_check_lines(workdir, counter))()
    record_property("tried", counter.tried)
    assert counter.accepted >= 1  # the generator does reach lines that would train


def test_generated_config_files_exit_0_or_2_in_one_line(workdir, record_property):
    counter = Counter()
    _profile(30)(_check_files(workdir, counter))()
    record_property("tried", counter.tried)


@pytest.mark.faults
def test_the_full_matrix_of_generated_command_lines(workdir, record_property):
    counter = Counter()
    _profile(2000, full=True)(_check_lines(workdir, counter))()
    record_property("tried", counter.tried)
    print(f"fuzzed command lines: {counter.tried} tried, {counter.accepted} accepted, none crashed or hung")
    assert counter.tried >= 2000 and counter.accepted >= 1


@pytest.mark.faults
def test_the_full_matrix_of_generated_config_files(workdir, record_property):
    counter = Counter()
    _profile(500, full=True)(_check_files(workdir, counter))()
    record_property("tried", counter.tried)
    print(f"fuzzed config files: {counter.tried} tried, {counter.accepted} accepted, none crashed or hung")
    assert counter.tried >= 500


# ---------------------------------------------------------------------------------------------- the other commands

# What each command's positional items are drawn from (besides junk, overrides and paths): files the workdir holds.
RUNS = ["run_a", "run_long", "run_step_text", "run_loss_text", "run_huge", "run_nan", "run_empty", "run_no_config",
        "run_bad_config", "run_binary_config", "run_bad_line", "run_a/checkpoints/step_00000002",
        "run_a/checkpoints/step_00000004", "run_a/model.safetensors", "run_a/checkpoints", "sweep_ok"]
SWEEP_DIRS = ["sweep_ok", "sweep_list", "sweep_empty_config", "sweep_binary", "sweep_tag", "sweep_no_sweep_block",
              "sweep_bad_preset", "emptydir", "afile", "run_a", "missing"]
SPECS = ["cosine", "cosine,warmup=10", "wsd,warmup=5%,decay=20%", "constant", "linear,end_lr=0.1", "plateau",
         "multistep,milestones=[300,600]", "{name: join, schedules: [constant, cosine], boundaries: [10%]}",
         "cosine,lr=-1", "cosine,warmup=1e400", "bogus", "cosine,", ",", "{", "[1]", "cfg.yaml", "sw.yaml", "afile",
         "emptydir", "/dev/null", "cosine,warmup=3ep", "cosine,warmup=2Mtok", "wsd,decay=200%", "noam"]
SWEEP_ITEMS = ["sw.yaml", "cfg.yaml", "missing.yaml", "afile", "emptydir", "/dev/null", "fuzzed.yaml",
               "sweep.optimizer.lr=loguniform(1e-4, 1e-1)", "sweep.optimizer.lr=[1e-3, 1e-2]", "sweep.x=[1]",
               "sweep.optimizer.lr=uniform(1, 0)", "sweep.seed=choice([1, 2])", "sweep={}", "sweep=[1]",
               "sweep_options.trials=0", "sweep_options.sampler=grid", "early_stopping.patience=1",
               "early_stopping.metric=val_los", "seq_warmup.enabled=true", "task=digits"]
POSITIONAL = {
    "sweep": st.sampled_from(SWEEP_ITEMS) | overrides,
    "diagnose": st.sampled_from(RUNS) | overrides,
    "report": st.sampled_from(RUNS),
    "average": st.sampled_from(RUNS),
    "ensemble": st.sampled_from(RUNS),
    "schedule": st.sampled_from(SPECS) | TEXT,
}
FLAG_VALUES = st.one_of(numbers, lengths, st.sampled_from(NAMES), st.sampled_from(PATHS), st.sampled_from(RUNS),
                        st.sampled_from(SWEEP_DIRS), st.sampled_from(["report.html", "avg.safetensors", "s.png",
                                                                      "run_a/report.html", "sqlite:///x.db",
                                                                      "nosuchdb://x", "coarse-to-fine", "restarts",
                                                                      "15m", "1s", "0", "-3"]), TEXT)


def _flags(command: str) -> list[tuple[str, bool]]:
    """(option, takes a value) for each option of ``keel COMMAND``, read from its parser."""
    import argparse

    from keel.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [(option, action.nargs != 0) for action in sub._actions for option in action.option_strings
            if option not in ("-h", "--help")]


def command_lines(command: str):
    flags = _flags(command)
    with_value = [f for f, takes in flags if takes]
    alone = [f for f, takes in flags if not takes]
    options = st.one_of(
        st.builds(lambda flag, value: (flag, value), st.sampled_from(with_value), FLAG_VALUES),
        st.builds(lambda flag, value: (f"{flag}={value}",), st.sampled_from(with_value), FLAG_VALUES),
        *([st.sampled_from(alone).map(lambda flag: (flag,))] if alone else []),
        st.sampled_from([("--help",), ("--bogus",), ("--",), ("-",)]),
    )
    items = st.one_of(POSITIONAL[command], POSITIONAL[command], options, options, junk)
    return st.lists(items, max_size=7).map(
        lambda parts: [command, *(piece for part in parts for piece in (part if isinstance(part, tuple) else (part,)))])


def _write_run_copy(root: Path, name: str, edit) -> None:
    import shutil

    shutil.copytree(root / "run_long", root / name)
    edit(root / name)


def _edit_metrics(change):
    def edit(run: Path) -> None:
        import json

        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(json.dumps(change(record)) + "\n" for record in lines))
    return edit


@pytest.fixture(scope="module")
def command_workdir(tmp_path_factory) -> Path:
    """A trained run (two checkpoints), a longer synthetic run and hostile copies of it, damaged sweep
    directories, config files: what the generated lines of the other commands name."""
    import json

    from keel.config import dump_config, load_config
    from keel.rundir.metrics import MetricsLog
    from keel.train import train

    root = tmp_path_factory.mktemp("fuzz_commands")
    (root / "afile").write_text("not a directory\n")
    (root / "emptydir").mkdir()
    tiny = [*SMALL, "max_steps=4", "checkpoint_interval=2", "eval_interval=2", "keep_last=3", "sample.tokens=0"]
    train(load_config(None, [*tiny, f"out_dir={root / 'run_a'}"]), quiet=True)
    long = root / "run_long"  # a synthetic 60-step digits run: every reading of keel diagnose has enough records
    long.mkdir()
    (long / "config.yaml").write_text(dump_config(load_config(None, ["task=digits", "max_steps=60"])))
    log = MetricsLog(long / "metrics.jsonl")
    for step in range(60):
        log.write({"step": step, "tokens": 32 * step, "lr": 1e-3, "loss": 2.3 - step / 60, "grad_norm": 0.5 + step % 3,
                   "clipped": step % 4 == 0, "skipped": 0, "time": 0.01 * step})
        if step % 20 == 19:
            log.write({"kind": "eval", "step": step + 1, "val_loss": 2.3 - step / 70,
                       "train_eval_loss": 2.3 - step / 65})
    log.close()
    number = lambda key, value: lambda r: {**r, key: value} if r.get("kind") == "step" and r["step"] == 7 else r
    _write_run_copy(root, "run_step_text", _edit_metrics(number("step", "seven")))
    _write_run_copy(root, "run_loss_text", _edit_metrics(number("loss", "x")))
    _write_run_copy(root, "run_huge", _edit_metrics(
        lambda r: {**r, **{k: 1e308 for k in ("loss", "grad_norm", "val_loss", "train_eval_loss") if k in r}}))
    _write_run_copy(root, "run_nan", _edit_metrics(
        lambda r: {**r, **{k: "NaN" for k in ("loss", "grad_norm", "val_loss", "lr") if k in r}}))
    _write_run_copy(root, "run_empty", lambda run: (run / "metrics.jsonl").write_text(""))
    _write_run_copy(root, "run_no_config", lambda run: (run / "config.yaml").unlink())
    _write_run_copy(root, "run_bad_config", lambda run: (run / "config.yaml").write_text(
        "clip: [1]\nmax_steps: many\noptimizer: adamw\nschedule: {name: 3}\nseed: !!binary aGk=\n"))
    _write_run_copy(root, "run_binary_config", lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00x"))
    _write_run_copy(root, "run_bad_line", lambda run: (run / "metrics.jsonl").open("a").write("{not json\n{}\n"))
    sweep_config = {"task": "digits", "max_steps": 5, "eval_interval": 5, "threads": 1,
                    "sweep": {"optimizer.lr": [1e-3, 1e-2]}}
    (root / "sw.yaml").write_text(yaml.safe_dump(sweep_config))
    (root / "cfg.yaml").write_text(yaml.safe_dump(_merge(_small_base(), {"max_steps": 5})))
    spec = {"config": sweep_config, "options": {}, "preset": None, "storage": None, "study": "s"}
    damaged = {
        "sweep_ok": yaml.safe_dump(spec).encode(),
        "sweep_list": b"- 1\n- 2\n",
        "sweep_empty_config": b"config: {}\n",
        "sweep_binary": b"\xff\xfe\x00config",
        "sweep_tag": b"config: !!python/object/apply:os.system ['true']\n",
        "sweep_no_sweep_block": yaml.safe_dump({**spec, "config": {"task": "digits"}}).encode(),
        "sweep_bad_preset": yaml.safe_dump({**spec, "preset": [1]}).encode(),
    }
    for name, content in damaged.items():
        (root / name).mkdir()
        (root / name / "sweep.yaml").write_bytes(content)
    (root / "fuzzed.yaml").write_text(json.dumps(sweep_config))
    return root


def _check_command(command: str, workdir: Path, counter: Counter):
    @given(argv=command_lines(command))
    def check(argv):
        outcome = run_keel(argv, workdir)
        counter.tried += 1
        counter.accepted += outcome.code == 0

    return check


COMMANDS = ["sweep", "diagnose", "report", "average", "ensemble", "schedule"]


@pytest.mark.parametrize("command", COMMANDS)
def test_generated_lines_of_every_command_exit_0_or_2_in_one_line(command_workdir, record_property, command):
    counter = Counter()
    _profile(12)(_check_command(command, command_workdir, counter))()
    record_property("tried", counter.tried)


@pytest.mark.parametrize("argv", [
    ["diagnose", "run_step_text"], ["diagnose", "run_loss_text"], ["diagnose", "run_huge"], ["report", "run_huge"],
    ["report", "run_a", "--out", "."], ["sweep", "--resume", "sweep_list"], ["sweep", "--resume", "sweep_empty_config"],
    ["sweep", "--resume", "sweep_binary"], ["sweep", "--resume", "sweep_tag"], ["diagnose", "run_bad_config"],
    ["sweep", "sw.yaml", "--trials", "1", "optimizer.lr=1e-3"], ["sweep", "emptydir"], ["sweep", "/dev/null"],
    ["diagnose", "run_binary_config"], ["report", "run_binary_config"], ["report", "run_bad_config"],
    ["schedule", "--out", "0.0"], ["train", "--resume", "run_binary_config"], ["report", "run_nan", "run_nan"],
    ["ensemble", "run_a", "--device", "0"], ["average", "run_a", "--out", "a.safetensors", "--eval", "--device", "mps"],
])
def test_the_crashes_found_by_the_first_matrix_are_one_line(command_workdir, argv):
    """Each of these once ended in a traceback (issue 20's eight crash causes, then what the matrix over every
    command found: a config.yaml that is not UTF-8, a clip block that is a list, a plot name without an image
    suffix, a log axis for two runs of NaN LRs, a --device torch cannot parse or keel does not train on)."""
    run_keel(argv, command_workdir)


@pytest.mark.faults
@pytest.mark.parametrize("command", COMMANDS)
def test_the_full_matrix_of_every_command(command_workdir, record_property, command):
    counter = Counter()
    _profile(300, full=True)(_check_command(command, command_workdir, counter))()
    record_property("tried", counter.tried)
    print(f"fuzzed keel {command} lines: {counter.tried} tried, {counter.accepted} accepted, none crashed or hung")
    assert counter.tried >= 300


# ---------------------------------------------------------------------------------------------- real short runs


REAL_EXAMPLES = [
    ["optimizer.name=muon", "optimizer.ns_steps=100"],  # passed validation, then failed at the first step
    ["optimizer.name=soap", "optimizer.precondition_frequency=1"],
    ["clip.mode=percentile", "clip.window=1"],
    ["spike.enabled=true", "spike.window=2", "spike.min_history=1"],
]


def _check_real_runs(root: Path, counter: Counter):
    def check(argv):
        """The training loop itself, a few steps of the line: what fails only once training starts (an optimizer
        setting its kernel refuses, a technique meeting the first real batch) must be one line too; exit 1 is a run
        that became unstable."""
        import contextlib
        import io
        import tempfile

        from keel.cli.main import main

        out, err = io.StringIO(), io.StringIO()
        line = [*SMALL, "log_interval=1", *argv, "max_steps=3", "eval_interval=2", "checkpoint_interval=2",
                "sample.tokens=2", "--quiet"]
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(dir=root) as workdir:
            try:
                os.chdir(workdir)
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        code = main(["train", *line])
                    except SystemExit as exit:
                        code = exit.code
            finally:
                os.chdir(cwd)
        stderr = err.getvalue()
        assert code in (0, 1, 2), f"exit code {code!r} for {line!r}: {stderr[-2000:]}"
        if code:
            assert stderr.count("\n") == 1 and "Traceback" not in stderr, f"not one line for {line!r}: {stderr!r}"
        counter.tried += 1
        counter.accepted += code == 0

    for argv in REAL_EXAMPLES:
        check = example(argv=argv)(check)
    return given(argv=argument_lines)(check)


@pytest.mark.faults
def test_generated_lines_run_for_real_exit_0_1_or_2_in_one_line(tmp_path, record_property):
    counter = Counter()
    _profile(60, full=True)(_check_real_runs(tmp_path, counter))()
    record_property("tried", counter.tried)
    print(f"keel train lines run for real (3 steps): {counter.tried} tried, {counter.accepted} trained, none "
          "crashed or hung")
    assert counter.tried >= 60 + len(REAL_EXAMPLES)
