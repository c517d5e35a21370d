import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

from tiny_config import TINY  # noqa: E402  (a module of its own: other folders have a conftest.py too)


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where it is absent (``python -m pytest -m gpu``)."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none (the gpu tests run on a GPU "
                                       "machine: bash benchmarks/gpu_check.sh)")
        for item in gpu:
            item.add_marker(skip)


# On a machine with a GPU, a test without the gpu marker should not need it: tests that mean the CPU say
# device=cpu. Those that put tensors on CUDA anyway (device auto) are listed after the run, not failed: a
# README example may rightly train on whatever device the machine has.
_CUDA_USE = "allocated CUDA memory without the gpu marker"


def _cuda_allocations() -> int:
    """CUDA allocations this process has made so far (0 before CUDA starts; asking does not start it)."""
    if not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _cuda_allocations()
    yield
    if item.get_closest_marker("gpu") is None and _cuda_allocations() > before:
        item.user_properties.append((_CUDA_USE, True))


def pytest_terminal_summary(terminalreporter):
    flagged = sorted({report.nodeid for reports in terminalreporter.stats.values() for report in reports
                      if (_CUDA_USE, True) in getattr(report, "user_properties", ())})
    if flagged:
        terminalreporter.write_sep("-", f"{len(flagged)} tests {_CUDA_USE} (device auto?)")
        for nodeid in flagged:
            terminalreporter.write_line(nodeid)
