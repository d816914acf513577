"""Uniform asymmetric round-to-nearest and the kurtosis gate (docs/format.md §1.4).

Expressions and their order follow the reference ``quantize_rtn`` (mode "uniform")
and ``kurtosis`` so that codes, scales and zeros round the same way.
"""

from __future__ import annotations

import torch

KURTOSIS_THRESHOLD = 5.0
_MIN_RANGE = 1e-4  # floor of (max - min) in the reference, keeps constant rows finite


def kurtosis(w: torch.Tensor, eps: float = 1e-6) -> float:
    """Pearson kurtosis ``E[(w-mu)^4] / Var^2`` over the whole tensor (3 for a Gaussian)."""
    x = w.float().reshape(-1)
    xc = x - x.mean()
    var = (xc * xc).mean().clamp_min(eps)
    return float((xc.pow(4)).mean() / (var * var))


def heavy_tailed(w: torch.Tensor, threshold: float = KURTOSIS_THRESHOLD) -> bool:
    """The reference gate: heavy-tailed matrices skip Sinkhorn and get plain RTN."""
    return kurtosis(w) > threshold


def quantize_rtn(w: torch.Tensor, nbits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row (last dim) of ``w`` to ``nbits`` codes.

    Returns float32 ``(q, scales, zeros)`` with ``w ~= (q - zeros) * scales``; zeros are
    integers in code units (HQQ convention), possibly outside ``[0, max_int]`` when a
    row has a single sign.
    """
    max_int = 2**nbits - 1
    w = w.to(torch.float32)
    max_val = w.amax(dim=-1, keepdim=True)
    min_val = w.amin(dim=-1, keepdim=True)
    scales = (max_val - min_val).clamp(min=_MIN_RANGE) / max_int
    zeros = -torch.round(min_val / scales)
    # In-place chain of round(w / scales + zeros).clamp(0, max_int): same roundings, fewer buffers.
    q = torch.div(w, scales).add_(zeros).round_().clamp_(0, max_int)
    return q, scales, zeros


_NF_ARGMIN_ELEMS = 1 << 18  # weights per argmin chunk: bounds the [.., levels] temporary to 16 MiB


def quantize_nf(w: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row (last dim) of ``w`` to the nearest level of ``codebook`` (fp32, sorted).

    The reference's ``quantize_rtn(mode="nf4"|"nf3")`` with its default "mean" shift
    (docs/format.md §1.4): ``w ~= (CB[q] - zeros) * scales`` with
    ``scales = max|w - mean|`` and ``zeros = -mean / scales``. Returns float32
    ``(q, scales, zeros)``; ties between two levels go to the lower code (``argmin``).
    """
    w = w.to(torch.float32)
    mu = w.mean(dim=-1, keepdim=True)
    scales = (w - mu).abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_RANGE)
    zeros = -mu / scales
    norm = w / scales + zeros
    flat = norm.reshape(-1)
    q = torch.empty(flat.shape, dtype=torch.uint8)
    for lo in range(0, flat.numel(), _NF_ARGMIN_ELEMS):
        part = flat[lo : lo + _NF_ARGMIN_ELEMS]
        q[lo : lo + part.numel()] = (part[:, None] - codebook[None, :]).abs().argmin(dim=-1)
    return q.view(norm.shape).float(), scales, zeros
