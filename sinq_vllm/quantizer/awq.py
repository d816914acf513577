"""A-SINQ's activation-aware scale of one weight (docs/format.md §1.5).

A port of the reference's ``compute_awq_scale`` as ``optimize_weights_proximal_legacy``
calls it for method ``sinq_awq_l1`` (20 values of alpha, no beta term, weight scaling on,
L1 error), bit for bit: the same fp16 matmuls and fp16 error reductions on tensors of the
same shapes and memory layouts, so the same alpha wins every comparison (the errors are
fp16 values, so near-ties are common and any other evaluation order could flip one).

Two shortcuts that change no value: the reference recomputes the unquantized output
``x @ W^T`` and the Sinkhorn normalisation of every slab for every alpha; both depend on the
weight only, so they are computed once (the caller passes the normalised slabs it quantizes
with anyway).
"""

from __future__ import annotations

import numpy as np
import torch

from .rtn import quantize_rtn

#: the reference's alpha grid, np.arange(0, 1, 1 / num_alphas) with num_alphas = 20
ALPHAS = np.arange(0, 1, 1.0 / 20)
_MIN_SCALE = 1e-4


def awq_scale(
    w16: torch.Tensor,
    activations: torch.Tensor,
    normalized: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    nbits: int,
) -> torch.Tensor:
    """The per-input-column scale (fp16 ``[K]``) that minimises ``mean|x W^T - x Wq^T|``.

    ``w16``: the fp16 weight ``[N, K]``; ``activations``: its inputs ``[S, L, K]``;
    ``normalized``, ``mu1``, ``mu2``: the Sinkhorn result of its column slabs
    (``[T, N, B]``, ``[T, B]``, ``[T, N, 1]``, T = K / B).
    """
    x = activations.to(torch.float16)  # the reference casts to the weight's dtype
    mu_tokens = x.float().abs().mean([0, 1])
    mu_weights = w16.float().abs().mean([0])
    gt = x @ w16.T
    best_scale, best_error = torch.ones_like(mu_tokens), float("inf")
    for alpha in ALPHAS:
        # (mean|x|^alpha * std^0): the reference's beta grid is [0], and std^0 == 1 exactly
        scales = mu_tokens.pow(alpha).clamp(min=_MIN_SCALE)
        scales = (scales / (mu_weights.pow(1 - alpha) + _MIN_SCALE)).clamp(min=_MIN_SCALE)
        scales = scales / (scales.max() * scales.min()).sqrt()
        wq = _fake_quant(normalized, mu1, mu2, scales, nbits)
        pred = x @ wq.T.to(torch.float16)
        error = (pred - gt).abs().mean()
        if error < best_error:
            best_error, best_scale = error.item(), scales
    return best_scale.to(torch.float16)


def _fake_quant(normalized, mu1, mu2, scales, nbits) -> torch.Tensor:
    """Contiguous float32 ``[N, K]``: each slab scaled by ``scales``, RTN-quantized,
    dequantized and scaled back (the reference's ``sinq_fake_quant`` on every slab)."""
    tiles, n, b = normalized.shape
    a = scales.view(tiles, 1, b)
    q, s, z = quantize_rtn(normalized * a, nbits)
    dq = ((q - z) * s) * (mu1[:, None, :] / a) * mu2
    return dq.permute(1, 0, 2).reshape(n, tiles * b)
