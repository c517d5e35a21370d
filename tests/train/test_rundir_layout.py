"""The run directory's layout has one owner: keel.rundir names every file, folder and pointer of a run, and the rest
of keel (and the benchmarks) asks it for paths instead of spelling the names."""

import ast
from pathlib import Path

import pytest
import torch

from keel import rundir
from keel.errors import KeelError

ROOT = Path(__file__).resolve().parents[2]
FILE_NAMES = {rundir.CONFIG, rundir.METRICS, rundir.LOCK, rundir.LOSS_PLOT, rundir.MODEL_WEIGHTS, rundir.STATE,
              rundir.MANIFEST, rundir.RAW_WEIGHTS, rundir.DIAGNOSIS, rundir.RECOMMENDED, rundir.GRAD_NORM_PLOT,
              rundir.UPDATE_RATIO_PLOT, rundir.AVERAGED_WEIGHTS, rundir.RESTARTS_RECORD}
PATH_PARTS = FILE_NAMES | {rundir.CHECKPOINTS, rundir.SNAPSHOTS, rundir.TENSORBOARD, rundir.LATEST, rundir.BEST,
                           rundir.RESTARTS}


def test_run_dir_paths():
    run = rundir.RunDir("runs/x")
    assert run.path == Path("runs/x")
    assert (run.config, run.metrics, run.lock, run.loss_plot, run.model_weights) == tuple(
        Path("runs/x") / name for name in ("config.yaml", "metrics.jsonl", "LOCK", "loss.png", "model.safetensors"))
    assert (run.checkpoints, run.snapshots, run.tensorboard) == tuple(
        Path("runs/x") / name for name in ("checkpoints", "snapshots", "tensorboard"))
    assert run.latest_pointer == Path("runs/x/checkpoints/latest")
    assert run.best_pointer == Path("runs/x/checkpoints/best")
    assert run.checkpoint(120) == run.checkpoint("step_00000120") == Path("runs/x/checkpoints/step_00000120")
    assert run.snapshot(7) == Path("runs/x/snapshots/step_00000007.safetensors")
    assert run.averaged_weights == Path("runs/x/averaged.safetensors")
    assert run.restart_attempt(2, 7) == Path("runs/x/restarts/attempt_2_seed_7")
    assert rundir.run_of_checkpoint(run.checkpoint(120)) == rundir.run_of_checkpoint(run.checkpoints) == run.path
    assert rundir.run_of_checkpoint("elsewhere/step_00000120") is None


def test_best_checkpoint_follows_the_pointer_the_trainer_writes(tmp_path):
    run = rundir.RunDir(tmp_path)
    assert run.best_checkpoint() is None  # no pointer
    for step in (5, 10):
        rundir.write_checkpoint(run.checkpoints, step, {"w": torch.zeros(1)}, {"step": step}, {"step": step})
    rundir.point_best(run.checkpoints, run.checkpoint(5))
    assert run.best_checkpoint() == run.checkpoint(5)
    assert run.latest_pointer.read_text() == "step_00000010\n"
    rundir.point_best(run.checkpoints, "step_00000099")  # names no checkpoint
    assert run.best_checkpoint() is None
    run.best_pointer.write_bytes(b"\xff\xfe")
    assert run.best_checkpoint() is None


def test_checkpoint_weights_by_kind(tmp_path):
    ckpt = tmp_path / "step_00000005"
    ckpt.mkdir()
    assert rundir.checkpoint_weights(ckpt) == ckpt / "model.safetensors"
    assert rundir.checkpoint_weights(ckpt, "ema") == ckpt / "ema.safetensors"
    (ckpt / "raw.safetensors").write_bytes(b"")  # ema.checkpoint_weights=ema: model.safetensors holds the EMA
    assert rundir.checkpoint_weights(ckpt) == ckpt / "raw.safetensors"
    assert rundir.checkpoint_weights(ckpt, "ema") == ckpt / "ema.safetensors"
    assert rundir.checkpoint_weights(ckpt, "model") == ckpt / "model.safetensors"  # what it holds: here the EMA
    with pytest.raises(KeelError, match=r"weights: '\.\./x' is not a weights name; allowed: raw, model, ema"):
        rundir.weights_name("../x")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_run_names(path: Path) -> list[str]:
    """Where ``path`` spells a run's file name as a string, or builds a path with ``/ "<a run's name>"``."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip and node.value in FILE_NAMES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in PATH_PARTS - FILE_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: / {side.value!r}")
    return found


def test_no_name_of_a_run_directory_is_spelled_outside_keel_rundir():
    files = [p for p in sorted((ROOT / "src" / "keel").rglob("*.py")) if "rundir" not in p.relative_to(ROOT).parts]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) > 50
    found = sorted({hit for path in files for hit in spelled_run_names(path)})
    assert found == [], "\n".join(found)
