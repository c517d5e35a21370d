"""The optimizer registry, config checks and parameter-group helpers."""

import math

import pytest
import torch
from torch import nn

import keel.optim as ko
from keel.errors import KeelError
from keel.optim.torch_kernels import choose_kernels
from keel.timeunits import Timeline

REQUIRED_NAMES = "sgd momentum nesterov rmsprop adam adamw nadam radam adafactor muon lion ademamix soap".split()
requires_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
BUILDABLE = [pytest.param(n, marks=requires_muon) if n == "muon" else n for n in REQUIRED_NAMES]


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyLM(nn.Module):
    """Embedding, three blocks, final norm and a head tied to the embedding."""

    def __init__(self, vocab=11, width=8, depth=3, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))


def loss_of(model):
    idx = torch.arange(11) % 7
    return nn.functional.cross_entropy(model(idx), (idx + 1) % 11)


def decay_of(optimizer):
    return {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}


def scale_of(optimizer):
    return {n: g["lr_scale"] for g in optimizer.param_groups for n in g["param_names"]}


def test_registry_has_every_required_name_with_a_description():
    listed = ko.names()
    for name in REQUIRED_NAMES:
        assert name in listed and "defaults:" in listed[name]


@pytest.mark.parametrize("name", BUILDABLE)
def test_every_optimizer_builds_for_a_model_and_steps(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = ko.create(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # SOAP's first step only initialises its preconditioner
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    assert all(g["lr"] == pytest.approx(ko.get(name).lr * g["lr_scale"]) for g in opt.param_groups)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_adamw_groups_exempt_biases_norms_and_embeddings_from_weight_decay():
    opt = ko.create("adamw", TinyLM(), lr=1e-3, weight_decay=0.1)
    decay = decay_of(opt)
    assert decay["embed.weight"] == 0.0
    assert decay["blocks.0.norm.weight"] == 0.0 and decay["blocks.0.norm.bias"] == 0.0
    assert decay["blocks.0.fc.bias"] == 0.0 and decay["norm_f.weight"] == 0.0
    assert decay["blocks.0.fc.weight"] == 0.1 and decay["head.weight"] == 0.1
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


def test_no_decay_is_configurable():
    decay = decay_of(ko.create("adamw", TinyLM(), weight_decay=0.1, no_decay=[]))
    assert set(decay.values()) == {0.1}
    decay = decay_of(ko.create("adamw", TinyLM(), weight_decay=0.1, no_decay=["bias", "head"]))
    assert decay["embed.weight"] == 0.1 and decay["head.weight"] == 0.0 and decay["blocks.1.fc.bias"] == 0.0


def test_tied_head_counts_as_embedding():
    decay = decay_of(ko.create("adamw", TinyLM(tied=True), weight_decay=0.1))
    assert "head.weight" not in decay and decay["embed.weight"] == 0.0


def test_plain_parameter_list_is_one_group_with_lr_scale():
    model = nn.Linear(3, 2)
    opt = ko.create("adam", model.parameters(), lr=0.5)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr_scale"] == 1.0
    with pytest.raises(KeelError, match="need a model"):
        ko.create("adam", model.parameters(), freeze=["weight"])


def test_lr_scales_and_layer_decay_multiply():
    model = TinyLM(depth=3)
    scales = scale_of(ko.create("adamw", model, lr=1.0, layer_lr_decay=0.5, lr_scales={"embed": 0.1}))
    assert scales["head.weight"] == 1.0 and scales["norm_f.weight"] == 1.0
    assert scales["blocks.2.fc.weight"] == 0.5
    assert scales["blocks.0.fc.weight"] == 0.125
    assert scales["embed.weight"] == pytest.approx(0.1 * 0.0625)
    opt = ko.create("adamw", TinyLM(), lr=2.0, lr_scales={"blocks.1.*": 0.25})
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["blocks.1.norm.bias"] == 0.5 and lrs["blocks.0.fc.weight"] == 2.0


def test_freeze_by_pattern_and_by_depth():
    model = TinyLM(depth=3)
    opt = ko.create("adamw", model, freeze_depth=2)
    names = {n for g in opt.param_groups for n in g["param_names"]}
    assert not any(n.startswith(("embed", "blocks.0.")) for n in names)
    assert not model.embed.weight.requires_grad and not model.blocks[0].fc.weight.requires_grad
    assert model.blocks[1].fc.weight.requires_grad
    model = TinyLM()
    ko.create("sgd", model, freeze=["blocks.2.*", "head"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.2.{n}" for n in ("norm.weight", "norm.bias", "fc.weight", "fc.bias")} | {"head.weight"}
    with pytest.raises(KeelError, match="matches no parameter"):
        ko.create("sgd", TinyLM(), freeze=["decoder"])


def test_layer_depths_from_names():
    depths, blocks = ko.layer_depths(["wte.weight", "h.0.w", "h.1.w", "ln_f.weight", "lm_head.weight"])
    assert blocks == 2
    assert depths == {"wte.weight": 0, "h.0.w": 1, "h.1.w": 2, "ln_f.weight": 3, "lm_head.weight": 3}


def test_check_config_fills_defaults_and_validates():
    spec = {"name": "adamw", "lr": 6e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}
    checked = ko.check_config(spec)
    assert checked["betas"] == (0.9, 0.95) and checked["eps"] == 1e-8
    assert checked["no_decay"] == ["bias", "norm", "embedding"]
    opt = ko.from_config(spec, TinyLM())
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "adamww"}, r"optimizer\.name: 'adamww' is not an optimizer; did you mean 'adamw'\? allowed: sgd"),
        ({"name": "adamw", "beta": [0.9, 0.9]}, r"optimizer\.beta: .*did you mean 'betas'\? allowed: lr, betas"),
        ({"name": "adamw", "betas": [0.9]}, r"optimizer\.betas: \[0\.9\] .*a list of 2 numbers"),
        ({"name": "adamw", "lr": -1}, r"optimizer\.lr: -1"),
        ({"name": "sgd", "momentum": 0.9}, r"optimizer\.momentum: not a hyperparameter of 'sgd'"),
        ({"name": "adamw", "layer_lr_decay": 2}, r"optimizer\.layer_lr_decay: 2 "),
        ({"lr": 1e-3}, r"optimizer\.name: missing"),
        ("adamw", r"optimizer: 'adamw' is not a mapping"),
    ],
)
def test_check_config_errors_name_the_key_and_the_allowed(spec, message):
    with pytest.raises(KeelError, match=message):
        ko.check_config(spec)


