"""Turn the raw checkpoint tensors of one vLLM linear layer into ``SinqWeights``.

A vLLM layer may merge several checkpoint modules (q/k/v, gate/up) and hold only
its tensor-parallel slice of them. Per checkpoint module ("shard") we:
1. dequantize the quantAux scales and zeros once, with the reference's fp16 expression;
2. unpack the planar codes to ``[N, K]`` (the planar layout cannot be sliced);
3. cut this rank's rows (column-parallel) or columns (row-parallel);
then concatenate the shards along N and stack their column scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SinqCheckpointError
from .format.aux8 import dq8
from .format.layer_meta import LayerMeta
from .format.packing import PACKINGS, packed_dtype, planar_rows, unpack_planar
from .kernels.base import SinqWeights

AUX_KEYS = ("meta.scale.x", "meta.scale.s", "meta.scale.m", "meta.zero.x", "meta.zero.s", "meta.zero.m")
PLAIN_KEYS = ("meta.scale", "meta.zero")


def required_keys(meta: LayerMeta) -> tuple[str, ...]:
    return ("W_q", "meta.scale2", *(AUX_KEYS if meta.aux else PLAIN_KEYS))


@dataclass(frozen=True)
class ShardSlice:
    """This rank's part of one checkpoint module: rows [row0, row1) and columns [col0, col1)."""

    row0: int
    row1: int
    col0: int
    col1: int


