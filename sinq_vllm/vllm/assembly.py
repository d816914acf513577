"""Turn the raw checkpoint tensors of one vLLM layer into ``SinqWeights``.

A vLLM layer may merge several checkpoint modules (q/k/v, gate/up) and hold only
its tensor-parallel slice of them. Per checkpoint module ("shard") we:
1. decode it once (``format.decode``: quantAux dequantized with the reference's fp16
   expression, planar codes unpacked to ``[N, K]``; the planar layout cannot be sliced);
2. cut this rank's rows (column-parallel) or columns (row-parallel);
then concatenate the shards along N and stack their column scales (docs/design.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SinqCheckpointError
from ..format.decode import DecodedModule, decode_module
from ..format.layer_meta import LayerMeta
from ..kernels.contract import SinqWeights


@dataclass(frozen=True)
class ShardSlice:
    """This rank's part of one checkpoint module: rows [row0, row1) and columns [col0, col1)."""

    row0: int
    row1: int
    col0: int
    col1: int

    @classmethod
    def whole(cls, meta: LayerMeta) -> "ShardSlice":
        return cls(0, meta.out_features, 0, meta.in_features)


def check_k_split(where: str, k_total: int, k_local: int, group: int) -> None:
    """Row-parallel layers cut K over the ranks: every rank must hold whole groups."""
    if k_local % group:
        tp_ok = [t for t in range(1, 65) if k_total % t == 0 and (k_total // t) % group == 0]
        raise SinqCheckpointError(
            f"{where}: its {k_total} input features split over tensor parallel size {k_total // k_local} give "
            f"{k_local} per rank, not a multiple of the group size {group}; tensor parallel sizes that work: {tp_ok}"
        )


def decode_shard(meta: LayerMeta, tensors: dict[str, torch.Tensor], part: ShardSlice) -> DecodedModule:
    """This rank's part of one decoded checkpoint module."""
    d = decode_module(meta, tensors)
    g = meta.group_size
    rows = slice(part.row0, part.row1)
    return DecodedModule(
        d.codes[rows, part.col0 : part.col1].contiguous(),
        d.scales[rows, part.col0 // g : part.col1 // g].contiguous(),
        d.zeros[rows, part.col0 // g : part.col1 // g].contiguous(),
        d.col_scale[part.col0 : part.col1].contiguous(),
    )


def merge_shards(
    decoded: list[DecodedModule], nbits: int, group_size: int, device, codebook: str | None = None
) -> SinqWeights:
    """Concatenate decoded shards along N; one column-scale row per shard. ``codebook``: the
    NF table every shard's codes index (None: uniform codes)."""
    offsets = [0]
    for d in decoded:
        offsets.append(offsets[-1] + d.codes.shape[0])
    return SinqWeights(
        codes=torch.cat([d.codes for d in decoded]).to(device),
        scales=torch.cat([d.scales for d in decoded]).to(device),
        zeros=torch.cat([d.zeros for d in decoded]).to(device),
        col_scales=torch.stack([d.col_scale for d in decoded]).to(device),
        shard_offsets=tuple(offsets),
        nbits=nbits,
        group_size=group_size,
        codebook=codebook,
    )


def assemble(
    metas: list[LayerMeta], shard_tensors: list[dict[str, torch.Tensor]], parts: list[ShardSlice], device
) -> SinqWeights:
    """Decode, cut and concatenate the shards of one vLLM layer into ``SinqWeights``."""
    first = metas[0]
    for m in metas[1:]:
        if (m.nbits, m.group_size, m.codebook) != (first.nbits, first.group_size, first.codebook):
            raise SinqCheckpointError(
                f"modules '{first.name}' and '{m.name}' are merged into one vLLM layer but were quantized "
                f"differently ({_kind(first)} vs {_kind(m)})"
            )
    decoded = [decode_shard(m, t, p) for m, t, p in zip(metas, shard_tensors, parts)]
    return merge_shards(decoded, first.nbits, first.group_size, device, first.codebook)


def _kind(meta: LayerMeta) -> str:
    return f"{meta.nbits}-bit g{meta.group_size} {meta.codebook.upper() if meta.codebook else 'uniform'} codes"
