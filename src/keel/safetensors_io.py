"""Streaming safetensors I/O: read one tensor at a time into a buffer you own; write without a serialised copy.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
mapping each name to dtype, shape and [begin, end) byte offsets into the data section, then the data.
Reading with `readinto` instead of a memory map keeps a file's pages out of the process's resident memory,
which is what lets checkpoint averaging hold one accumulator and one tensor rather than whole files.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from keel.errors import KeelError, naming_the_file

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """A safetensors file opened for reading tensor by tensor (`read`, `read_into`); use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        except OSError as error:
            raise KeelError(f"checkpoint {str(path)!r}: cannot open ({error.strerror})") from None
        try:
            self.tensors, self.metadata = self._read_header()
        except Exception:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Parse and check the header: every malformed header is a KeelError, never a TypeError or KeyError.

        Checked as the safetensors library does: known dtypes, byte ranges that match dtype and shape, and ranges
        that tile the data section exactly (no gap, no overlap, nothing past the end of the file).
        """
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            raise self._malformed("shorter than 8 bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise self._malformed(f"header length {length}")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._malformed("bad header") from None
        if not isinstance(header, dict):
            raise self._malformed("the header is not a JSON object")
        data_start = 8 + length
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._malformed("__metadata__ is not a mapping of strings to strings")
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._tensor_info(name, entry, data_start, size)
        covered = data_start
        for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
            if info.begin != covered:
                raise self._malformed("tensor byte ranges overlap or leave gaps")
            covered = info.end
        if covered != size:
            raise self._malformed(f"the tensors cover {covered - data_start} of the {size - data_start} data bytes")
        return tensors, metadata

    def _tensor_info(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._malformed(f"tensor {name!r} is not described by a JSON object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise KeelError(
                f"checkpoint {str(self.path)!r}: tensor {name!r} has dtype {code!r}; allowed: {', '.join(DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise self._malformed(f"tensor {name!r} has shape {shape!r}; allowed: a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise self._malformed(f"tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end]")
        begin, end = offsets
        info = TensorInfo(DTYPES[code], tuple(shape), data_start + begin, data_start + end)
        expected = _numel(info.shape) * torch.empty((), dtype=info.dtype).element_size()
        if begin > end or info.nbytes != expected or info.end > size:
            raise KeelError(f"checkpoint {str(self.path)!r}: tensor {name!r} is truncated or malformed")
        return info

    def _malformed(self, why: str) -> KeelError:
        return KeelError(f"checkpoint {str(self.path)!r}: not a safetensors file ({why})")

    def read_into(self, name: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Read tensor `name`, from byte `offset` on, into `out` (a contiguous CPU tensor); returns `out`.

        With offset 0 and `out` as large as the tensor this reads it whole; a smaller `out` reads a slice of it.
        """
        info = self.tensors[name]
        view = _byte_view(out)
        if offset < 0 or offset + view.numel() > info.nbytes:
            raise KeelError(f"checkpoint {str(self.path)!r}: tensor {name!r} does not fit the given buffer")
        if view.numel() == 0:
            return out
        self._file.seek(info.begin + offset)
        memory = memoryview(view.numpy())
        done, wanted = 0, view.numel()
        while done < wanted:
            got = self._file.readinto(memory[done:])
            if not got:
                raise KeelError(f"checkpoint {str(self.path)!r}: tensor {name!r} is truncated")
            done += got
        return out

    def read(self, name: str) -> torch.Tensor:
        """Read tensor `name` into a new CPU tensor."""
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> TensorInfo) and metadata of a safetensors file, without reading any data."""
    with SafetensorsReader(path) as reader:
        return reader.tensors, reader.metadata


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """Write `tensors` to a safetensors file, tensor by tensor, atomically (temporary file, then rename).

    Tensors are moved to the CPU (and cast to `dtypes[name]`, if given) one at a time; no serialised copy of the
    whole dict is ever built.
    """
    path = Path(path)
    dtypes = dtypes or {}
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, tensor in tensors.items():
        dtype = dtypes.get(name, tensor.dtype)
        if dtype not in CODES:
            raise KeelError(f"write {str(path)!r}: tensor {name!r} has dtype {dtype}, which safetensors lacks")
        nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_the_file(path), open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name, tensor in tensors.items():
                if tensor.numel():
                    tensor = tensor.detach().to("cpu", dtypes.get(name, tensor.dtype)).contiguous()
                    f.write(memoryview(_byte_view(tensor).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise KeelError("safetensors I/O needs a contiguous CPU tensor")
    return tensor.reshape(-1).view(torch.uint8)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
