"""Checkpoint averaging: the arithmetic mean, integer copies, input resolution, errors, the streaming memory bound."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from keel.averaging import average_checkpoints, average_checkpoints_to_file, resolve_checkpoints
from keel.safetensors_io import SafetensorsReader, read_header, write_safetensors
from keel.cli.main import main
from keel.errors import KeelError
from keel.rundir import write_checkpoint


def make_checkpoints(folder, n=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths, states = [], []
    for i in range(n):
        state = {
            "blocks.0.weight": torch.randn(6, 5, generator=g).to(dtype),
            "blocks.0.bias": torch.randn(6, generator=g).to(dtype),
            "head.weight": torch.randn(3, 6, generator=g).to(dtype),
            "scalar": torch.tensor(float(i)).to(dtype),
            "bn.num_batches_tracked": torch.tensor(100 + i),
        }
        path = folder / f"c{i}.safetensors"
        save_file(state, str(path))
        paths.append(path)
        states.append(state)
    return paths, states


def test_average_is_the_arithmetic_mean(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=5)
    avg = average_checkpoints(paths)
    assert list(avg) == list(load_file(str(paths[-1])))  # same names
    for name in ("blocks.0.weight", "blocks.0.bias", "head.weight", "scalar"):
        mean = torch.stack([s[name].double() for s in states]).mean(0)
        torch.testing.assert_close(avg[name].double(), mean, rtol=1e-6, atol=1e-6)
        assert avg[name].dtype == torch.float32
    assert avg["bn.num_batches_tracked"].item() == 104  # integers: copied from the newest


def test_float64_inputs_average_in_float64(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=3, dtype=torch.float64)
    avg = average_checkpoints(paths)
    mean = (states[0]["head.weight"] + states[1]["head.weight"] + states[2]["head.weight"]) / 3
    torch.testing.assert_close(avg["head.weight"], mean, rtol=1e-15, atol=1e-15)


def test_bf16_inputs_accumulate_in_fp32(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=4, dtype=torch.bfloat16)
    avg = average_checkpoints(paths)
    assert avg["head.weight"].dtype == torch.bfloat16
    mean = torch.stack([s["head.weight"].float() for s in states]).mean(0)
    assert torch.equal(avg["head.weight"], mean.bfloat16())
    assert average_checkpoints(paths, dtype="float32")["head.weight"].dtype == torch.float32


def test_single_checkpoint_round_trips_bitwise(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=1)
    avg = average_checkpoints(paths)
    for name, value in states[0].items():
        assert torch.equal(avg[name], value)


def test_mismatched_keys_and_shapes_are_refused(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=2)
    wrong_shape = dict(states[0], **{"head.weight": torch.zeros(4, 6)})
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(KeelError, match=r"'head.weight' has shape \[4, 6\]"):
        average_checkpoints([tmp_path / "shape.safetensors", paths[1]])
    missing = {k: v for k, v in states[0].items() if k != "blocks.0.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeelError, match="'blocks.0.bias' is missing"):
        average_checkpoints([tmp_path / "missing.safetensors", paths[1]])
    extra = dict(states[0], extra=torch.zeros(2))
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KeelError, match="'extra'"):
        average_checkpoints([tmp_path / "extra.safetensors", paths[1]])


def test_prefix_restricts_averaging(tmp_path):
    paths, states = make_checkpoints(tmp_path, n=3)
    avg = average_checkpoints(paths, prefix="blocks.")
    mean = torch.stack([s["blocks.0.weight"] for s in states]).mean(0)
    torch.testing.assert_close(avg["blocks.0.weight"], mean)
    assert torch.equal(avg["head.weight"], states[-1]["head.weight"])  # outside the prefix: newest
    # a mismatch outside the prefix does not matter
    other = dict(states[0], **{"head.weight": torch.zeros(9)})
    save_file(other, str(tmp_path / "other.safetensors"))
    average_checkpoints([tmp_path / "other.safetensors", paths[1]], prefix="blocks.")
    with pytest.raises(KeelError, match="prefix"):
        average_checkpoints(paths, prefix="nothing.")


def fake_run(root, steps, val_losses, ema=False):
    """A run directory in keel's layout: checkpoints/step_X/{model,ema}.safetensors + manifest, metrics.jsonl."""
    g = torch.Generator().manual_seed(1)
    states = {}
    for step in steps:
        state = {"w": torch.randn(4, 4, generator=g), "n": torch.tensor(step)}

        def extra(folder, state=state):
            if ema:
                save_file({"w": state["w"] * 0.5, "n": state["n"]}, str(folder / "ema.safetensors"))

        write_checkpoint(root / "checkpoints", step, state, {}, {}, extra)
        states[step] = state
    (root / "checkpoints" / ".tmp-step_99999999").mkdir()  # an unfinished write is ignored
    (root / "checkpoints" / "step_00000099").mkdir()  # no manifest: absent
    shutil.copytree(root / "checkpoints" / f"step_{steps[-1]:08d}", root / "checkpoints" / "step_00000099.bak")
    with open(root / "metrics.jsonl", "w") as f:
        for step, loss in zip(steps, val_losses):
            f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
            f.write(json.dumps({"step": step, "tokens": 0, "val_loss": loss}) + "\n")
    return states


