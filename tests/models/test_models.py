import torch

from keel.models import GPT, GPTConfig, lm_loss_sum, sample_tokens


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


def test_sampling_from_non_finite_logits_goes_on():
    """A diverged model (optimizer.lr=1e18) gives NaN/inf logits: sampling must not fail the run's report."""
    idx = torch.zeros((2, 1), dtype=torch.long)
    for bad in (float("nan"), float("inf"), float("-inf")):
        def logits_of(x, bad=bad):
            logits = torch.zeros(x.shape[0], x.shape[1], 5)
            logits[0] = bad  # row 0: no finite probability left; row 1: finite
            return logits
        for top_k in (None, 2):
            generator = torch.Generator().manual_seed(0)
            out = sample_tokens(logits_of, idx, 4, context=8, top_k=top_k, generator=generator)
            assert out.shape == (2, 5) and int(out.min()) >= 0 and int(out.max()) < 5
    nan = torch.full((1, 1, 3), float("nan"))  # no distribution left: tokens are drawn uniformly
    out = sample_tokens(lambda x: nan.expand(1, x.shape[1], 3), torch.zeros((1, 1), dtype=torch.long), 60, 8)
    assert set(out[0, 1:].tolist()) == {0, 1, 2}


def test_sampling_finite_logits_is_unchanged_by_the_guard():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros((1, 1), dtype=torch.long)
    got = model.generate(idx, 6, top_k=4, generator=torch.Generator().manual_seed(3))
    logits_of = model  # the reference: torch.multinomial over softmax, as before the guard
    expected, generator = idx, torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(6):
            logits = logits_of(expected[:, -8:])[:, -1, :]
            kth = torch.topk(logits, 4).values[:, [-1]]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            expected = torch.cat([expected, torch.multinomial(probs, 1, generator=generator)], dim=1)
    assert torch.equal(got, expected)
