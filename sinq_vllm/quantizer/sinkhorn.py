"""Sinkhorn-style standard-deviation balancing (docs/format.md §1.2).

A port of the reference ``sinkhorn_log`` as ``quantize_dual_scale_shift`` calls it
(order 16, default clips), batched over leading dimensions so that all column slabs
of a matrix go through one set of tensor ops instead of a Python loop or ``vmap``.
Every reduction is per slab, so each slab gets bit for bit what the reference computes
for it alone.

Shortcuts keep the results bit-identical while cutting most of the work: the
row/column stds of an iterate are computed once and used for the target, its
imbalance and the next update (the reference computes the same values up to three
times; the first iterate is the input itself), and a slab
whose sticky gate has closed is dropped from the batch: with its updates frozen every
later iterate equals the one that closed the gate, which is already worse than the
best, so nothing about that slab can change any more.

The stds themselves (80% of the time with ``torch.std``) come from the CPU extension's
``sinkhorn_stds`` op when it is built: it forms the iterate on the fly and sums in double,
which gives torch.std's fp32 values (tests/test_quantizer.py checks both agree).
"""

from __future__ import annotations

import torch

from .native_ops import native_op

SINKHORN_ORDER = 16  # what quantize_dual_scale_shift passes
LOG_MU_MIN, LOG_MU_MAX = -0.3, 10.0
STEP_MIN, STEP_MAX = 0.7, 2.0  # damping of one update, as a ratio


def row_col_std(m: torch.Tensor, mu1: torch.Tensor | None = None, mu2: torch.Tensor | None = None):
    """Unbiased row and column stds of each slab of the iterate ``(m / mu1) / mu2``
    (``m`` fp32 ``[S, H, B]``, ``mu1 [S, B]``, ``mu2 [S, H, 1]``; ``m`` itself without them)."""
    op = native_op("sinkhorn_stds") if m.device.type == "cpu" else None
    if op is not None:
        return op(m, mu1, mu2)
    cur = m if mu1 is None else (m / mu1[:, None, :]) / mu2
    return cur.std(dim=-1), cur.std(dim=-2)


def _imbalance_from_stds(s_rows: torch.Tensor, s_cols: torch.Tensor) -> torch.Tensor:
    s_min = torch.minimum(s_rows.amin(dim=-1), s_cols.amin(dim=-1)).clamp_min(1e-12)
    s_max = torch.maximum(s_rows.amax(dim=-1), s_cols.amax(dim=-1))
    return s_max / s_min


def imbalance(mat: torch.Tensor) -> torch.Tensor:
    """max(row/col std) / min(row/col std) of each ``[..., H, B]`` matrix (unbiased std)."""
    return _imbalance_from_stds(mat.std(dim=-1), mat.std(dim=-2))


def sinkhorn_log(
    matrix: torch.Tensor,
    order: int = SINKHORN_ORDER,
    clip_min: float = 1e-3,
    clip_max: float = 1e3,
    eps: float = 1e-6,
    stop_on_increasing_imbalance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balance row and column stds of each ``[..., H, B]`` matrix.

    Returns ``(matrix / mu1 / mu2, mu1 [..., B], mu2 [..., H, 1])`` for the iterate of
    least imbalance, the identity included, so the result is never worse than the input.
    ``mu1`` scales columns (the input dim), ``mu2`` rows (the output dim).
    """
    m_all = matrix.to(torch.float32)
    batch = m_all.shape[:-2]
    h, b = m_all.shape[-2:]
    m = m_all.reshape(-1, h, b)  # flat batch so that active slabs can be indexed
    n = m.shape[0]

    std_r0, std_c0 = row_col_std(m)
    tgt = torch.minimum(
        std_r0.clamp(clip_min, clip_max).amin(dim=-1),
        std_c0.clamp(clip_min, clip_max).amin(dim=-1),
    ) + eps
    tgt = tgt[:, None]  # broadcast over the rows/cols of one slab

    log_mu1 = m.new_zeros(n, b)
    log_mu2 = m.new_zeros(n, h, 1)
    imb_min = _imbalance_from_stds(std_r0, std_c0)
    mu1_best = torch.ones_like(log_mu1)
    mu2_best = torch.ones_like(log_mu2)
    active = torch.arange(n)  # slabs whose gate is still open; shrinks monotonically
    cur_m = m

    for step in range(order):
        if active.numel() == 0:
            break
        mu1, mu2 = log_mu1.exp(), log_mu2.exp()
        if step == 0:
            # exp(0) == 1 and x / 1 == x exactly: the first iterate is the input itself.
            std_r, std_c = std_r0, std_c0
        else:
            std_r, std_c = row_col_std(cur_m, mu1, mu2)
        ib = _imbalance_from_stds(std_r, std_c)

        # `<=` keeps the latest of equal iterates, and torch.minimum lets a NaN
        # imbalance freeze the choice, both as in the reference.
        prev = imb_min[active]
        better = ib <= prev
        imb_min[active] = torch.minimum(prev, ib)
        mu1_best[active] = torch.where(better[:, None], mu1, mu1_best[active])
        mu2_best[active] = torch.where(better[:, None, None], mu2, mu2_best[active])

        if stop_on_increasing_imbalance:
            still = ~(ib > imb_min[active])
            if not bool(still.all()):
                active, cur_m, tgt, log_mu1, log_mu2 = (
                    active[still], cur_m[still], tgt[still], log_mu1[still], log_mu2[still]
                )
                std_r, std_c = std_r[still], std_c[still]

        # Row and column steps both come from the same iterate: simultaneous, not alternating.
        sal_col = (std_c.clamp(clip_min, clip_max) / tgt).clamp(STEP_MIN, STEP_MAX).log()
        sal_row = (std_r.clamp(clip_min, clip_max)[..., None] / tgt[..., None]).clamp(STEP_MIN, STEP_MAX).log()
        log_mu1 = (log_mu1 + sal_col).clip(LOG_MU_MIN, LOG_MU_MAX)
        log_mu2 = (log_mu2 + sal_row).clip(LOG_MU_MIN, LOG_MU_MAX)

    scaled = m / mu1_best[:, None, :] / mu2_best
    return scaled.reshape(m_all.shape), mu1_best.reshape(*batch, b), mu2_best.reshape(*batch, h, 1)
