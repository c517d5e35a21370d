"""keel.models.memory: the parameter count is exact, the estimate adds up, and the machine's memory is read."""

import pytest
import torch

from keel.config import load_config
from keel.errors import KeelError
from keel.models import GPT, GPTConfig
from keel.models.memory import (OPTIMIZER_STATE_FLOATS, available_memory, estimate_gpt_training, format_bytes,
                                gpt_parameter_count)


@pytest.mark.parametrize(("n_layer", "n_embd", "vocab", "block", "bias"),
                         [(4, 128, 256, 128, True), (2, 64, 300, 16, False), (1, 8, 2, 2, True), (3, 24, 50, 7, False)])
def test_parameter_count_is_exactly_the_gpts(n_layer, n_embd, vocab, block, bias):
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=n_embd, bias=bias))
    assert gpt_parameter_count(n_layer, n_embd, vocab, block, bias) == sum(p.numel() for p in model.parameters())


def test_the_estimate_adds_up_and_scales_as_its_formula():
    sizes = dict(n_layer=4, n_embd=128, vocab_size=256, block_size=128, batch_size=32)
    e = estimate_gpt_training(**sizes)
    params = gpt_parameter_count(4, 128, 256, 128)
    assert (e.parameters, e.gradients, e.optimizer_state) == (4 * params, 4 * params, 8 * params)
    assert e.total == e.parameters + e.gradients + e.optimizer_state + e.activations + e.batches
    assert estimate_gpt_training(**{**sizes, "batch_size": 64}).activations == 2 * e.activations
    assert estimate_gpt_training(**sizes, precision="bf16").activations < e.activations
    assert estimate_gpt_training(**sizes, optimizer="sgd").optimizer_state == 0
    assert estimate_gpt_training(**sizes, optimizer="someone_elses").optimizer_state == e.optimizer_state
    assert estimate_gpt_training(**sizes, grad_accum=4).batches == 4 * e.batches
    assert set(OPTIMIZER_STATE_FLOATS) >= {"adamw", "sgd", "lion", "ademamix"}


def test_the_estimate_is_not_far_below_what_a_step_really_holds():
    """One fp32 training step of a small GPT on the CPU: parameters, gradients and AdamW state are exact; the
    activations of the estimate are of the size of what autograd saves (within a factor of 3)."""
    torch.manual_seed(0)
    sizes = dict(n_layer=2, n_embd=64, vocab_size=256, block_size=64, batch_size=8)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
    x = torch.randint(0, 256, (8, 64))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, 256), x.view(-1))
    loss.backward()
    estimate = estimate_gpt_training(**sizes)
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    saved_activations = sum(saved) - parameter_bytes  # weights are saved too; they are counted as parameters
    assert estimate.parameters == parameter_bytes
    assert saved_activations / 3 < estimate.activations < saved_activations * 3


def test_available_memory_is_positive_and_at_most_the_machines():
    import os

    free = available_memory()
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_format_bytes():
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(812 * 2**30) == "812 GiB"
    assert format_bytes(3 * 2**60) == "3.0 EiB"


def test_config_validation_refuses_what_cannot_fit(monkeypatch):
    monkeypatch.setattr("keel.models.memory.available_memory", lambda device="cpu": 1 << 30)
    needed = r"^model: about \d\.\d GiB needed \(parameters .*\), 1\.0 GiB available on cpu"
    with pytest.raises(KeelError, match=needed):
        load_config(overrides=["device=cpu", "model.n_layer=24", "model.n_embd=512", "data.batch_size=16"])
    load_config(overrides=["device=cpu", "model.n_layer=2"])  # the default sizes fit easily
    load_config(overrides=["device=cpu", "data.batch_size=16", "task=digits"])  # not a GPT: no model block
    with pytest.raises(KeelError, match="model: a setting of task lm, not of task 'digits'"):
        load_config(overrides=["device=cpu", "model.n_layer=24", "task=digits"])


def test_on_cuda_the_free_gpu_memory_is_checked_and_the_ram_the_build_needs(monkeypatch):
    """No GPU needed: torch.cuda.mem_get_info is stood in for (the code path is the one a GPU machine takes)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    assert available_memory("cuda") == 3 << 30 and available_memory("cuda:0") == 3 << 30
    with pytest.raises(KeelError, match=r"GiB needed \(parameters .*\), 3\.0 GiB available on cuda;"):
        load_config(overrides=["device=cuda", "model.n_layer=24", "model.n_embd=1024", "data.batch_size=16"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200 << 30, 200 << 30))
    monkeypatch.setattr("keel.models.memory._meminfo_available", lambda: 1 << 30)
    monkeypatch.setattr("keel.models.memory._cgroup_room", lambda: None)
    with pytest.raises(KeelError, match=r"GiB needed for the parameters while the model is built, 1\.0 GiB available "
                                        r"on cpu"):
        load_config(overrides=["device=cuda", "model.n_layer=24", "model.n_embd=2048", "data.batch_size=1"])


def test_an_unknown_amount_of_memory_checks_nothing(monkeypatch):
    def no_cuda(device=None):
        raise RuntimeError("no CUDA here")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    assert available_memory("cuda") is None
    load_config(overrides=["device=cuda", "model.n_layer=2"])
