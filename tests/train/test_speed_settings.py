"""What a run chooses for speed: `precision: auto`, `tf32`, `compile`, `mfu_peak_tflops`; the run banner that says
so; MFU in step records and the progress line (its arithmetic); a compiled model's checkpoints named as the
module's own. All on the CPU (device=cpu); the CUDA choices through the decision functions, and the run itself
on a GPU in the `gpu`-marked tests."""

import math

import pytest
import torch

from keel.config import load_config
from keel.models import GPT, GPTConfig
from keel.precision import Precision, resolve_precision
from keel.rundir.metrics import read_metrics
from safetensors.torch import load_file as read_safetensors
from keel.tasks.lm import LanguageModelTask
from keel.train import Trainer, train
from keel.train import performance
from keel.train.loop import _Progress
from keel.train.performance import (COMPILE_AUTO_MIN_SECONDS, EAGER_MFU, MfuMeter, choose_compile, mfu, peak_tflops,
                                    table_peak)

SHORT = ["max_steps=12", "schedule.warmup=2", "eval_interval=12", "checkpoint_interval=12", "device=cpu"]


# ---- precision: auto ----------------------------------------------------------------------------------------------

def test_auto_precision_is_fp32_on_the_cpu_so_no_cpu_number_changes():
    assert load_config(None, []).precision == "auto"
    assert resolve_precision("auto", "cpu") == ("fp32", "auto: fp32 on cpu")
    assert Precision("auto", "cpu").mode == "fp32" and Precision("auto", "cpu").scaler is None
    assert resolve_precision("bf16", "cpu") == ("bf16", "given")  # an explicit value wins


