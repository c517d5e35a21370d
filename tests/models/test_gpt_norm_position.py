"""model.norm_position and model.zero_init_residual: the formulas, the default unchanged, and training with each."""

import pytest
import torch

from keel.config import load_config
from keel.errors import KeelError
from keel.models import GPT, GPTConfig
from keel.train import train


def _model(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, **options))


def test_default_is_pre_norm_with_the_same_parameters():
    default, pre = _model(), _model(norm_position="pre", zero_init_residual=False)
    assert list(default.state_dict()) == list(pre.state_dict())
    for (name, a), (_, b) in zip(default.state_dict().items(), pre.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any("gate" in name for name in default.state_dict())


@pytest.mark.parametrize("position", ["pre", "post", "residual"])
def test_block_formulas(position):
    model = _model(norm_position=position)
    block = model.blocks[0]
    x = torch.randn(3, 8, 16)
    if position == "pre":
        h = x + block.attn(block.ln_1(x))
        expected = h + block.mlp(block.ln_2(h))
    elif position == "post":
        h = block.ln_1(x + block.attn(x))
        expected = block.ln_2(h + block.mlp(h))
    else:
        h = x + block.ln_1(block.attn(x))
        expected = h + block.ln_2(block.mlp(h))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("position", ["pre", "residual"])
def test_zero_init_residual_starts_every_block_as_the_identity(position):
    model = _model(norm_position=position, zero_init_residual=True)
    x = torch.randn(2, 8, 16)
    for block in model.blocks:
        assert block.attn_gate.item() == 0.0 and block.mlp_gate.item() == 0.0
        torch.testing.assert_close(block(x), x)
    idx = torch.randint(0, 17, (2, 8))
    model(idx).sum().backward()
    assert model.blocks[0].attn_gate.grad is not None and float(model.blocks[0].attn_gate.grad.abs()) > 0


@pytest.mark.parametrize("options", [["model.norm_position=post"], ["model.norm_position=residual"],
                                     ["model.zero_init_residual=true"]])
def test_each_option_trains(tmp_path, tiny_overrides, options):
    config = load_config(None, [*tiny_overrides, "max_steps=40", "eval_interval=40", "sample.tokens=0",
                                f"out_dir={tmp_path / 'run'}", *options])
    result = train(config, quiet=True)
    assert result["val_loss"] < result["unigram_baseline"] + 0.3
    assert result["val_loss"] < 5.0  # from ln(256) = 5.55


def test_options_refused_with_a_hugging_face_model():
    with pytest.raises(KeelError, match="norm_position"):
        load_config(None, ["model.norm_position=residual", "model.hf_config={model_type: gpt2}"])
    with pytest.raises(KeelError, match="norm_position"):
        load_config(None, ["model.norm_position=middle"])