def test_error_key_prefix_is_configurable():
    with pytest.raises(KeelError, match=r"^opt2\.name"):
        ko.check_config({"name": "adan"}, key="opt2")


@requires_muon
def test_muon_hybrid_splits_hidden_matrices_from_the_rest():
    model = TinyLM()
    opt = ko.create("muon", model, lr=0.02, adam_lr=3e-4)
    kinds = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert {n for n, k in kinds.items() if k == "muon"} == {f"blocks.{i}.fc.weight" for i in range(3)}
    for g in opt.param_groups:
        expected = 0.02 if g["kind"] == "muon" else 3e-4
        assert g["lr"] == pytest.approx(expected)
        assert g["lr_scale"] == pytest.approx(expected / 0.02)


@requires_muon
def test_muon_hybrid_matches_torch_muon_and_adamw_run_separately():
    torch.manual_seed(0)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = ko.create("muon", model, lr=0.02, weight_decay=0.1, adam_lr=1e-3, adam_weight_decay=0.0, no_decay=[])
    hidden = [twin.blocks[i].fc.weight for i in range(3)]
    rest = [p for p in twin.parameters() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    # keel chooses torch's kernels for the AdamW groups by device (keel.optim.torch_kernels): the same choice here, since
    # the fused and for-loop kernels round differently in the last bit
    kernels = choose_kernels(torch.optim.AdamW, rest, fused=None, foreach=None)
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, **kernels)
    for _ in range(5):
        for m, opts in ((model, [opt]), (twin, [muon, adamw])):
            loss_of(m).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@requires_muon
def test_muon_on_plain_parameters_splits_by_shape():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = ko.create("muon", model.parameters())
    kinds = {g["kind"]: len(g["params"]) for g in opt.param_groups}
    assert kinds == {"muon": 2, "adamw": 2}


