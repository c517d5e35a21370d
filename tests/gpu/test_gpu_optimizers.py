"""Every registered optimizer's step on CUDA equals its step on the CPU, within a stated tolerance.

Both copies start from the same weights and get the same gradients (drawn on the CPU, copied to the GPU), so what is
compared is the optimizer's step alone, over ``STEPS`` steps in float32, with the kernels keel chooses on each device
(torch's fused ones on CUDA). Marker ``gpu``: skipped where CUDA is absent.
"""

import copy

import pytest
import torch
from torch import nn

import keel.optim as ko

pytestmark = pytest.mark.gpu

STEPS = 5

#: |cuda - cpu| <= atol + rtol |cpu| for every parameter after STEPS steps, and why that much.
DEFAULT_TOLERANCE = (1e-5, 1e-6)  # elementwise float32 updates: fused CUDA kernels and CPU ones round differently
TOLERANCE = {
    "muon": (0.0, 2e-3),  # Newton-Schulz orthogonalisation in bfloat16: matmuls accumulate in another order
    "soap": (1e-3, 1e-4),  # eigenbases from torch.linalg.eigh on two devices (equal up to sign and rounding)
    "lion": (0.0, 2.5e-4),  # sign(update): an entry whose update rounds to about 0 may flip (2 lr = 2e-4)
}

requires_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
NAMES = [pytest.param(n, marks=requires_muon) if n == "muon" else n for n in ko.names()]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_on_cuda_equals_the_step_on_the_cpu(name):
    on_cpu = mlp()
    on_gpu = copy.deepcopy(on_cpu).cuda()
    cpu_optimizer, gpu_optimizer = ko.create(name, on_cpu), ko.create(name, on_gpu)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p, q in zip(on_cpu.parameters(), on_gpu.parameters()):
            grad = 0.1 * torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad.clone(), grad.cuda()
        cpu_optimizer.step()
        gpu_optimizer.step()
    rtol, atol = TOLERANCE.get(name, DEFAULT_TOLERANCE)
    for (key, p), q in zip(on_cpu.named_parameters(), on_gpu.parameters()):
        assert q.is_cuda
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    start = mlp()
    moved = max(float((p - q).abs().max()) for p, q in zip(start.parameters(), on_cpu.parameters()))
    assert moved > atol  # the steps moved the weights by more than the tolerance
