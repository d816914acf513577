"""The reference's sharded checkpoint layout (docs/format.md §2.1): shard plan, index, sidecar.

A safetensors header lists every tensor's offsets before the data, so writers
usually buffer a whole shard in RAM. We know each output tensor's dtype and shape
before computing it (``quantized_layout``), so we plan the shards up front and the
streaming :class:`~sinq_vllm.format.safetensors_io.ShardWriter` writes each header
first and the tensors into place one at a time: peak memory is one source tensor plus
its quantized form, whatever the shard size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SinqConfigError
from ..format.layer_meta import LayerMeta
from ..format.names import INDEX_NAME, SIDECAR_NAME
from ..format.safetensors_io import PlannedTensor, write_json

DEFAULT_MAX_SHARD_SIZE = "4GB"  # the reference's save_quantized_safetensors default

_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


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


@dataclass
class Shard:
    items: list = field(default_factory=list)  # caller's work items, written in order
    specs: list[PlannedTensor] = field(default_factory=list)
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


def write_index(out_dir: Path, shards: list[Shard]) -> Path:
    weight_map = {s.key: shard.filename for shard in shards for s in shard.specs}
    index = {"metadata": {"total_size": sum(shard.nbytes for shard in shards)}, "weight_map": weight_map}
    return write_json(Path(out_dir) / INDEX_NAME, index)


def write_sidecar(out_dir: Path, entries: list[LayerMeta] | dict[str, dict]) -> Path:
    """The sidecar from parsed metas, or from raw entries (``convert`` keeps every field it read)."""
    if not isinstance(entries, dict):
        entries = {m.name: m.to_sidecar() for m in entries}
    return write_json(Path(out_dir) / SIDECAR_NAME, entries)
