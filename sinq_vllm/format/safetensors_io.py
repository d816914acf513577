"""The one safetensors reader and writer of sinq-vllm, plus bounded JSON reading.

Tensor *data* is read with the safetensors library (``safe_open``). What lives here is
what the library does not offer:

* :func:`read_header`: a header-only, fully checked read of one file (well-formed JSON,
  known dtypes, offsets that tile the data buffer, a file size of exactly
  ``8 + header length + data length``), so a checkpoint can be validated in
  milliseconds, before any engine starts;
* :class:`ShardWriter`: a streaming writer. We know every output tensor's dtype and
  shape before computing it, so the header is written first and tensors are streamed
  into place one by one: peak memory is one tensor, whatever the shard size;
* :func:`read_json`: a bounded read of a JSON file (never a FIFO or a device).

``SAFETENSORS_DTYPES`` is the only dtype table of the package.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SinqCheckpointError

#: safetensors' own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000
#: larger sidecar, index or config files are refused unread (real ones are well under 10 MB)
MAX_JSON_BYTES = 256 * 1024 * 1024
_HEADER_ALIGN = 8  # safetensors pads the JSON header so that the data starts 8-byte aligned

#: safetensors dtype -> (bits per element, torch dtype or None when torch has none)
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "I16": (16, torch.int16),
    "U16": (16, getattr(torch, "uint16", None)),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32),
    "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)),
    "F64": (64, torch.float64),
    "C64": (64, getattr(torch, "complex64", None)),
    "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}
_TORCH_TO_ST = {t: name for name, (_, t) in SAFETENSORS_DTYPES.items() if t is not None}
#: floating dtypes (what a bf16 model would hold at 2 bytes)
FLOAT_ST_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})


def st_dtype(dtype: torch.dtype | str) -> str:
    """safetensors dtype name of a torch dtype (or a name already)."""
    if isinstance(dtype, str):
        if dtype not in SAFETENSORS_DTYPES:
            raise SinqCheckpointError(f"unsupported safetensors dtype {dtype!r}")
        return dtype
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise SinqCheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes_of(dtype: str, shape) -> int:
    return (math.prod(shape) * SAFETENSORS_DTYPES[dtype][0] + 7) // 8


# ---- reading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype string, shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    length: int  # bytes of the JSON header (after the 8-byte length prefix)
    entries: dict[str, HeaderEntry]


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check the header of one safetensors file, reading only the header bytes.

    The file must be complete: the tensors' byte ranges tile the data buffer and the
    file is exactly ``8 + header length + data length`` bytes long.
    """
    path = str(path)
    try:
        if not os.path.isfile(path):
            raise SinqCheckpointError(f"{path}: not a regular file")
        size = os.path.getsize(path)
        if size < 8:
            raise SinqCheckpointError(
                f"{path}: {size} bytes, truncated or empty (a safetensors file starts with an 8-byte header length)"
            )
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise SinqCheckpointError(
                    f"{path}: header length {length} does not fit the file ({size} bytes) or the safetensors limit "
                    f"of {MAX_HEADER_BYTES} bytes: the file is truncated or not a safetensors file"
                )
            raw = f.read(length)
    except OSError as e:
        raise SinqCheckpointError(f"{path}: cannot read the safetensors header: {e}") from None
    if len(raw) != length:
        raise SinqCheckpointError(f"{path}: truncated inside its {length}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SinqCheckpointError(
            f"{path}: the safetensors header is not valid UTF-8 JSON ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(header, dict):
        raise SinqCheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object"
        )
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise SinqCheckpointError(f"{path}: '__metadata__' is not a JSON object")
            continue
        entries[name] = _header_entry(path, name, info)
    data_end = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != data_end:
            what = "overlaps the previous tensor" if e.begin < data_end else f"leaves a gap after byte {data_end}"
            raise SinqCheckpointError(
                f"{path}: tensor '{name}' data_offsets [{e.begin}, {e.end}] {what} (tensors must tile the data buffer)"
            )
        data_end = e.end
    expected = 8 + length + data_end
    if size != expected:
        state = "truncated" if size < expected else f"has {size - expected} trailing bytes"
        raise SinqCheckpointError(
            f"{path}: {state}: {size} bytes, expected {expected} (8 + {length}-byte header + {data_end} bytes of "
            "tensor data)"
        )
    return Header(length, entries)


def _header_entry(path: str, name: str, info) -> HeaderEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
        raise SinqCheckpointError(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise SinqCheckpointError(
            f"{where}: unknown dtype {dtype!r} (safetensors dtypes: {sorted(SAFETENSORS_DTYPES)})"
        )
    if not (isinstance(shape, list) and all(is_int(v) and v >= 0 for v in shape)):
        raise SinqCheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(v) and v >= 0 for v in offsets)):
        raise SinqCheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    nbytes = nbytes_of(dtype, shape)
    if end - begin != nbytes:
        raise SinqCheckpointError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} {shape} needs {nbytes}"
        )
    return HeaderEntry(dtype, tuple(shape), begin, end)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file: a regular file (never a FIFO or device), bounded in size.

    ``what`` says what the file should be, for the message of a :class:`SinqCheckpointError`.
    """
    path = str(path)
    try:
        if not os.path.isfile(path):
            raise SinqCheckpointError(f"{path}: {what} (not a regular file)")
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise SinqCheckpointError(f"{path}: {what} ({size} bytes; the limit is {MAX_JSON_BYTES})")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except SinqCheckpointError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 errors
        raise SinqCheckpointError(f"{path}: {what} ({type(e).__name__}: {e})") from None


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ---- writing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    """A tensor an output shard will hold: name, safetensors dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> "PlannedTensor":
        return cls(key, st_dtype(tensor.dtype), tuple(tensor.shape))


def _header_bytes(specs: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    head: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in specs:
        head[s.key] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors arrive one by one, in planned order."""

    def __init__(self, path: str | os.PathLike, specs: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._fh = open(self.path, "wb")
        self._fh.write(_header_bytes(self._specs, metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise RuntimeError(f"{self.path.name}: unplanned tensor {key!r}")
        spec = self._specs[self._next]
        got = PlannedTensor.of(key, tensor)
        if got != spec:
            # A plan/compute mismatch would silently corrupt offsets: never let it through.
            raise RuntimeError(f"{self.path.name}: expected {spec}, got {got}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._specs):
            missing = [s.key for s in self._specs[self._next :]][:3]
            raise RuntimeError(f"{self.path.name}: {len(self._specs) - self._next} tensors never written, e.g. {missing}")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
