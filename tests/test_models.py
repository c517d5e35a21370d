import torch

from keel.models import GPT, GPTConfig, lm_loss_sum


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 50
    out_x, out_y = model(x), model(y)
    assert torch.allclose(out_x[:, :10], out_y[:, :10], atol=1e-6)
    assert not torch.allclose(out_x[:, 10:], out_y[:, 10:])


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        loss = lm_loss_sum(model(x), x) / x.numel()
    assert abs(float(loss) - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_loss_sum_ignores_masked_targets():
    logits = torch.randn(1, 4, 5)
    targets = torch.tensor([[1, 2, -100, -100]])
    full = torch.nn.functional.cross_entropy(logits[0, :2], targets[0, :2], reduction="sum")
    assert torch.allclose(lm_loss_sum(logits, targets), full)


def test_generate_leaves_global_rng_untouched():
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(1)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 12, generator=generator, top_k=5)
    assert out.shape == (1, 13)
    assert torch.equal(torch.get_rng_state(), state)