def check_tensors(meta: LayerMeta, tensors: dict[str, torch.Tensor]) -> None:
    """Presence, dtype and shape of every tensor of one module, against its sidecar meta."""
    where = f"layer '{meta.name}'"
    missing = [k for k in required_keys(meta) if k not in tensors]
    if missing:
        raise SinqCheckpointError(
            f"{where}: tensors {', '.join(meta.name + '.' + k for k in missing)} are missing from the checkpoint "
            f"(its sidecar meta says {meta.nbits}-bit, method {meta.method!r})"
        )
    n, k, g, r = meta.out_features, meta.in_features, meta.group_size, meta.grouped_rows
    wq = tensors["W_q"]
    packed_shape = (planar_rows(r, meta.packing), g)
    if tuple(wq.shape) != packed_shape and wq.numel() != n * k:
        raise SinqCheckpointError(
            f"{where}: {meta.name}.W_q has shape {list(wq.shape)}, expected {list(packed_shape)} "
            f"({meta.packing} planar packing of {r} groups of {g}) or an unpacked [{n}, {k}]"
        )
    if tuple(wq.shape) == packed_shape and wq.dtype != packed_dtype(meta.packing):
        raise SinqCheckpointError(
            f"{where}: {meta.name}.W_q has dtype {wq.dtype}, expected {packed_dtype(meta.packing)} for {meta.packing}"
        )
    if wq.dtype.is_floating_point:
        raise SinqCheckpointError(f"{where}: {meta.name}.W_q has floating dtype {wq.dtype}; codes must be integers")
    s2 = tensors["meta.scale2"]
    if s2.numel() != k or s2.dim() > 2:
        raise SinqCheckpointError(
            f"{where}: {meta.name}.meta.scale2 has shape {list(s2.shape)}, expected [1, {k}] (1D tiling)"
        )
    expect = {"meta.scale2": None}
    if meta.aux:
        expect.update({
            "meta.scale.x": (32, r // 32), "meta.scale.s": (1, r // 32), "meta.scale.m": (1, r // 32),
            "meta.zero.x": (r, 1), "meta.zero.s": (1, 1), "meta.zero.m": (1, 1),
        })
    else:
        expect.update({"meta.scale": (r, 1), "meta.zero": (r, 1)})
    for key, shape in expect.items():
        t = tensors[key]
        if shape is not None and t.numel() != shape[0] * shape[1]:
            raise SinqCheckpointError(
                f"{where}: {meta.name}.{key} has shape {list(t.shape)}, expected {list(shape)} for {r} groups"
            )
        if key.endswith(".x"):
            if t.dtype != torch.uint8:
                raise SinqCheckpointError(f"{where}: {meta.name}.{key} has dtype {t.dtype}, expected torch.uint8")
        elif not t.dtype.is_floating_point:
            raise SinqCheckpointError(f"{where}: {meta.name}.{key} has dtype {t.dtype}, expected a float dtype")


def _aux_or_plain(tensors: dict[str, torch.Tensor], name: str, rows: int) -> torch.Tensor:
    pre = f"meta.{name}"
    if pre + ".x" in tensors:
        return dq8(tensors[pre + ".x"], tensors[pre + ".s"], tensors[pre + ".m"], (rows, 1))
    return tensors[pre].reshape(rows, 1)


def decode_shard(meta: LayerMeta, tensors: dict[str, torch.Tensor], part: ShardSlice):
    """codes uint8 [rows, cols], scales fp16 [rows, cols/g], zeros fp16, col scale fp16 [cols]."""
    check_tensors(meta, tensors)
    n, k, g, r = meta.out_features, meta.in_features, meta.group_size, meta.grouped_rows
    wq = tensors["W_q"]
    if wq.numel() == n * k and tuple(wq.shape) != (planar_rows(r, meta.packing), g):
        codes = wq.reshape(n, k).to(torch.uint8)  # legacy gemlite-era checkpoints stored codes unpacked
    else:
        codes = unpack_planar(wq, meta.packing, r).reshape(n, k)
    scales = _aux_or_plain(tensors, "scale", r).to(torch.float16).reshape(n, k // g)
    zeros = _aux_or_plain(tensors, "zero", r).to(torch.float16).reshape(n, k // g)
    t = tensors["meta.scale2"].reshape(k).to(torch.float16)
    _check_values(meta, codes, scales, t)
    rows = slice(part.row0, part.row1)
    return (
        codes[rows, part.col0 : part.col1].contiguous(),
        scales[rows, part.col0 // g : part.col1 // g].contiguous(),
        zeros[rows, part.col0 // g : part.col1 // g].contiguous(),
        t[part.col0 : part.col1].contiguous(),
    )


def _check_values(meta: LayerMeta, codes, scales, t) -> None:
    where = f"layer '{meta.name}'"
    if int(codes.max()) >= 2**meta.nbits:
        raise SinqCheckpointError(f"{where}: W_q holds codes >= 2**{meta.nbits}; packing/bit width mismatch")
    if not torch.isfinite(scales).all():
        raise SinqCheckpointError(f"{where}: scales contain NaN or Inf")
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise SinqCheckpointError(f"{where}: meta.scale2 (column scales) must be finite and positive")


def assemble(
    metas: list[LayerMeta], shard_tensors: list[dict[str, torch.Tensor]], parts: list[ShardSlice], device
) -> SinqWeights:
    """Concatenate the decoded shards of one vLLM layer into ``SinqWeights``."""
    first = metas[0]
    for m in metas[1:]:
        if (m.nbits, m.group_size) != (first.nbits, first.group_size):
            raise SinqCheckpointError(
                f"modules '{first.name}' and '{m.name}' are merged into one vLLM layer but were quantized "
                f"differently ({first.nbits}-bit g{first.group_size} vs {m.nbits}-bit g{m.group_size})"
            )
    decoded = [decode_shard(m, t, p) for m, t, p in zip(metas, shard_tensors, parts)]
    offsets = [0]
    for codes, *_ in decoded:
        offsets.append(offsets[-1] + codes.shape[0])
    return SinqWeights(
        codes=torch.cat([d[0] for d in decoded]).to(device),
        scales=torch.cat([d[1] for d in decoded]).to(device),
        zeros=torch.cat([d[2] for d in decoded]).to(device),
        col_scales=torch.stack([d[3] for d in decoded]).to(device),
        shard_offsets=tuple(offsets),
        nbits=first.nbits,
        group_size=first.group_size,
    )


__all__ = ["AUX_KEYS", "PLAIN_KEYS", "PACKINGS", "ShardSlice", "assemble", "check_tensors", "decode_shard", "required_keys"]
