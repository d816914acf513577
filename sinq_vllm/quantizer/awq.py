"""A-SINQ's activation-aware scale of one weight (docs/format.md §1.5).

A port of the reference's ``compute_awq_scale`` as ``optimize_weights_proximal_legacy``
calls it for method ``sinq_awq_l1`` (20 values of alpha, no beta term, weight scaling on,
L1 error). The reference scores every alpha with fp16 matmuls ``x @ W^T`` and an fp16 mean;
the error values are fp16, so near-ties are common and the winning alpha depends on the
last bit of every product. Two ways to compute those matmuls:

* ``"exact"``: the reference's own fp16 matmuls on tensors of the same shapes and memory
  layouts, so the same alpha wins every comparison (bit-identical checkpoints, tested per
  layer and on a whole model). On CPUs without native fp16 arithmetic torch runs them as
  one fp32 dot product per output element (``fp16_dot_with_fp32_arith``, 8 accumulators
  of 8 lanes, then a tree), 4-8x slower than an fp32 GEMM here, and they were ~90% of
  A-SINQ's time (benchmarks/results/quant_time_asinq.md).
* ``"fast"`` (default): the same products as one fp32 GEMM (MKL/oneDNN), each output
  rounded to fp16, then the same fp16 error. The inputs are fp16 values, so every product
  is exact in fp32; only the summation order differs, which changes about 0.2% of the fp16
  outputs, by one ulp (more only where the sum cancels, within fp32's rounding bound). That
  can flip a near-tie between two alphas, so this path's parity is the model's perplexity
  (within 0.2% of the reference's: tests/test_asinq_matmul.py on the search's own error,
  tests/test_family_quantizer.py and benchmarks/results/quality_family_*.md on models).
  Bit equality would need torch's exact order (per output, 8 x 8 fp32 lane accumulators
  over 64-element blocks of K, then a fixed tree; matched by emulation on this CPU), which
  no BLAS GEMM keeps: a custom kernel in the CPU extension could, at maybe 2x torch's speed
  (its dot products already run near the fp16->fp32 conversion bound), against 4-8x here.

``reference_matmul()`` selects the exact path for a block of code (tests, parity runs).

Two shortcuts that change no value on either path: the reference recomputes the
unquantized output ``x @ W^T`` and the Sinkhorn normalisation of every slab for every
alpha; both depend on the weight only, so they are computed once (the caller passes the
normalised slabs it quantizes with anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .rtn import quantize_rtn

#: the reference's alpha grid, np.arange(0, 1, 1 / num_alphas) with num_alphas = 20
ALPHAS = np.arange(0, 1, 1.0 / 20)
_MIN_SCALE = 1e-4
MATMUL_MODES = ("fast", "exact")
_matmul_mode = "fast"


@contextlib.contextmanager
def reference_matmul() -> Iterator[None]:
    """Within this block every A-SINQ scale search runs the reference's fp16 matmuls
    (bit-identical to it, several times slower on CPU)."""
    global _matmul_mode
    before, _matmul_mode = _matmul_mode, "exact"
    try:
        yield
    finally:
        _matmul_mode = before


def fp16_matmul(x: torch.Tensor, matmul: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w -> x @ w`` for fp16 ``x [S, L, K]`` and fp16 ``w [K, N]``, an fp16 result computed the
    ``matmul`` way (``"exact"``/``"fast"``; default: the current mode, see ``reference_matmul``).
    A function of ``w`` so that ``x`` is converted once for the 21 products of a search."""
    matmul = _matmul_mode if matmul is None else matmul
    if matmul not in MATMUL_MODES:
        raise ValueError(f"A-SINQ matmul={matmul!r} is not one of {list(MATMUL_MODES)}")
    if matmul == "exact":
        return lambda w: x @ w  # w: an fp16 [K, N] view with the reference's strides
    x32 = x.float()  # fp16 values: exact in fp32, and so are their products
    return lambda w: (x32 @ w.float()).to(torch.float16)


def awq_scale(
    w16: torch.Tensor,
    activations: torch.Tensor,
    normalized: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    nbits: int,
    matmul: str | None = None,
) -> torch.Tensor:
    """The per-input-column scale (fp16 ``[K]``) that minimises ``mean|x W^T - x Wq^T|``.

    ``w16``: the fp16 weight ``[N, K]``; ``activations``: its inputs ``[S, L, K]``;
    ``normalized``, ``mu1``, ``mu2``: the Sinkhorn result of its column slabs
    (``[T, N, B]``, ``[T, B]``, ``[T, N, 1]``, T = K / B); ``matmul``: ``"fast"`` or
    ``"exact"`` (default: ``"exact"`` inside ``reference_matmul()``, else ``"fast"``).
    """
    x = activations.to(torch.float16)  # the reference casts to the weight's dtype
    mu_tokens = x.float().abs().mean([0, 1])
    mu_weights = w16.float().abs().mean([0])
    product = fp16_matmul(x, matmul)
    gt = product(w16.T)
    best_scale, best_error = torch.ones_like(mu_tokens), float("inf")
    for alpha in ALPHAS:
        # (mean|x|^alpha * std^0): the reference's beta grid is [0], and std^0 == 1 exactly
        scales = mu_tokens.pow(alpha).clamp(min=_MIN_SCALE)
        scales = (scales / (mu_weights.pow(1 - alpha) + _MIN_SCALE)).clamp(min=_MIN_SCALE)
        scales = scales / (scales.max() * scales.min()).sqrt()
        wq = _fake_quant(normalized, mu1, mu2, scales, nbits)
        pred = product(wq.T.to(torch.float16))
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
