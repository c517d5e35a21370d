import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

from tiny_config import TINY  # noqa: E402  (a module of its own: other folders have a conftest.py too)


@pytest.fixture
def tiny_overrides():
    return list(TINY)
