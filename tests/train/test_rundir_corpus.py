"""A corpus of corrupted checkpoints, each made from one real one: the loader falls back, says so in one line,
and deletes nothing. Stray names beside the checkpoints are invisible and never pruned."""

import argparse
import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from keel.safetensors_io import write_safetensors
from keel import rundir

REQUIRED = ("trainer", "optimizer", "metrics_offset")


def write_real_checkpoint(root: Path, step: int, seed: int) -> Path:
    """A real checkpoint: a tiny nn.Linear's weights, a dict payload, and an EMA file written by `extra`."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    moments = {i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn_like(p)}
               for i, p in enumerate(model.parameters())}
    payload = {"trainer": {"step": step, "tokens": 64 * step},
               "optimizer": {"state": moments, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
               "metrics_offset": 100 * step, "rng": torch.get_rng_state()}

    def extra(folder: Path) -> None:
        write_safetensors(folder / "ema.safetensors", {k: v.detach() * 0.5 for k, v in model.state_dict().items()})

    meta = {"step": step, "config": f"max_steps: {step}\n"}
    return rundir.write_checkpoint(root, step, model.state_dict(), payload, meta, extra)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "checkpoints"
    write_real_checkpoint(root, 10, seed=0)
    write_real_checkpoint(root, 20, seed=1)
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    copy = tmp_path / "run" / "checkpoints"
    shutil.copytree(template, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for directories): to show that nothing was touched."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------ corruptions


def rehash(ckpt: Path) -> None:
    """Rewrite the manifest so that it matches the files as they now are (a corruption the hashes cannot see)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(ckpt.iterdir()) if p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def truncate(name, keep=0.5):
    def apply(ckpt):
        path = ckpt / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return apply


def flip(name, where):
    def apply(ckpt):
        data = bytearray((ckpt / name).read_bytes())
        index = where if where >= 0 else len(data) + where
        data[index] ^= 0x10
        (ckpt / name).write_bytes(bytes(data))
    return apply