def test_resolve_run_last_and_best(tmp_path):
    run = tmp_path / "run"
    states = fake_run(run, [10, 20, 30, 40, 50], [3.0, 2.0, 2.5, 1.0, 4.0], ema=True)
    all_files = resolve_checkpoints([run])
    assert [f.parent.name for f in all_files] == [f"step_{s:08d}" for s in (10, 20, 30, 40, 50)]
    assert resolve_checkpoints([run], last=2) == all_files[-2:]
    assert resolve_checkpoints([run / "checkpoints"], last=2) == all_files[-2:]
    best = resolve_checkpoints([run], best=3)
    assert [f.parent.name for f in best] == ["step_00000020", "step_00000030", "step_00000040"]  # step order
    assert [f.name for f in resolve_checkpoints([run], weights="ema", last=1)] == ["ema.safetensors"]
    avg = average_checkpoints(best)
    torch.testing.assert_close(avg["w"], (states[20]["w"] + states[30]["w"] + states[40]["w"]) / 3)
    assert avg["n"].item() == 40  # the newest of the chosen
    with pytest.raises(KeelError, match="only 5 have"):
        resolve_checkpoints([run], best=6)
    with pytest.raises(KeelError, match="polyak.safetensors"):
        resolve_checkpoints([run], weights="polyak")
    with pytest.raises(KeelError, match="not inside a run"):
        resolve_checkpoints([all_files[0]], best=1)


def test_write_safetensors_is_readable_by_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(5), "c": torch.randn(2).bfloat16(), "d": torch.tensor(True),
               "e": torch.zeros(0, 3), "f": torch.tensor(1.5, dtype=torch.float64)}
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"k": "v"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name
    header, metadata = read_header(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"} and header["a"].shape == (3, 2)
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        assert torch.equal(reader.read("c"), tensors["c"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(KeelError, match="not a safetensors file"):
        average_checkpoints([tmp_path / "bad.safetensors"])


def test_average_to_file_and_command_line(tmp_path, capsys):
    paths, states = make_checkpoints(tmp_path, n=3)
    out = tmp_path / "avg.safetensors"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    assert "averaged 3 checkpoints" in capsys.readouterr().out
    loaded = load_file(str(out))
    expected = average_checkpoints(paths)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value)
    assert main(["average", str(tmp_path / "nope.safetensors"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    summary = average_checkpoints_to_file(paths, tmp_path / "last2.safetensors", last=2, dtype="float64")
    assert len(summary["inputs"]) == 2
    assert load_file(str(tmp_path / "last2.safetensors"))["head.weight"].dtype == torch.float64


MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch
    from keel.averaging import average_checkpoints_to_file
    from keel.safetensors_io import write_safetensors

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    paths, out = sys.argv[1:-1], sys.argv[-1]
    write_safetensors(out, {"w": torch.zeros(4)})  # warm up every code path on a tiny input first
    average_checkpoints_to_file([out, out], out)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    average_checkpoints_to_file(paths, out)
    print(status("VmHWM") - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_peak_memory_stays_near_one_fp32_model(tmp_path):
    # 5 checkpoints of 24 MB (6M fp32 parameters in 24 tensors): holding two whole checkpoints would cost 48 MB.
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(250_000, generator=g) for i in range(24)}
    model_bytes = sum(t.numel() * 4 for t in tensors.values())
    paths = []
    for i in range(5):
        path = tmp_path / f"c{i}.safetensors"
        save_file({k: v + i for k, v in tensors.items()}, str(path))
        paths.append(str(path))
    del tensors
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *paths, str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    assert peak_growth < 1.25 * model_bytes, f"peak grew by {peak_growth / model_bytes:.2f} fp32 models"
    averaged = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(averaged["layer3.weight"], load_file(paths[0])["layer3.weight"] + 2.0)


def _raw_safetensors(header, data=b""):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x02\x03",
        (10**9).to_bytes(8, "little") + b"{}",
        _raw_safetensors(b"{not json"),
        _raw_safetensors(b"\xff\xfe"),
        _raw_safetensors([]),
        _raw_safetensors(None),
        _raw_safetensors(7),
        _raw_safetensors({"w": 3}, bytes(8)),
        _raw_safetensors({"w": []}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, dtype="F99")}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, dtype=["F32"])}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, dtype=None)}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, shape="2")}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, shape=[-2])}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, shape=[2.0])}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, data_offsets=[0])}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, data_offsets="0,8")}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, data_offsets=[8, 0])}, bytes(8)),
        _raw_safetensors({"w": dict(F32_ENTRY, data_offsets=[0, 16])}, bytes(8)),
        _raw_safetensors({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
        _raw_safetensors({"a": F32_ENTRY, "b": F32_ENTRY}, bytes(16)),
        _raw_safetensors({"w": F32_ENTRY}, bytes(12)),
        _raw_safetensors({"__metadata__": [], "w": F32_ENTRY}, bytes(8)),
        _raw_safetensors({"__metadata__": {"k": 1}, "w": F32_ENTRY}, bytes(8)),
    ],
)
def test_malformed_safetensors_headers_are_keel_errors(tmp_path, raw):
    """Every malformed header is a KeelError (never a TypeError, KeyError, AttributeError or ValueError of json)."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(KeelError, match="bad.safetensors") as caught:
        read_header(path)
    assert type(caught.value) is KeelError


def test_a_well_formed_file_with_no_tensors_is_read(tmp_path):
    write_safetensors(tmp_path / "empty.safetensors", {}, metadata={"k": "v"})
    assert read_header(tmp_path / "empty.safetensors") == ({}, {"k": "v"})
