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
#: dtypes accepted for stored scales, zeros, column scales and biases
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes accepted for codes stored unpacked (legacy gemlite-era checkpoints)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of a SINQ module must look like (dtype and shape)."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    what: str  # what the shape means, for messages
    required: bool = True
    # legacy layouts also accepted: (shape, dtypes) pairs
    alternatives: tuple[tuple[tuple[int, ...], tuple[torch.dtype, ...]], ...] = ()
    alternative_what: str = ""

    def problem(self, dtype: torch.dtype | None, shape: tuple[int, ...]) -> str | None:
        """None if a tensor of this dtype and shape is acceptable, else what is wrong with it."""
        shape = tuple(shape)
        layouts = ((self.shape, self.dtypes), *self.alternatives)
        matching = [dtypes for s, dtypes in layouts if s == shape]
        if not matching:
            alt = f" or {self.alternative_what}" if self.alternative_what else ""
            return f"has shape {list(shape)}, expected {list(self.shape)} ({self.what}){alt}"
        if not any(dtype in dtypes for dtypes in matching):
            return f"has dtype {dtype}, expected {_dtype_list(matching[0])} for {self.what}"
        return None


def _dtype_list(dtypes) -> str:
    if len(dtypes) == 1:
        return str(dtypes[0])
    return "one of " + ", ".join(str(d) for d in dtypes)


def expected_tensor_specs(meta: LayerMeta) -> dict[str, TensorSpec]:
    """``{key: TensorSpec}`` of every tensor of one module, as its sidecar meta implies (1D tiling).

    The one source of truth for tensor dtypes and shapes: the front-end header check
    (``validation``) and the load-time check (:func:`check_tensors`) both use it.
    Required keys come first, in the order the receivers register them.
    """
    n, k, g, r = meta.out_features, meta.in_features, meta.group_size, meta.grouped_rows
    packed = (planar_rows(r, meta.packing), g)
    unpacked = tuple({(r, g), (n, k)} - {packed})
    specs = {
        "W_q": TensorSpec(
            packed, (packed_dtype(meta.packing),), f"{meta.packing} planar packing of {r} groups of {g}",
            alternatives=tuple((s, INT_DTYPES) for s in unpacked),
            alternative_what=f"an unpacked [{n}, {k}] or [{r}, {g}] of integer codes",
        ),
        "meta.scale2": TensorSpec((1, k), FLOAT_DTYPES, "one column scale per input feature, 1D tiling"),
    }
    if meta.aux:
        x, one = (torch.uint8,), FLOAT_DTYPES
        specs.update({
            "meta.scale.x": TensorSpec((32, r // 32), x, f"8-bit scales of {r} groups"),
            "meta.scale.s": TensorSpec((1, r // 32), one, f"quantAux scale of {r} group scales"),
            "meta.scale.m": TensorSpec((1, r // 32), one, f"quantAux minimum of {r} group scales"),
            "meta.zero.x": TensorSpec((r, 1), x, f"8-bit zeros of {r} groups"),
            "meta.zero.s": TensorSpec((1, 1), one, "quantAux scale of the zeros"),
            "meta.zero.m": TensorSpec((1, 1), one, "quantAux minimum of the zeros"),
        })
    else:
        specs.update({
            "meta.scale": TensorSpec((r, 1), FLOAT_DTYPES, f"one scale per group, {r} groups"),
            "meta.zero": TensorSpec((r, 1), FLOAT_DTYPES, f"one zero per group, {r} groups"),
        })
    specs["bias"] = TensorSpec((n,), FLOAT_DTYPES, "one bias per output feature", required=False)
    return specs


def required_keys(meta: LayerMeta) -> tuple[str, ...]:
    return tuple(key for key, spec in expected_tensor_specs(meta).items() if spec.required)


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
    specs = expected_tensor_specs(meta)
    missing = [k for k, spec in specs.items() if spec.required and k not in tensors]
    if missing:
        raise SinqCheckpointError(
            f"{where}: tensors {', '.join(meta.name + '.' + k for k in missing)} are missing from the checkpoint "
            f"(its sidecar meta says {meta.nbits}-bit, method {meta.method!r})"
        )
    for key, spec in specs.items():
        if key in tensors:
            problem = spec.problem(tensors[key].dtype, tuple(tensors[key].shape))
            if problem:
                raise SinqCheckpointError(f"{where}: {meta.name}.{key} {problem}")


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
        # legacy gemlite-era checkpoints stored codes unpacked
        if int(wq.min()) < 0 or int(wq.max()) >= 2**meta.nbits:
            raise SinqCheckpointError(
                f"layer '{meta.name}': {meta.name}.W_q (unpacked codes) holds values outside [0, 2**{meta.nbits})"
            )
        codes = wq.reshape(n, k).to(torch.uint8)
    else:
        _check_word_bits(meta, wq)
        codes = unpack_planar(wq, meta.packing, r).reshape(n, k)
    scales = _aux_or_plain(tensors, "scale", r).to(torch.float16).reshape(n, k // g)
    zeros = _aux_or_plain(tensors, "zero", r).to(torch.float16).reshape(n, k // g)
    t = tensors["meta.scale2"].reshape(k).to(torch.float16)
    _check_values(meta, codes, scales, zeros, t)
    rows = slice(part.row0, part.row1)
    return (
        codes[rows, part.col0 : part.col1].contiguous(),
        scales[rows, part.col0 // g : part.col1 // g].contiguous(),
        zeros[rows, part.col0 // g : part.col1 // g].contiguous(),
        t[part.col0 : part.col1].contiguous(),
    )


def _check_values(meta: LayerMeta, codes, scales, zeros, t) -> None:
    """Value checks that need tensor data; they run before any kernel sees the weights."""
    where = f"layer '{meta.name}'"
    sz = "meta.scale.x/.s/.m" if meta.aux else "meta.scale"
    zz = "meta.zero.x/.s/.m" if meta.aux else "meta.zero"
    if int(codes.max()) >= 2**meta.nbits:
        raise SinqCheckpointError(
            f"{where}: {meta.name}.W_q holds codes >= 2**{meta.nbits}; packing/bit width mismatch"
        )
    if not torch.isfinite(scales).all():
        raise SinqCheckpointError(f"{where}: {meta.name}.{sz}: scales contain NaN or Inf (expected finite, non-zero)")
    if (scales == 0).any():
        raise SinqCheckpointError(
            f"{where}: {meta.name}.{sz}: {int((scales == 0).sum())} group scale(s) are zero (expected finite, non-zero)"
        )
    if not torch.isfinite(zeros).all():
        raise SinqCheckpointError(f"{where}: {meta.name}.{zz}: zeros contain NaN or Inf (expected finite)")
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise SinqCheckpointError(
            f"{where}: {meta.name}.meta.scale2 (column scales) must be finite and positive"
        )


def _check_word_bits(meta: LayerMeta, wq: torch.Tensor) -> None:
    """Bits above the used fields of an int32 word (3/5/6-bit packings) must be zero."""
    per_word, bits = PACKINGS[meta.packing]
    used = per_word * bits
    if wq.dtype == torch.int32 and used < 32 and bool(((wq.to(torch.int64) & 0xFFFFFFFF) >> used).any()):
        raise SinqCheckpointError(
            f"layer '{meta.name}': {meta.name}.W_q sets bits above the {used} that {meta.packing} uses; "
            "packing/bit width mismatch"
        )


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


__all__ = [
    "AUX_KEYS", "PLAIN_KEYS", "PACKINGS", "ShardSlice", "TensorSpec", "assemble", "check_tensors", "decode_shard",
    "expected_tensor_specs", "required_keys",
]