def manifest_text(text: str | bytes):
    def apply(ckpt):
        (ckpt / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return apply


def manifest_edit(edit):
    def apply(ckpt):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        edit(manifest)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return apply


def delete(name):
    def apply(ckpt):
        (ckpt / name).unlink()
    return apply


def replace_rehashed(name, data_of):
    def apply(ckpt):
        (ckpt / name).write_bytes(data_of(ckpt))
        rehash(ckpt)
    return apply


def safetensors_header(header, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(encoded)) + encoded + data


def torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def set_in(path, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def drop(path):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


def add_file(name, data=b"x"):
    def apply(ckpt):
        (ckpt / name).write_bytes(data)
    return apply


def add_dir(name):
    def apply(ckpt):
        (ckpt / name).mkdir()
    return apply


def both(*steps):
    def apply(ckpt):
        for step in steps:
            step(ckpt)
    return apply


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CORRUPTIONS = {
    # truncated and empty files
    "model truncated to half": truncate("model.safetensors"),
    "model empty": truncate("model.safetensors", 0),
    "state truncated to half": truncate("state.pt"),
    "state empty": truncate("state.pt", 0),
    "ema truncated": truncate("ema.safetensors", 0.9),
    "ema empty": truncate("ema.safetensors", 0),
    "manifest truncated": truncate("manifest.json"),
    "manifest empty": manifest_text(""),
    # flipped bits
    "model: bit flipped in the data": flip("model.safetensors", -1),
    "model: bit flipped in the header": flip("model.safetensors", 12),
    "state: bit flipped": flip("state.pt", 200),
    "ema: bit flipped": flip("ema.safetensors", -3),
    "manifest: bit flipped in a sha256": manifest_edit(
        lambda m: m["files"]["state.pt"].update(sha256=m["files"]["state.pt"]["sha256"][::-1])),
    # manifests of the wrong shape
    "manifest []": manifest_text("[]"),
    "manifest null": manifest_text("null"),
    "manifest 42": manifest_text("42"),
    "manifest a string": manifest_text('"step_00000020"'),
    "manifest not UTF-8": manifest_text(b"\xff\xfe{}"),
    "manifest {files: []}": manifest_text('{"step": 20, "files": []}'),
    "manifest {files: {}}": manifest_text('{"step": 20, "files": {}}'),
    "manifest without files": manifest_edit(drop(["files"])),
    "manifest entry a number": manifest_edit(set_in(["files", "model.safetensors"], 5)),
    "manifest entry a list": manifest_edit(set_in(["files", "state.pt"], [1, 2])),
    "manifest bytes a string": manifest_edit(set_in(["files", "model.safetensors", "bytes"], "12")),
    "manifest bytes negative": manifest_edit(set_in(["files", "model.safetensors", "bytes"], -1)),
    "manifest bytes missing": manifest_edit(drop(["files", "state.pt", "bytes"])),
    "manifest sha256 a number": manifest_edit(set_in(["files", "state.pt", "sha256"], 7)),
    "manifest sha256 not hex": manifest_edit(set_in(["files", "state.pt", "sha256"], "z" * 64)),
    "manifest step missing": manifest_edit(drop(["step"])),
    "manifest step a string": manifest_edit(set_in(["step"], "20")),
    "manifest step true": manifest_edit(set_in(["step"], True)),
    "manifest step of another checkpoint": manifest_edit(set_in(["step"], 30)),
    "manifest meta a list": manifest_edit(set_in(["meta"], [])),
    "manifest names a path outside": manifest_edit(
        set_in(["files", "../model.safetensors"], {"bytes": 1, "sha256": "0" * 64})),
    "manifest does not list state.pt": both(delete("state.pt"), manifest_edit(drop(["files", "state.pt"]))),
    "manifest does not list model.safetensors": both(delete("model.safetensors"), rehash),
    # missing and extra files
    "model missing": delete("model.safetensors"),
    "state missing": delete("state.pt"),
    "ema missing": delete("ema.safetensors"),
    "an unlisted file": add_file("notes.txt"),
    "an unlisted directory": add_dir("extra"),
    # contents that hash correctly (manifest rewritten) but cannot be loaded
    "state: a pickled object (weights_only refuses it)": replace_rehashed(
        "state.pt",
        lambda c: torch_bytes({"trainer": argparse.Namespace(step=20), "optimizer": {}, "metrics_offset": 0})),
    "state: not a zip": replace_rehashed("state.pt", lambda c: b"PK\x03\x04 not really a zip file" * 4),
    "state: a list, not a dict": replace_rehashed("state.pt", lambda c: torch_bytes([1, 2, 3])),
    "state: a dict lacking required keys": replace_rehashed("state.pt", lambda c: torch_bytes({"trainer": {}})),
    "state: the weights file's bytes": replace_rehashed("state.pt", lambda c: (c / "model.safetensors").read_bytes()),
    "model: header is a JSON array": replace_rehashed("model.safetensors", lambda c: safetensors_header([])),
    "model: header is not JSON": replace_rehashed("model.safetensors", lambda c: safetensors_header(b"{nope")),
    "model: header length past the end": replace_rehashed(
        "model.safetensors", lambda c: struct.pack("<Q", 10**6) + b"{}"),
    "model: shorter than 8 bytes": replace_rehashed("model.safetensors", lambda c: b"\x01\x02"),
    "model: unknown dtype": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"w": dict(F32, dtype="F99")}, bytes(8))),
    "model: dtype a list": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"w": dict(F32, dtype=["F32"])}, bytes(8))),
    "model: data_offsets a string": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"w": dict(F32, data_offsets="0-8")}, bytes(8))),
    "model: shape of strings": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"w": dict(F32, shape=["2"])}, bytes(8))),
    "model: offsets past the end": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"w": dict(F32, shape=[4], data_offsets=[0, 16])}, bytes(8))),
    "model: the state's bytes": replace_rehashed("model.safetensors", lambda c: (c / "state.pt").read_bytes()),
    "model: metadata not strings": replace_rehashed(
        "model.safetensors", lambda c: safetensors_header({"__metadata__": {"a": 1}, "w": F32}, bytes(8))),
    "ema: entry a number": replace_rehashed("ema.safetensors", lambda c: safetensors_header({"w": 3}, bytes(8))),
    "ema: overlapping tensors": replace_rehashed(
        "ema.safetensors", lambda c: safetensors_header({"a": F32, "b": F32}, bytes(16))),
    "ema: a gap after the tensors": replace_rehashed(
        "ema.safetensors", lambda c: safetensors_header({"w": F32}, bytes(12))),
    "ema: header is null": replace_rehashed("ema.safetensors", lambda c: safetensors_header(None)),
}

ONE_LINE = re.compile(r"checkpoint step_00000020 is corrupt \((?P<reason>[^\n]+)\); using step_00000010")


def test_the_corpus_is_large_enough():
    assert len(CORRUPTIONS) >= 30


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_in_one_line_and_deletes_nothing(root, name):
    newest = root / "step_00000020"
    CORRUPTIONS[name](newest)
    before = snapshot(root)
    messages = []
    found = rundir.load_latest(root, report=messages.append, required=REQUIRED)
    assert found is not None
    path, weights, payload = found
    assert path == root / "step_00000010"
    assert set(weights) == {"weight", "bias"} and payload["trainer"]["step"] == 10
    assert len(messages) == 1 and ONE_LINE.fullmatch(messages[0]), messages
    assert snapshot(root) == before  # nothing deleted, moved or rewritten
    with pytest.raises(rundir.KeelError, match="step_00000020"):
        rundir.load_checkpoint(newest, required=REQUIRED)
    assert rundir.list_checkpoints(root) == [root / "step_00000010", newest]  # still listed: a user can look at it


