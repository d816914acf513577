"""Streaming writer for the reference's sharded safetensors layout (sinq-format.md §2.1).

A safetensors header lists every tensor's offsets before the data, so writers
usually buffer a whole shard in RAM. We know each output tensor's dtype and shape
before computing it (``quantized_layout``), so we plan the shards up front, write
each header first and then stream tensors into place one at a time: peak memory is
one source tensor plus its quantized form, whatever the shard size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SinqConfigError, SinqCheckpointError
from ..format.layer_meta import INDEX_NAME, SIDECAR_NAME, LayerMeta

DEFAULT_MAX_SHARD_SIZE = "4GB"  # the reference's save_quantized_safetensors default

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
ST_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_HEADER_ALIGN = 8  # safetensors pads the JSON header so the data starts 8-byte aligned
_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def st_dtype(dtype: torch.dtype | str) -> str:
    """safetensors dtype name of a torch dtype (or a name already)."""
    if isinstance(dtype, str):
        if dtype not in ST_ITEMSIZE:
            raise SinqCheckpointError(f"unsupported safetensors dtype {dtype!r}")
        return dtype
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise SinqCheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_size(size: int | str) -> int:
    """Bytes in ``4GB``, ``500MB``, ``2GiB`` or a plain integer (HF conventions: GB = 10**9)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise SinqConfigError(f"max shard size {size!r} is not a size like 4GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise SinqConfigError(f"max shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ST_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    items: list = field(default_factory=list)  # caller's work items, written in order
    specs: list[TensorSpec] = field(default_factory=list)
    nbytes: int = 0
    filename: str = ""


def plan_shards(items, specs_of, max_shard_size: int) -> list[Shard]:
    """Group work items greedily into shards of at most ``max_shard_size`` bytes.

    An item (one source tensor and what it becomes) never straddles two shards, so
    every quantized layer sits in one file; an item larger than the limit gets a
    shard of its own, as in Transformers.
    """
    shards: list[Shard] = [Shard()]
    for item in items:
        specs = specs_of(item)
        size = sum(s.nbytes for s in specs)
        cur = shards[-1]
        if cur.items and cur.nbytes + size > max_shard_size:
            cur = Shard()
            shards.append(cur)
        cur.items.append(item)
        cur.specs.extend(specs)
        cur.nbytes += size
    shards = [s for s in shards if s.items]
    total = len(shards)
    for i, s in enumerate(shards, 1):
        s.filename = f"model-{i:05d}-of-{total:05d}.safetensors"
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
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

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._fh = open(self.path, "wb")
        self._fh.write(_header(self._specs, metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise RuntimeError(f"{self.path.name}: unplanned tensor {key!r}")
        spec = self._specs[self._next]
        got = (key, st_dtype(tensor.dtype), tuple(tensor.shape))
        if got != (spec.key, spec.dtype, spec.shape):
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


def write_index(out_dir: Path, shards: list[Shard]) -> Path:
    weight_map = {s.key: shard.filename for shard in shards for s in shard.specs}
    index = {"metadata": {"total_size": sum(shard.nbytes for shard in shards)}, "weight_map": weight_map}
    path = Path(out_dir) / INDEX_NAME
    _write_json(path, index)
    return path


def write_sidecar(out_dir: Path, metas: list[LayerMeta]) -> Path:
    path = Path(out_dir) / SIDECAR_NAME
    _write_json(path, {m.name: m.to_sidecar() for m in metas})
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
