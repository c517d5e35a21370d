"""Checkpoint averaging: the arithmetic mean of several checkpoints' weights, streamed tensor by tensor.

mean[name] = (1/N) sum_i checkpoint_i[name] for floating-point tensors; integer and boolean tensors are copied from
the newest checkpoint (the last one). As in Vaswani et al. 2017 ("Attention is all you need", averaging the last
5-20 checkpoints) and the averaging scripts of tensor2tensor, fairseq and OpenNMT-tf.

Memory: one fp32 accumulator (one fp32 model) plus a 1 MB read buffer; files are read with
`readinto`, never mapped, so no input file is ever resident as a whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from keel import rundir
from keel.averaging.shadow import as_dtype
from keel.errors import KeelError
from keel.rundir.metrics import read_metrics
from keel.safetensors_io import SafetensorsReader, TensorInfo, read_header, write_safetensors

_CHUNK_BYTES = 1 << 20  # read slice: small enough to stay in cache between the read and the addition

PathLike = str | os.PathLike


#: The default of ``weights``: what each checkpoint holds as its weights (its model.safetensors; rundir.checkpoint_weights).
CHECKPOINT_WEIGHTS = "model"


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoints under `folder` (named exactly step_XXXXXXXX, manifest written), oldest first."""
    return [(rundir.checkpoint_step(path.name), path) for path in rundir.list_checkpoints(folder)]