def test_muon_without_torch_muon_is_an_error_naming_the_torch_version(monkeypatch):
    """torch.optim.Muon first shipped in torch 2.9; keel's floor is older."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    attempts = {
        "check_config": lambda: ko.check_config({"name": "muon"}),
        "create": lambda: ko.create("muon", TinyLM()),
        "class": lambda: ko.MuonWithAdamW(TinyLM().parameters()),
    }
    for how, attempt in attempts.items():
        with pytest.raises(KeelError, match=r"torch >= 2\.9 \(torch\.optim\.Muon\)") as error:
            attempt()
        assert how == "class" or str(error.value).startswith("optimizer.name: 'muon' needs torch >= 2.9")
    assert ko.check_config({"name": "adamw"})["name"] == "adamw"  # the others are unaffected
    assert "muon" in ko.names()  # still listed, with what it needs when built


def test_ademamix_warmups_take_time_units_resolved_with_the_run_lengths():
    """The paper sets both warmups to the run length: "100%" (or epochs, tokens) from a config."""
    from keel.config import load_config

    config = load_config(None, ["optimizer={name: ademamix, alpha_warmup: 100%, beta3_warmup: 100%}", "max_steps=50"])
    assert config.optimizer["alpha_warmup"] == "100%"  # checked for syntax only, kept as written
    opt = ko.from_config(config.optimizer, TinyLM(), total_steps=config.max_steps)
    assert {(g["alpha_warmup"], g["beta3_warmup"]) for g in opt.param_groups} == {(50, 50)}

    timeline = Timeline.at_rate(1000, steps_per_epoch=30, tokens_per_step=256)
    spec = {"name": "ademamix", "alpha_warmup": "2ep", "beta3_warmup": "10ktok"}
    group = ko.from_config(spec, TinyLM(), timeline=timeline).param_groups[0]
    assert (group["alpha_warmup"], group["beta3_warmup"]) == (60, 40)  # the first step at 10000 tokens: 40 x 256
    group = ko.create("ademamix", TinyLM(), t_alpha_beta3="25%", timeline=timeline).param_groups[0]
    assert (group["alpha_warmup"], group["beta3_warmup"]) == (250, 250)
    group = ko.create("ademamix", TinyLM(), alpha_warmup="70", beta3_warmup=80).param_groups[0]
    assert (group["alpha_warmup"], group["beta3_warmup"]) == (70, 80)  # steps need no run length


@pytest.mark.parametrize(
    "hparams, total_steps, message",
    [
        ({"alpha_warmup": "100%"}, None, r"optimizer\.alpha_warmup: '100%' is a fraction of the run, but the run"),
        ({"beta3_warmup": "3ep"}, 9, r"optimizer\.beta3_warmup: '3ep' is in epochs"),
        ({"beta3_warmup": "1Mtok"}, 9, r"optimizer\.beta3_warmup: '1Mtok' is in tokens, but the tokens per step"),
        ({"t_alpha_beta3": "0.5%"}, 50, r"optimizer\.t_alpha_beta3: '0\.5%' is 0 steps in this run"),
    ],
)
def test_ademamix_lengths_that_cannot_be_resolved_name_the_key(hparams, total_steps, message):
    with pytest.raises(KeelError, match=message):
        ko.from_config({"name": "ademamix", **hparams}, TinyLM(), total_steps=total_steps)


@pytest.mark.parametrize("value", ["abc", "0%", "150%", "2 epochs", 0, -5, 2.5, True])
def test_check_config_validates_the_syntax_of_lengths_without_the_run_length(value):
    with pytest.raises(KeelError, match=r"optimizer\.alpha_warmup: .* allowed: null or a length of at least 1 step"):
        ko.check_config({"name": "ademamix", "alpha_warmup": value})


def test_trainer_resolves_ademamix_warmups_with_its_run_lengths(tmp_path, tiny_overrides):
    from keel.config import load_config
    from keel.train import Callback, train

    class Groups(Callback):
        name = "groups"

        def on_run_start(self, trainer):
            self.seen = [(g["alpha_warmup"], g["beta3_warmup"]) for g in trainer.optimizer.param_groups]
            self.steps_per_epoch = trainer.timeline.steps("1ep", "epoch")

    overrides = ["optimizer={name: ademamix, alpha_warmup: 100%, beta3_warmup: 1ep}", *tiny_overrides]
    config = load_config(None, overrides + ["max_steps=20", "eval_interval=20", f"out_dir={tmp_path / 'run'}"])
    groups = Groups()
    result = train(config, callbacks=[groups], quiet=True)
    assert result["step"] == 20 and math.isfinite(result["val_loss"])
    assert set(groups.seen) == {(20, groups.steps_per_epoch)}


def test_a_run_records_the_kernels_keels_own_optimizers_chose():
    """keel's optimizers keep their implementation choices outside torch's ``defaults``; the run record
    (``chosen_kernels``) still says what each runs with, device=cpu."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    kernels = {name: ko.chosen_kernels(ko.create(name, model, total_steps=10))
               for name in ("muon", "soap", "lion", "ademamix", "adamw")}
    assert kernels["muon"]["batched"] in (True, False) and kernels["muon"]["ns_dtype"] in ("float32", "bfloat16")
    assert {"adam_fused", "adam_foreach"} <= kernels["muon"].keys()
    assert kernels["soap"] == {"batched": False, "matmul_precision": "highest"}  # the CPU: per parameter, exact
    assert kernels["lion"] == {"fused": False} and kernels["ademamix"] == {"fused": False}  # too small to compile
    assert kernels["adamw"] == {"fused": True, "foreach": False}  # torch's, chosen for the CPU
