"""Muon's batched Newton-Schulz path (the default on CUDA), forced on the CPU: the same update as torch.optim.Muon's
one-matrix-at-a-time path within bfloat16 rounding, float32 iterations close to float64 ones, the same state
(resume across paths), and the hyperparameter checks that keep a bad value from reaching torch.

Tolerance: in bfloat16, torch's Newton-Schulz output is 1.4e-2 (relative Frobenius norm) away from the float64
iteration on these shapes; two bfloat16 implementations that sum in another order may differ by that much again,
so the paths must agree to BF16_TOLERANCE = 3e-2 (on the CPU they agree bit for bit: torch's CPU kernels round the
batched and the single products alike). float32 iterations agree with float64 ones to 1e-5.
"""

import io

import pytest
import torch
from torch import nn

import keel.optim as ko
from keel.errors import KeelError
from keel.optim.muon import MuonWithAdamW, newton_schulz

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

BF16_TOLERANCE = 3e-2
#: wide, tall (stacked with the wide ones of the transposed shape), square, repeated shapes, an odd one
SHAPES = [(32, 32), (32, 96), (96, 32), (32, 32), (128, 32), (32, 128), (48, 20)]


def _train(device="cpu", steps=4, **options):
    torch.manual_seed(0)
    params = [nn.Parameter((torch.randn(s) * 0.02).to(device)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = MuonWithAdamW([{"params": params, "kind": "muon"}], lr=0.02, weight_decay=0.1, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        opt.step()
    return opt, [(p.detach() - s).float().cpu() for p, s in zip(params, start)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_path_equals_torchs_muon_within_bfloat16_rounding(nesterov):
    torch_path, reference = _train(batched=False, nesterov=nesterov)
    batched, moved = _train(batched=True, nesterov=nesterov)
    assert not torch_path.uses_batched() and batched.uses_batched()
    for shape, a, b in zip(SHAPES, moved, reference):
        assert _relative(a, b) <= BF16_TOLERANCE, shape


def test_float32_iterations_match_float64_and_differ_from_bfloat16_by_its_rounding():
    x = torch.randn(3, 32, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = newton_schulz(x)
    assert _relative(newton_schulz(x.float()).double(), exact) <= 1e-5
    in_bf16 = _relative(newton_schulz(x.bfloat16()).double(), exact)
    assert 1e-3 < in_bf16 <= BF16_TOLERANCE
    # the iteration makes every singular value about 1 (0.7 to 1.2 with Muon's coefficients)
    singular = torch.linalg.svdvals(exact)
    assert singular.min() > 0.6 and singular.max() < 1.25
    _, moved32 = _train(batched=True, ns_dtype="float32")
    _, moved16 = _train(batched=False)
    for a, b in zip(moved32, moved16):
        assert _relative(a, b) <= BF16_TOLERANCE


def test_float32_iterations_run_full_float32_products_whatever_tf32_says(monkeypatch):
    """ns_dtype float32 is asked for accuracy: under a run's TF32 setting (on by default on CUDA) its products still
    run in full float32. The switch is torch's, so its value is seen on the CPU too (device=cpu); bfloat16 stacks
    leave it as the run set it."""
    from keel.optim import muon
    from keel.precision import _tf32_now, cuda_tf32

    seen = []

    def spy(stack, *args):
        seen.append((stack.dtype, _tf32_now()[1]))
        return newton_schulz(stack, *args)

    monkeypatch.setattr(muon, "newton_schulz", spy)
    with cuda_tf32(True):
        on = _tf32_now()[1]
        _train(steps=1, batched=True, ns_dtype="float32")
        _train(steps=1, batched=True, ns_dtype="bfloat16")
        assert _tf32_now()[1] == on  # restored after the step
    off = {torch.float32: [v for d, v in seen if d == torch.float32], torch.bfloat16: [v for d, v in seen
                                                                                    if d == torch.bfloat16]}
    assert off[torch.float32] and all(v != on for v in off[torch.float32])
    assert off[torch.bfloat16] and all(v == on for v in off[torch.bfloat16])


def test_batched_stack_equals_one_matrix_at_a_time():
    """Batching is only a layout: each matrix of a stack comes out as it would alone (float64: no rounding)."""
    x = torch.randn(4, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    one_by_one = torch.stack([newton_schulz(m.unsqueeze(0))[0] for m in x])
    torch.testing.assert_close(newton_schulz(x), one_by_one, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rows <= cols"):
        newton_schulz(x.mT)


def test_paths_share_their_state_so_a_run_resumes_on_either():
    batched, _ = _train(batched=True)
    saved = io.BytesIO()
    torch.save(batched.state_dict(), saved)
    saved.seek(0)
    params = [p for g in batched.param_groups for p in g["params"]]
    other = MuonWithAdamW([{"params": params, "kind": "muon"}], lr=0.02, weight_decay=0.1, batched=False)
    other.load_state_dict(torch.load(saved, weights_only=True))
    for p in params:
        assert torch.equal(other.state[p]["momentum_buffer"], batched.state[p]["momentum_buffer"])
    assert set(batched.state[params[0]]) == {"momentum_buffer"}  # torch's Muon keeps the same key


def test_auto_batches_on_cuda_only_and_float32_needs_the_batched_path():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    assert not ko.create("muon", model).uses_batched()  # the CPU: torch's Muon, today's numbers
    assert ko.create("muon", model, batched=True).uses_batched()
    assert ko.create("muon", model, ns_dtype="float32").uses_batched()
    with pytest.raises(KeelError, match=r"optimizer\.ns_dtype: 'float32' needs the batched path"):
        ko.create("muon", model, batched=False, ns_dtype="float32")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"ns_steps": 100}, r"^optimizer\.ns_steps: 100 is not allowed for 'muon'; allowed: an integer in \[1, 99\]$"),
        ({"ns_steps": 0}, r"^optimizer\.ns_steps: 0 .*an integer in \[1, 99\]$"),
        ({"ns_steps": 2.5}, r"^optimizer\.ns_steps: 2\.5 "),
        ({"momentum": 1.0}, r"^optimizer\.momentum: 1\.0 .*\[0, 1\)"),
        ({"ns_dtype": "float16"}, r"^optimizer\.ns_dtype: 'float16' .*one of 'bfloat16', 'float32'"),
        ({"batched": "yes"}, r"^optimizer\.batched: 'yes' .*null or true or false"),
    ],
)
def test_muon_hyperparameters_are_checked_before_the_run(spec, message):
    """`optimizer.ns_steps=100` used to pass the config and fail inside torch.optim.Muon at the first step."""
    with pytest.raises(KeelError, match=message):
        ko.check_config({"name": "muon", **spec})


def test_the_class_refuses_what_torch_would_refuse_at_the_first_step():
    params = [nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match=r"ns_steps must be an integer in \[1, 99\], got 100"):
        MuonWithAdamW(params, ns_steps=100)
    assert ko.check_config({"name": "muon", "ns_steps": 99})["ns_steps"] == 99


def test_config_rejects_ns_steps_100_with_one_line(tmp_path):
    from keel.config import load_config

    with pytest.raises(KeelError) as error:
        load_config(None, ["recipe=fast", "optimizer.ns_steps=100", "device=cpu"])
    assert "\n" not in str(error.value) and "optimizer.ns_steps: 100" in str(error.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_batches_and_matches_torchs_muon():
    torch_path, reference = _train("cuda", batched=False)
    auto, moved = _train("cuda")
    assert auto.uses_batched() and not torch_path.uses_batched()
    for shape, a, b in zip(SHAPES, moved, reference):
        assert _relative(a, b) <= BF16_TOLERANCE, shape