def _read_metrics(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> the last finite value of `metric` logged at that step in run_dir/metrics.jsonl."""
    path = run_dir / rundir.METRICS
    if not path.exists():
        raise KeelError(f"best: {str(path)!r} does not exist; best-k needs the run's metrics.jsonl")
    values: dict[int, float] = {}
    for record in read_metrics(path):
        value = record.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            if math.isfinite(value):
                values[int(record["step"])] = float(value)
    return values


def resolve_checkpoints(
    inputs: Sequence[PathLike],
    *,
    last: int | None = None,
    best: int | None = None,
    metric: str = "val_loss",
    mode: str = "min",
    weights: str = CHECKPOINT_WEIGHTS,
) -> list[Path]:
    """The weight files named by `inputs`, oldest first.

    Each input is a `.safetensors` file, a keel checkpoint directory (step_XXXXXXXX: the file of `weights` in it,
    see `keel.rundir.checkpoint_weights`; by default its `model.safetensors`, what the checkpoint holds), a run's
    `checkpoints/` folder, or a run directory (all its checkpoints).
    `last=N` keeps the newest N; `best=k` keeps the k with the best `metric` in the run's metrics.jsonl
    (lowest for mode "min"), in step order.
    """
    if last is not None and best is not None:
        raise KeelError("average: --last and --best are both given; allowed: one of them")
    if mode not in ("min", "max"):
        raise KeelError(f"mode: {mode!r} is not a mode; allowed: min, max")
    filename = rundir.weights_name(weights)
    entries: list[tuple[Path, int | None, Path | None]] = []  # (file, step, run_dir)
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            entries.append((path, None, None))
            continue
        if not path.is_dir():
            raise KeelError(
                f"average: {str(raw)!r} does not exist; allowed: .safetensors files, checkpoint or run directories"
            )
        step = rundir.checkpoint_step(path.name)
        if step is not None and (path / rundir.MODEL_WEIGHTS).exists():
            steps, run_dir = [(step, path)], rundir.run_of_checkpoint(path)
        elif rundir.RunDir(path).checkpoints.is_dir():
            steps, run_dir = _step_dirs(rundir.RunDir(path).checkpoints), path
        else:
            steps, run_dir = _step_dirs(path), rundir.run_of_checkpoint(path)
        if not steps:
            raise KeelError(
                f"average: {str(raw)!r} holds no checkpoints (no step_XXXXXXXX/ with model.safetensors and "
                "manifest.json)"
            )
        for step, step_dir in steps:
            file = rundir.checkpoint_weights(step_dir, weights)
            if not file.exists():
                raise KeelError(
                    f"average: {str(step_dir)!r} has no {filename} (weights={weights!r}); "
                    f"enable that average in training or use weights='model'"
                )
            entries.append((file, step, run_dir))
    if not entries:
        raise KeelError("average: no inputs given")
    if best is not None:
        if best < 1:
            raise KeelError(f"best: {best!r} is not positive")
        metrics: dict[Path, dict[int, float]] = {}
        scored = []
        for file, step, run_dir in entries:
            if step is None or run_dir is None:
                raise KeelError(f"best: {str(file)!r} is not inside a run directory; best-k needs metrics.jsonl")
            if run_dir not in metrics:
                metrics[run_dir] = _read_metrics(run_dir, metric)
            if step in metrics[run_dir]:
                scored.append((metrics[run_dir][step], step, file))
        if len(scored) < best:
            raise KeelError(
                f"best: {best} checkpoints asked for, but only {len(scored)} have {metric!r} logged at their step"
            )
        scored.sort(key=lambda s: (s[0] if mode == "min" else -s[0], s[1]))
        chosen = sorted(scored[:best], key=lambda s: s[1])
        files = [file for _, _, file in chosen]
    else:
        files = [file for file, _, _ in entries]
        if last is not None:
            if last < 1:
                raise KeelError(f"last: {last!r} is not positive")
            if last > len(files):
                raise KeelError(f"last: {last} checkpoints asked for, but only {len(files)} exist in "
                                f"{', '.join(repr(str(p)) for p in inputs)}; allowed: --last {len(files)} or fewer "
                                f"(a run keeps its last keep_last checkpoints and the best: train with keep_last: "
                                f"{last} or average.last: {last} to keep {last})")
            files = files[-last:]
    checkpoint_files = {file for file, step, _ in entries if step is not None}
    for file in files:
        if file in checkpoint_files:
            _check_intact(file)
    return files


def _check_intact(file: Path) -> None:
    """Refuse a weights file of a checkpoint that is incomplete or corrupt (manifest, file list, size, sha256)."""
    problem = rundir.verify(file.parent, files=[file.name])
    if problem is not None:
        raise KeelError(
            f"average: checkpoint {str(file.parent)!r} is corrupt ({problem}); allowed: intact checkpoints "
            "(name the others explicitly, or choose --last/--best to leave it out)"
        )


def _plan(files: list[Path], prefix: str | None) -> tuple[dict[str, TensorInfo], list[str], list[str]]:
    """Check that the files agree; return the newest header, the names to average, the names to copy."""
    headers = [read_header(f)[0] for f in files]
    newest, newest_file = headers[-1], files[-1]
    selected = [n for n in newest if prefix is None or n.startswith(prefix)]
    if prefix is not None and not selected:
        raise KeelError(f"prefix: no tensor of {str(newest_file)!r} starts with {prefix!r}")
    for header, file in zip(headers[:-1], files[:-1]):
        for name in selected:
            if name not in header:
                raise KeelError(
                    f"checkpoint {str(file)!r}: tensor {name!r} is missing (present in {str(newest_file)!r})"
                )
            a, b = header[name], newest[name]
            if a.shape != b.shape:
                raise KeelError(
                    f"checkpoint {str(file)!r}: tensor {name!r} has shape {list(a.shape)}, "
                    f"but {list(b.shape)} in {str(newest_file)!r}"
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise KeelError(
                    f"checkpoint {str(file)!r}: tensor {name!r} has dtype {a.dtype}, "
                    f"but {b.dtype} in {str(newest_file)!r}"
                )
        extra = [n for n in header if (prefix is None or n.startswith(prefix)) and n not in newest]
        if extra:
            raise KeelError(f"checkpoint {str(file)!r}: tensor {extra[0]!r} is not in {str(newest_file)!r}")
    averaged = [n for n in selected if newest[n].dtype.is_floating_point]
    copied = [n for n in newest if n not in set(averaged)]
    return newest, averaged, copied


def _accumulate(files: list[Path], averaged: list[str], newest: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Sum of the averaged tensors over `files`, divided by len(files): fp32 (fp64 for fp64 inputs).

    Tensors are read in slices of _CHUNK_BYTES into one small buffer that stays in cache, added to the accumulator,
    and the last file's slice is divided right after its addition, so the accumulator is swept once per file.
    """
    acc = {
        n: torch.empty(newest[n].shape, dtype=torch.float64 if newest[n].dtype == torch.float64 else torch.float32)
        for n in averaged
    }
    count = len(files)
    scratch = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    for index, file in enumerate(files):
        last = index == count - 1
        with SafetensorsReader(file) as reader:
            for name in sorted(averaged, key=lambda n: reader.tensors[n].begin):  # sequential reads
                info, target = reader.tensors[name], acc[name]
                if index == 0 and info.dtype == target.dtype:
                    reader.read_into(name, target)  # the first file goes straight into the accumulator
                    if last and count > 1:
                        target.div_(count)
                    continue
                flat = target.view(-1)
                size = torch.empty((), dtype=info.dtype).element_size()
                per_chunk = _CHUNK_BYTES // size
                for begin in range(0, flat.numel(), per_chunk):
                    n = min(per_chunk, flat.numel() - begin)
                    buffer = reader.read_into(name, scratch[: n * size].view(info.dtype), offset=begin * size)
                    part = flat[begin : begin + n]
                    if index == 0:
                        part.copy_(buffer)
                    else:
                        part.add_(buffer)
                    if last and count > 1:
                        part.div_(count)
    return acc


def _output_dtype(info: TensorInfo, dtype: str | None) -> torch.dtype:
    if dtype is None or not info.dtype.is_floating_point:
        return info.dtype
    return as_dtype(dtype)


def _average(inputs, *, weights, prefix, dtype, last=None, best=None, metric="val_loss", mode="min"):
    files = resolve_checkpoints(inputs, last=last, best=best, metric=metric, mode=mode, weights=weights)
    newest, averaged, copied = _plan(files, prefix)
    acc = _accumulate(files, averaged, newest)
    with SafetensorsReader(files[-1]) as reader:
        for name in copied:
            acc[name] = reader.read(name)
    ordered = {name: acc[name] for name in newest}
    dtypes = {name: _output_dtype(newest[name], dtype) for name in newest}
    return files, ordered, dtypes, averaged


def average_checkpoints(
    paths: Sequence[PathLike],
    *,
    weights: str = CHECKPOINT_WEIGHTS,
    prefix: str | None = None,
    dtype: str | None = None,
) -> dict[str, torch.Tensor]:
    """The arithmetic mean of the weights in `paths` (safetensors files or keel checkpoint/run directories).

    Floating-point tensors are averaged in fp32 (fp64 for fp64 inputs) and returned in the newest input's dtype,
    or `dtype`; integer tensors are copied from the newest (last) input. Tensors outside `prefix`, if one is
    given, are copied from the newest input. Differing names or shapes raise KeelError naming the tensor.
    """
    _, tensors, dtypes, _ = _average(list(paths), weights=weights, prefix=prefix, dtype=dtype)
    for name in tensors:
        if tensors[name].dtype != dtypes[name]:
            tensors[name] = tensors[name].to(dtypes[name])  # one tensor at a time: the fp32 one is freed
    return tensors


def average_checkpoints_to_file(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    last: int | None = None,
    best: int | None = None,
    metric: str = "val_loss",
    mode: str = "min",
    weights: str = CHECKPOINT_WEIGHTS,
    prefix: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Average checkpoints (see `resolve_checkpoints` for `inputs`, `last`, `best`) into the safetensors file `out`.

    Streams: one fp32 accumulator, one tensor-sized read buffer, and one converted tensor at a time when writing.
    Returns a summary: the files used, the number of averaged and copied tensors, and the output size.
    """
    files, tensors, dtypes, averaged = _average(
        list(inputs), weights=weights, prefix=prefix, dtype=dtype, last=last, best=best, metric=metric, mode=mode
    )
    metadata = {"format": "pt", "keel_average": "checkpoints", "inputs": json.dumps([str(f) for f in files])}
    write_safetensors(out, tensors, metadata=metadata, dtypes=dtypes)
    return {
        "inputs": [str(f) for f in files],
        "averaged_tensors": len(averaged),
        "copied_tensors": len(tensors) - len(averaged),
        "out": str(out),
        "bytes": Path(out).stat().st_size,
    }
