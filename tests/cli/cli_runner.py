"""``run_keel_train``: ``keel train`` in-process, with every check but the training loop, held to its contract.

A helper module, not a conftest.py: a second conftest module would shadow tests/conftest.py for the tests that
import it by name. The test files of this folder import it (pytest puts their folder on sys.path).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from keel.cli.main import main
from keel.train.loop import Trainer

HANG_SECONDS = 60  # a command that has not answered by then hangs


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    trainers: list[Trainer] = field(default_factory=list)  # those that reached the training loop


class Hung(Exception):
    pass


@contextlib.contextmanager
def _hang_guard(seconds: int):
    def alarm(signum, frame):
        raise Hung(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _process_state_kept():
    """Put back what an accepted command changes in this process: torch's threads, the global RNGs, the directory."""
    threads, cwd = torch.get_num_threads(), os.getcwd()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        os.chdir(cwd)


def run_keel_train(argv: list[str], workdir: Path, memory: int | None = 2 << 30) -> Outcome:
    """``keel train *argv`` run in ``workdir`` by ``keel.cli.main.main``, with the training loop (``Trainer._fit``)
    replaced by one that returns at once: parsing, config validation, the memory estimate (told the machine has
    ``memory`` bytes; None: what it really has), the task, the model, the first batch, the run directory and its
    lock are all real.

    Fails the calling test on an exit code other than 0 or 2, on any exception escaping, on a hang, and on an
    exit code 2 whose stderr is not exactly one line.
    """
    return run_keel(["train", *argv], workdir, memory)


def run_keel(argv: list[str], workdir: Path, memory: int | None = 2 << 30, real_loop: bool = False) -> Outcome:
    """``keel *argv`` (any command) in ``workdir``, held to the same contract as ``run_keel_train``. What would
    train is replaced by what returns at once, unless ``real_loop``: the training loop, a sweep's trials
    (``keel.sweep.runner.run``) and ``keel diagnose --config``'s procedures (``Session.run``); everything before
    them (parsing, every check, the sweep directory, the study's spec) is real, and so are diagnose RUN_DIR,
    report, average, ensemble and schedule."""
    from keel.diagnose.active import Session

    out, err, reached = io.StringIO(), io.StringIO(), []

    def fit_at_once(trainer):
        reached.append(trainer)
        return {}

    patches = [] if real_loop else [mock.patch.object(Trainer, "_fit", fit_at_once),
                                    mock.patch("keel.sweep.runner.run", lambda root, spec, say=print: {}),
                                    mock.patch.object(Session, "run", lambda session: session.diagnosis)]
    if memory is not None:
        patches.append(mock.patch("keel.models.memory.available_memory", lambda device="cpu": memory))
    with _process_state_kept(), _hang_guard(HANG_SECONDS), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        os.chdir(workdir)
        try:
            code = main(list(argv))
        except SystemExit as exit:  # argparse: --help, or a usage error
            code = exit.code
        except Hung:
            pytest.fail(f"keel hung on {argv!r}")
        except BaseException as error:  # noqa: BLE001 (this is what the tests are about)
            pytest.fail(f"keel raised {type(error).__name__}: {error} on {argv!r}")
    stderr = err.getvalue()
    assert code in (0, 2), f"exit code {code!r} for {argv!r}: {stderr}"
    if code == 2:
        assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line for {argv!r}: {stderr!r}"
        assert "Traceback" not in stderr
    return Outcome(code, out.getvalue(), stderr, reached)
