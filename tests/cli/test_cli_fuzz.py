"""Hostile input, generated: `keel train` with argument lines and config files made by Hypothesis.

Each example runs the real command in-process (``keel.cli.main.main``): argument parsing, config loading and
validation, the memory estimate, building the task and model, the first-batch check, the run-directory checks and
the lock. Only the training loop itself (``Trainer._fit``) is replaced by one that returns at once, so an accepted
line costs a model build, not a run. The property: the command ends with exit code 0 (it would train) or 2 (one
line on stderr, no traceback), never another exception, never a hang.

A fast subset runs by default; the full matrix (>= 2,000 argument lines, 500 config files) under ``-m faults``.
A failure prints the argument line and a ``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from cli_runner import run_keel_train  # pytest's prepend import mode puts this folder on sys.path

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