@pytest.mark.parametrize("capability, mode", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_auto_precision_on_cuda_is_bf16_where_the_device_has_it_else_fp16(capability, mode, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen, why = resolve_precision("auto", torch.device("cuda"))
    assert chosen == mode and why.startswith(f"auto: {mode} autocast")
    assert resolve_precision("fp32", torch.device("cuda")) == ("fp32", "given")


# ---- compile ------------------------------------------------------------------------------------------------------

def test_compile_auto_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_compile(True, cpu, None, 1, 1, None) == (True, "compile: true")  # explicit values win
    assert choose_compile(False, cuda, 1e9, 10**6, 10**6, 989.0) == (False, "compile: false")
    assert choose_compile("auto", cpu, 1e9, 10**6, 10**6, 1.0) == (False, "auto: not a CUDA run")
    assert not choose_compile("auto", cuda, None, 16384, 10**5, 989.0)[0]  # FLOPs unknown
    assert "mfu_peak_tflops" in choose_compile("auto", cuda, 8.55e8, 16384, 10**5, None)[1]
    # GPT-2 small at batch 16 x 1024: 8.55e8 FLOPs/token; the estimate reaches 10 minutes at about 12,700 steps
    per_step = 8.55e8 * 16384 / (EAGER_MFU * 989.0 * 1e12)
    threshold = math.ceil(COMPILE_AUTO_MIN_SECONDS / per_step)
    assert 12_000 < threshold < 13_500
    assert choose_compile("auto", cuda, 8.55e8, 16384, threshold, 989.0)[0]
    assert not choose_compile("auto", cuda, 8.55e8, 16384, threshold - 1, 989.0)[0]
    assert not choose_compile("auto", cuda, 8.55e8, 16384, 300, 989.0)[0]  # bench_gpu's 300-step headline


def test_compile_key_takes_auto_true_false_only():
    from keel.errors import KeelError

    assert load_config(None, ["compile=true"]).compile is True
    with pytest.raises(KeelError, match=r"^compile: 'sometimes' is not a choice; allowed: auto, true, false$"):
        load_config(None, ["compile=sometimes"])


def _eager_backend(monkeypatch):
    """torch.compile with dynamo's eager backend: the wiring of a compiled model without a compiler's minute."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager"))


def test_compiled_model_trains_the_same_and_checkpoints_the_modules_own_names(tmp_path, tiny_overrides,
                                                                              monkeypatch):
    eager = train(load_config(None, tiny_overrides + SHORT + [f"out_dir={tmp_path / 'eager'}"]), quiet=True)
    _eager_backend(monkeypatch)
    config = load_config(None, tiny_overrides + SHORT + ["compile=true", f"out_dir={tmp_path / 'compiled'}"])
    trainer = Trainer(config, quiet=True)
    assert trainer.compiled and type(trainer.train_model).__name__ == "OptimizedModule"
    compiled = trainer.fit()
    losses = [[r["loss"] for r in run["history"] if "grad_norm" in r] for run in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    names = set(read_safetensors(tmp_path / "compiled" / "model.safetensors"))
    checkpoint = next((tmp_path / "compiled" / "checkpoints").glob("step_*"))
    assert names == set(trainer.model.state_dict()) and not any("_orig_mod" in n for n in names)
    assert set(read_safetensors(checkpoint / "model.safetensors")) == names
    # resume, init_from and averaging read these files by the module's names
    more = load_config(None, tiny_overrides + ["max_steps=12", "schedule.warmup=2", "device=cpu", "compile=true",
                                               f"init_from={tmp_path / 'compiled'}", f"out_dir={tmp_path / 'next'}"])
    assert Trainer(more, quiet=True).compiled


@pytest.mark.slow
def test_compile_true_with_inductor_on_a_tiny_model(tmp_path, tiny_overrides):
    """The real torch.compile (inductor, a C++ compiler; about a minute on a loaded two-core machine)."""
    eager = train(load_config(None, tiny_overrides + SHORT + [f"out_dir={tmp_path / 'eager'}"]), quiet=True)
    compiled = train(load_config(None, tiny_overrides + SHORT + ["compile=true", f"out_dir={tmp_path / 'c'}"]),
                     quiet=True)
    losses = [[r["loss"] for r in run["history"] if "grad_norm" in r] for run in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert not any("_orig_mod" in n for n in read_safetensors(tmp_path / "c" / "model.safetensors"))


# ---- MFU ----------------------------------------------------------------------------------------------------------

def test_gpt_flops_per_token_is_6n_plus_attention():
    config = GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_embd=32, n_head=4)
    model = GPT(config)
    task = LanguageModelTask()
    task.block_size = 64
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embeddings  # the head's matrix counts: it is a product
    assert task.flops_per_token(model) == 6 * n + 12 * 2 * 32 * 64
    batch = (torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))
    assert task.flops_per_token(model, batch) == 6 * n + 12 * 2 * 32 * 16  # a shorter sequence (seq warmup)
    # GPT-2 small with a 50,304-token vocabulary: 123.7M matrix parameters, 855M FLOPs per token at context 1024
    gpt2 = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_embd=768, n_head=12))
    task.block_size = 1024
    assert task.flops_per_token(gpt2) == pytest.approx(8.554e8, rel=1e-3)


def test_a_tied_output_head_counts_as_a_product():
    """GPT-2's output head shares the token embedding's weight, so named_parameters lists it once, as the
    embedding: the head's product (vocab x width per token) must still be counted."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=16,
                                                                 n_layer=1, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight
    task = LanguageModelTask()
    others = sum(p.numel() for name, p in model.named_parameters() if "wte" not in name and "wpe" not in name)
    assert task.flops_per_token(model) == 6 * (others + 100 * 16)


def test_mfu_arithmetic_and_the_meter(monkeypatch):
    assert mfu(1e9, 500_000, 1.0, 989.0) == pytest.approx(1e9 * 5e5 / 989e12)
    assert mfu(1e9, 500_000, 1.0, 989.0, world_size=2) == pytest.approx(1e9 * 5e5 / 989e12 / 2)
    assert mfu(None, 1, 1.0, 989.0) is None and mfu(1e9, 1, 1.0, None) is None and mfu(1e9, 0, 1.0, 1.0) is None

    class Clock:
        now = 100.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    monkeypatch.setattr(performance, "time", Clock)
    meter = MfuMeter(peak=2.0)
    for seconds in (0.5, 1.5):  # two steps of 1,000 tokens: 2,000 tokens in 2 s
        meter.start_step()
        Clock.now += seconds
        meter.end_step(1000)
        Clock.now += 7.0  # evaluation, checkpoint, logging: not training time
    assert meter.read(4e9) == pytest.approx(4e9 * 2000 / 2.0 / 2e12)
    assert meter.read(4e9) is None  # nothing since the last read


def test_peak_table_and_mfu_peak_tflops():
    assert table_peak("NVIDIA H200") == 989.0 and table_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert table_peak("NVIDIA H100 PCIe") == 756.0 and table_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert table_peak("NVIDIA A10") == 125.0 and table_peak("NVIDIA A10G") is None  # whole words
    assert table_peak("NVIDIA L4") == 121.0 and table_peak("NVIDIA L40S") == 362.0
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 1.5) == 1.5  # mfu_peak_tflops makes MFU work on a CPU too


def test_step_records_and_banner_say_mfu_and_the_choices(tmp_path, tiny_overrides, capsys):
    train(load_config(None, tiny_overrides + SHORT + [f"out_dir={tmp_path / 'plain'}"]))
    banner = capsys.readouterr().out
    assert "speed: cpu; precision fp32 (auto: fp32 on cpu); compile off (auto: not a CUDA run); MFU not measured " \
           "(no peak known: set mfu_peak_tflops)" in banner
    records = [r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "grad_norm" in r]
    assert records and not any("mfu" in r for r in records)  # no peak on a CPU: the records are as before

    train(load_config(None, tiny_overrides + SHORT + ["mfu_peak_tflops=0.001", "precision=bf16",
                                                      f"out_dir={tmp_path / 'mfu'}"]))
    banner = capsys.readouterr().out
    assert "precision bf16; compile off" in banner and "MFU against 0.001 TFLOP/s" in banner
    records = [r for r in read_metrics(tmp_path / "mfu" / "metrics.jsonl") if "grad_norm" in r]
    assert len(records) == 12 and all(0 < r["mfu"] < 100 for r in records)


def test_progress_line_shows_mfu_where_known(capsys):
    from keel.timeunits import Time, Timeline
    from keel.train.loop import TrainState

    progress = _Progress(Time.steps(1), enabled=True, unit="tokens/s", timeline=Timeline.of_steps(10))
    progress.maybe_print(TrainState(step=1), 10, 2.0, 1e-3, 1000.0, 1.0, TrainState(step=0), 0.315)
    progress.maybe_print(TrainState(step=2), 10, 2.0, 1e-3, 1000.0, 2.0, TrainState(step=1))
    lines = capsys.readouterr().out.splitlines()
    assert "| 1,000 tokens/s | MFU 31.5% | ETA" in lines[0] and "MFU" not in lines[1]


def test_tf32_is_left_alone_on_the_cpu(tmp_path, tiny_overrides):
    before = torch.backends.cuda.matmul.allow_tf32
    train(load_config(None, tiny_overrides + SHORT + ["tf32=true", f"out_dir={tmp_path / 'r'}"]), quiet=True)
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_picks_bf16_tf32_and_mfu_from_the_table(tmp_path, tiny_overrides, capsys):
    from keel.train.callbacks import Callback

    seen = {}

    class Probe(Callback):
        name = "probe"

        def on_step_end(self, trainer):
            seen["tf32"] = torch.backends.cuda.matmul.allow_tf32

    overrides = [o for o in tiny_overrides if not o.startswith("threads")] + ["max_steps=12", "schedule.warmup=2",
                                                                              "device=cuda"]
    result = train(load_config(None, overrides + [f"out_dir={tmp_path / 'r'}"]), callbacks=[Probe()])
    banner = capsys.readouterr().out
    bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert f"precision {'bf16' if bf16 else 'fp16'} (auto:" in banner and "TF32 matmuls on" in banner
    assert seen["tf32"] is True
    if table_peak(torch.cuda.get_device_name()) is not None:
        assert all("mfu" in r for r in result["history"] if "grad_norm" in r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_reach_the_gpu_through_pinned_memory_with_their_values():
    from keel.tasks import move_to_device

    x = torch.arange(300_000).reshape(3, -1)  # 2.4 MB
    moved = move_to_device({"x": x, "pair": (x, 1)}, torch.device("cuda"))
    assert moved["x"].is_cuda and moved["pair"][1] == 1 and not x.is_pinned()
    assert torch.equal(moved["x"].cpu(), x) and torch.equal(moved["pair"][0].cpu(), x)
