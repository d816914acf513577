"""Portable torch backend: K-packed int32 codes, dequantized block by block per call.

Correct on every platform and dtype, and the fallback when no native kernel fits.
Weights stay packed; each call dequantizes a bounded block of output rows at a time
(never the whole model, never kept), which is slow but memory-safe.
"""

from __future__ import annotations

import functools

import torch

from ..format.codebooks import CODEBOOKS, codebook_values
from ..format.packing import pack_along_k, unpack_along_k
from .contract import KernelBackend, LayerSpec, SinqWeights

# Output rows dequantized at once: bounds the transient fp32 block to ~16 MiB at K=4096.
_ROW_BLOCK = 1024


class TorchBackend(KernelBackend):
    name = "torch"
    codebooks = frozenset(CODEBOOKS)

    def unsupported_reason(self, spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> str | None:
        return None

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        return {
            "qweight": pack_along_k(weights.codes, weights.nbits),
            "scales": weights.scales.to(torch.float16).contiguous(),
            "zeros": weights.zeros.to(torch.float16).contiguous(),
            "col_scales": weights.col_scales.to(torch.float16).contiguous(),
        }

    def apply(self, tensors, spec: LayerSpec, x, bias):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, spec.in_features)
        out = torch.empty((x2.shape[0], spec.out_features), dtype=x.dtype, device=x.device)
        offs = spec.shard_offsets
        for s in range(len(offs) - 1):
            xs = x2 * tensors["col_scales"][s].to(x.dtype)
            for r0 in range(offs[s], offs[s + 1], _ROW_BLOCK):
                r1 = min(r0 + _ROW_BLOCK, offs[s + 1])
                w = dequant_rows(tensors, spec, r0, r1).to(x.dtype)
                out[:, r0:r1] = xs @ w.t()
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*lead, spec.out_features)


def dequant_rows(tensors, spec: LayerSpec, r0: int, r1: int) -> torch.Tensor:
    """float32 ``(V(Q) - z) * s`` for output rows [r0, r1) (no column scale); ``V`` is the
    identity for uniform codes and the fp16 codebook for NF4/NF3 (docs/format.md §1.7)."""
    q = unpack_along_k(tensors["qweight"][r0:r1], spec.nbits, spec.in_features)
    if spec.codebook is not None:
        q = _code_values(spec.codebook, q.device)[q.long()]
    else:
        q = q.float()
    g = spec.group_size
    q = q.view(r1 - r0, -1, g)
    z = tensors["zeros"][r0:r1].float().unsqueeze(-1)
    s = tensors["scales"][r0:r1].float().unsqueeze(-1)
    return ((q - z) * s).view(r1 - r0, spec.in_features)


@functools.lru_cache(maxsize=None)
def _code_values(codebook: str, device: torch.device) -> torch.Tensor:
    """float32 lookup table of a codebook's fp16 values (what the reference computes with)."""
    return codebook_values(codebook, torch.float16, device).float()
