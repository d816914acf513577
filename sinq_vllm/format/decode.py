"""Decode the stored tensors of one SINQ module into plain codes, scales, zeros and column scales.

This is the reference's own dequantization of the stored form (docs/format.md §2.5-§2.7,
§2.11), done once at load time: quantAux scales and zeros are dequantized with the same
fp16 expression as the reference (bit-identical values), the planar codes are unpacked
to ``[N, K]`` (legacy unpacked codes are accepted), and every value a kernel would trust
is checked first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import SinqCheckpointError
from .aux8 import dq8
from .layer_meta import LayerMeta
from .packing import PACKINGS, planar_rows, unpack_planar
from .tensor_specs import expected_tensor_specs


class DecodedModule(NamedTuple):
    """One checkpoint module in plain form: ``W = (codes - zeros) * scales * col_scale`` (per group)."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # fp16 [N, K / g]
    zeros: torch.Tensor  # fp16 [N, K / g], float zeros in code units
    col_scale: torch.Tensor  # fp16 [K]


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


def decode_module(meta: LayerMeta, tensors: dict[str, torch.Tensor]) -> DecodedModule:
    """Checked plain form of one module (tensors keyed without the module prefix)."""
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
    return DecodedModule(codes, scales, zeros, t)


def _aux_or_plain(tensors: dict[str, torch.Tensor], name: str, rows: int) -> torch.Tensor:
    pre = f"meta.{name}"
    if pre + ".x" in tensors:
        return dq8(tensors[pre + ".x"], tensors[pre + ".s"], tensors[pre + ".m"], (rows, 1))
    return tensors[pre].reshape(rows, 1)


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
