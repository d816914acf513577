"""``sinq_fit``: SINQ's parameters fitted to the weight instead of set from min, max and stds.

Same stored form as SINQ (docs/format.md §0.1, §1.7), ``W[n,k] ~ (Q - z) * s * t[k]`` with a
float zero per group, so checkpoints load anywhere SINQ's do. Only how ``t``, ``s``, ``z``
and ``Q`` are chosen differs:

1. ``t``: Sinkhorn's column factor (docs/format.md §1.2), for every layer: no kurtosis gate
   (measured: the gate costs quality on the models we tried, benchmarks/results/quality_ablation.md).
2. ``s``, ``z`` per group: least squares with a range search on the Sinkhorn-normalized
   weights ``W / t`` (groupfit.py). The error is measured in the normalized domain, i.e.
   the error of column ``k`` weighs ``1 / t[k]**2``: SINQ's own balance of columns, which
   beat the plain weight error in every layer-level test (benchmarks/results/quality_ablation.md).
3. ``t`` refined against the quantization error: with codes, scales and zeros fixed, the
   column scale minimizing ``sum_n (W[n,k] - t[k] * D[n,k])**2`` (``D = s * (Q - z)``) is
   ``sum_n W D / sum_n D**2``, one closed form per column; then one Lloyd step of every group
   (groupfit.refine_groups) on the new ``W / t``; repeated ``t_steps`` times.
4. Codes last, against the values actually stored: ``t``, ``s`` and ``z`` rounded to fp16 and,
   with quantAux, through its 8-bit round trip (docs/format.md §2.5), then the nearest codes.

The row factor of Sinkhorn (``mu2``) plays no part: min-max and least-squares fits are both
invariant to scaling a group, so it only ever mattered through ``t``.
"""

from __future__ import annotations

import torch

from ..format.aux8 import SCALE_TILE, dq8, rtn8
from .groupfit import DEFAULT_DELTAS, fit_groups, nearest_codes, refine_groups
from .native_ops import native_op
from .sinkhorn import sinkhorn_log

#: Alternations of the column-scale update and the group refit.
DEFAULT_T_STEPS = 3
_SLAB_CHUNK_ELEMS = 1 << 20  # a few MiB of fp32 temporaries per chunk of slabs: they stay in cache


def column_scale_step(x: torch.Tensor, t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      nbits: int, native: bool = True) -> torch.Tensor:
    """Least-squares column scales for fixed codes, scales and zeros.

    ``x`` is ``[T, N, g]`` (the weights, slab by slab), ``t`` ``[T, g]`` the current column
    scales, ``scales``/``zeros`` ``[T, N, 1]`` fitted to ``x / t``. A column without a usable
    update (no non-zero reconstruction, or a non-positive optimum) keeps its scale. The CPU
    extension's ``column_scale_step`` op computes the same in one pass, summing in double.
    """
    op = native_op("column_scale_step") if native and x.device.type == "cpu" else None
    if op is not None:
        return op(x.contiguous(), t.contiguous(), scales.contiguous(), zeros.contiguous(), nbits)
    d = (nearest_codes(x / t[:, None, :], scales, zeros, nbits) - zeros) * scales
    num = torch.einsum("tng,tng->tg", x, d)
    den = torch.einsum("tng,tng->tg", d, d)
    new = num / den.clamp_min(torch.finfo(torch.float32).tiny)
    ok = (den > 0) & (new > 0) & torch.isfinite(new)
    return torch.where(ok, new, t)


def fit_slabs(slabs: torch.Tensor, nbits: int, t_steps: int = DEFAULT_T_STEPS, deltas=DEFAULT_DELTAS,
              lloyd_steps: int = 1, sinkhorn: bool = True):
    """fp32 slabs ``[T, N, g]`` -> column scales ``[T, g]``, scales and zeros ``[T, N, 1]`` (fp32)."""
    x = slabs.to(torch.float32)
    if sinkhorn:
        _, t, _ = sinkhorn_log(x)
    else:
        t = x.new_ones(x.shape[0], x.shape[2])
    s, z = fit_groups(x / t[:, None, :], nbits, deltas, lloyd_steps)
    for _ in range(t_steps):
        t = column_scale_step(x, t, s, z, nbits)
        s, z = refine_groups(x / t[:, None, :], s, z, nbits)
    return t, s, z


def stored_scales_zeros(scale: torch.Tensor, zero: torch.Tensor, aux: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The values a reader gets back for fp16 ``scale``/``zero`` ``[R, 1]``: themselves, or
    their quantAux round trip (the same ``rtn8`` the writer applies, layout/quantize in layer.py)."""
    if not aux:
        return scale, zero
    sx, ss, sm = rtn8(scale, SCALE_TILE)
    zx, zs, zm = rtn8(zero, zero.numel())
    return dq8(sx, ss, sm, scale.shape), dq8(zx, zs, zm, zero.shape)


def fit_tile_quantize(w16: torch.Tensor, group: int, nbits: int, aux: bool, t_steps: int = DEFAULT_T_STEPS,
                      deltas=DEFAULT_DELTAS, lloyd_steps: int = 1, sinkhorn: bool = True):
    """fp16 weight ``[N, K]`` -> codes ``[R, g]`` (uint8), scale and zero ``[R, 1]`` (fp16),
    column scale ``[1, K]`` (fp16): the outputs of layer.py's SINQ tiling, fitted as above.

    Chunks of slabs are fitted one after the other; the codes come after all of them because
    quantAux quantizes the zeros of the whole layer with one range (docs/format.md §2.5).
    """
    n, k = w16.shape
    tiles = k // group
    slabs = w16.view(n, tiles, group).permute(1, 0, 2)  # [T, N, g]
    scale = torch.empty((tiles, n), dtype=torch.float16)
    zero = torch.empty((tiles, n), dtype=torch.float16)
    col = torch.empty((tiles, group), dtype=torch.float16)
    step = max(1, _SLAB_CHUNK_ELEMS // (n * group))
    for lo in range(0, tiles, step):
        hi = min(tiles, lo + step)
        t, s, z = fit_slabs(slabs[lo:hi], nbits, t_steps, deltas, lloyd_steps, sinkhorn)
        col[lo:hi] = t
        scale[lo:hi] = s[..., 0]
        zero[lo:hi] = z[..., 0]
    # Group row r = n * T + j (output row major, slab minor), as layer.py stores them.
    scale_rows, zero_rows = scale.T.reshape(-1, 1), zero.T.reshape(-1, 1)
    s_read, z_read = stored_scales_zeros(scale_rows, zero_rows, aux)
    s_read = s_read.float().view(n, tiles).T[..., None]
    z_read = z_read.float().view(n, tiles).T[..., None]
    codes = torch.empty((n, tiles, group), dtype=torch.uint8)
    t_read = col.float()
    for lo in range(0, tiles, step):
        hi = min(tiles, lo + step)
        x = slabs[lo:hi].float() / t_read[lo:hi, None, :]
        q = nearest_codes(x, s_read[lo:hi], z_read[lo:hi], nbits)
        codes[:, lo:hi] = q.permute(1, 0, 2).to(torch.uint8)
    return codes.view(n * tiles, group), scale_rows, zero_rows, col.view(1, k)