def test_checks_that_only_loading_can_make_are_not_verify_failures(root):
    """verify passes a re-hashed pickle payload; load_latest still refuses it (both are needed)."""
    CORRUPTIONS["state: a pickled object (weights_only refuses it)"](root / "step_00000020")
    assert rundir.verify(root / "step_00000020") is None
    messages = []
    path, _, _ = rundir.load_latest(root, report=messages.append)
    assert path.name == "step_00000010" and "weights_only" in messages[0]


def test_the_intact_checkpoints_load_and_verify(root):
    for ckpt in rundir.list_checkpoints(root):
        assert rundir.verify(ckpt) is None
    messages = []
    path, weights, payload = rundir.load_latest(root, report=messages.append, required=REQUIRED)
    assert path.name == "step_00000020" and messages == []
    assert payload["metrics_offset"] == 2000 and weights["weight"].shape == (2, 3)


def test_several_corrupt_ones_each_get_one_line_naming_the_one_used(root):
    shutil.copytree(root / "step_00000020", root / "step_00000030")
    manifest_edit(set_in(["step"], 30))(root / "step_00000030")
    truncate("model.safetensors")(root / "step_00000030")
    truncate("state.pt")(root / "step_00000020")
    messages = []
    path, _, _ = rundir.load_latest(root, report=messages.append)
    assert path.name == "step_00000010"
    assert [m.split(" ")[1] for m in messages] == ["step_00000030", "step_00000020"]
    assert all(m.endswith("; using step_00000010") for m in messages)


def test_no_intact_checkpoint_is_none_and_says_so(root):
    truncate("state.pt")(root / "step_00000020")
    truncate("model.safetensors")(root / "step_00000010")
    messages = []
    assert rundir.load_latest(root, report=messages.append) is None
    assert len(messages) == 2 and all(m.endswith("; no older intact checkpoint") for m in messages)
    assert rundir.newest_intact(root, report=lambda m: None) is None
    assert rundir.load_latest(root.parent / "nothing", report=messages.append) is None


def test_an_unusable_device_is_an_error_not_a_corrupt_checkpoint(root):
    messages = []
    with pytest.raises(rundir.KeelError, match="device"):
        rundir.load_latest(root, device="no-such-device", report=messages.append)
    assert messages == []


# ------------------------------------------------------------------------------------------ stray names


def stray_copy(name):
    def apply(root):
        shutil.copytree(root / "step_00000020", root / name)
    return apply


def stray_file(name):
    def apply(root):
        (root / name).write_bytes(b"not a checkpoint")
    return apply


STRAYS = {
    "a .bak copy": stray_copy("step_00000060.bak"),
    "too few digits": stray_copy("step_12"),
    "too many digits": stray_copy("step_000000300"),
    "a letter among the digits": stray_copy("step_0000003a"),
    "capitalised": stray_copy("Step_00000030"),
    "a prefix": stray_copy("old_step_00000030"),
    "a suffix": stray_copy("step_00000030_copy"),
    "a write in progress": stray_copy(".tmp-step_00000030"),
    "a replaced one set aside": stray_copy(".old-step_00000030"),
    "a file named like a checkpoint": stray_file("step_00000030"),
    "no manifest (the write did not finish)": both(
        stray_copy("step_00000030"), lambda r: (r / "step_00000030" / "manifest.json").unlink()),
    "a manifest that is a directory": both(
        stray_copy("step_00000040"),
        lambda r: (r / "step_00000040" / "manifest.json").unlink(),
        lambda r: (r / "step_00000040" / "manifest.json").mkdir(),
    ),
}


@pytest.mark.parametrize("name", list(STRAYS))
def test_stray_names_are_invisible_and_never_pruned(root, name):
    STRAYS[name](root)
    strays = {p.name for p in root.iterdir()} - {"step_00000010", "step_00000020", "latest"}
    assert strays
    stray_bytes = {k: v for k, v in snapshot(root).items() if k.split("/")[0] in strays}
    messages = []
    path, _, _ = rundir.load_latest(root, report=messages.append)
    assert path.name == "step_00000020" and messages == []
    assert rundir.newest_intact(root, report=messages.append).name == "step_00000020" and messages == []
    assert [p.name for p in rundir.list_checkpoints(root)] == ["step_00000010", "step_00000020"]
    rundir.prune(root, keep_last=1, protect=set())
    assert [p.name for p in rundir.list_checkpoints(root)] == ["step_00000020"]
    assert {k: v for k, v in snapshot(root).items() if k.split("/")[0] in strays} == stray_bytes


def test_prune_keeps_the_protected_and_the_newest(root):
    for step in (30, 40):
        shutil.copytree(root / "step_00000020", root / f"step_{step:08d}")
    rundir.prune(root, keep_last=2, protect={"step_00000010"})
    assert [p.name for p in rundir.list_checkpoints(root)] == ["step_00000010", "step_00000030", "step_00000040"]
