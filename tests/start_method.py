"""How the tests start helper processes (imported by name, like tiny_config): ``fork`` while this process has not
initialised CUDA (the child starts with keel imported, so it costs what its work costs), ``spawn`` once it has (a
process forked after CUDA started cannot use CUDA, and CUDA's threads do not survive the fork)."""

import multiprocessing

import torch


def process_context():
    """The multiprocessing context for a helper process started now."""
    return multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
