"""``sinq_gptq``: SINQ's stored form with codes chosen by error feedback on calibration inputs.

Same stored form as SINQ (docs/format.md §0.1, §1.7): ``W[n,k] ~ (Q - z) * s * t[k]``, float
zeros, fp16 or quantAux, so checkpoints load anywhere SINQ's do. What it adds to ``sinq_fit``
(calibration-free, sinq_fit.py) is the layer's inputs ``X`` (docs/design.md §7):

1. ``t``: sinq_fit's column scale (Sinkhorn's, refined against the weight's quantization
   error), rounded to the fp16 the checkpoint stores.
2. The objective is the layer's output error ``|X (W - W_hat)^T|^2``. With the column scale
   folded in, ``W = W' * t`` and ``x W^T = (x * t) W'^T``, so quantizing the normalized
   ``W' = W / t`` against ``H' = diag(t) X^T X diag(t)`` is the same problem: the Hessian
   of the inputs the kernel really multiplies (``x * t``, as the kernels apply it).
3. Codes column by column, left to right, each column's rounding error spread over the
   columns not yet quantized through the inverse Hessian (GPTQ's update, Frantar et al.
   2022, with its Cholesky form and lazy block updates). A group's scale and zero are fitted
   when its first column comes up, to the columns as the updates left them: the weighted
   least-squares range search of groupfit.py, each column weighted by its diagonal of ``H'``.
4. The readers' values: quantAux stores the zeros of a whole layer with one 8-bit range
   (docs/format.md §2.5), so they are known only after every group is fitted. A second pass
   of the error-feedback rounding, from the original weights, with every group's scale and
   zero fixed at the values a reader gets back, makes the stored codes consistent with them.

5. Optionally (``cd_passes``, off by default: it did not pay) passes of coordinate descent on
   those codes (QuantEase): the error feedback decides each code once, looking only forward;
   coordinate descent revisits every code with all the others known.
6. The inputs ``X`` of a block come from the blocks before it as quantized (activations.py,
   ``sequential``), so a layer's error feedback also absorbs what earlier rounding did.

Layers without calibration inputs (outside the decoder blocks) get sinq_fit.
"""

from __future__ import annotations

import weakref

import torch

from .groupfit import DEFAULT_DELTAS, fit_groups
from .sinq_fit import DEFAULT_T_STEPS, fit_tile_quantize, stored_scales_zeros

#: Damping added to the Hessian's diagonal, as a share of its mean (GPTQ's ``percdamp``, whose usual
#: 0.01 gave 5-6% more held-out output error here: benchmarks/results/quality_ablation.md §4).
DEFAULT_DAMP = 0.1

#: Passes of coordinate descent on the codes after the error feedback (off by default): 3 passes lowered
#: the held-out output error of screened layers by 4.0-4.2% on both models (1.5x the layer time), but one
#: pass left Gemma-3-270M's perplexity where it was (quality_ablation.md §4), so it is not paid for.
DEFAULT_CD_PASSES = 0


#: (weak reference to the last inputs, their Hessian): layers that share an input tensor
#: (q/k/v, gate/up: activations.py hands them the same one) are quantized one after the other
_last_hessian: list = [None, None]


def input_hessian(activations: torch.Tensor) -> torch.Tensor:
    """``X^T X / rows`` (float64 ``[K, K]``) of a layer's inputs ``[..., K]``."""
    ref, h = _last_hessian
    if ref is not None and ref() is activations:
        return h
    x = activations.reshape(-1, activations.shape[-1]).to(torch.float32)
    h = (x.T @ x).to(torch.float64) / max(1, x.shape[0])
    _last_hessian[:] = [weakref.ref(activations), h]
    return h


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32), GPTQ's form:
    row ``i`` right of the diagonal, over the diagonal, is how column ``i``'s error moves
    the columns after it."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that is always zero: its column's error costs nothing
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype)
    lam = damp * float(diag.mean())
    for _ in range(6):  # a rank-deficient H (few calibration tokens): raise the damping
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            break
        lam *= 10
    else:
        raise RuntimeError("input Hessian is not positive definite even after damping")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True).to(torch.float32)


def _error_feedback(w: torch.Tensor, u: torch.Tensor, group: int, nbits: int, weights: torch.Tensor,
                    fixed: tuple[torch.Tensor, torch.Tensor] | None, deltas, lloyd_steps: int):
    """GPTQ over ``w [N, K]`` (float32, modified) with groups of ``group`` columns.

    ``fixed``: per-group ``(s, z)`` ``[T, N]`` to use as they are; else each group's pair is
    fitted when its first column is reached. Returns codes ``[N, K]`` (float32) and
    ``(s, z)`` ``[T, N]``.
    """
    n, k = w.shape
    tiles = k // group
    nmax = 2**nbits - 1
    scales, zeros = (torch.empty(tiles, n), torch.empty(tiles, n)) if fixed is None else fixed
    codes = torch.empty_like(w)
    for j in range(tiles):
        lo, hi = j * group, (j + 1) * group
        block = w[:, lo:hi]  # a view: the columns as earlier updates left them
        if fixed is None:
            s, z = fit_groups(block[None], nbits, deltas, lloyd_steps, weights[None, lo:hi])
            scales[j], zeros[j] = s[0, :, 0], z[0, :, 0]
        si, zi = scales[j], zeros[j]
        ub = u[lo:hi, lo:hi]
        err = torch.empty(n, group)
        for i in range(group):
            col = block[:, i]
            q = torch.div(col, si).add_(zi).round_().clamp_(0, nmax)
            codes[:, lo + i] = q
            e = (col - (q - zi) * si) / ub[i, i]
            err[:, i] = e
            block[:, i + 1:] -= e[:, None] * ub[i, i + 1:][None, :]
        w[:, hi:] -= err @ u[lo:hi, hi:]
    return codes, (scales, zeros)


def _coordinate_descent(w: torch.Tensor, codes: torch.Tensor, fixed: tuple[torch.Tensor, torch.Tensor],
                        h: torch.Tensor, group: int, nbits: int, passes: int, block: int = 128) -> torch.Tensor:
    """Cyclic coordinate descent on the codes ``[N, K]`` (float32, modified) for the output error
    ``tr(E H E^T)``, ``E = w - (codes - z) * s`` (QuantEase, Behdin et al. 2023): each code in
    turn moves to the integer that minimizes it with every other code fixed. With ``R = E H``,
    moving code ``(n, k)`` by ``d`` changes the error by ``-2 d s R[n,k] + d^2 s^2 H[k,k]``, so
    the best move is ``round(R[n,k] / (s H[k,k]))``; never worse than where it starts.
    ``R`` is updated exactly inside a block of columns and by one GEMM after it (GPTQ's lazy updates)."""
    n, k = w.shape
    nmax = 2**nbits - 1
    s = fixed[0].T.repeat_interleave(group, dim=1)  # [N, K]
    z = fixed[1].T.repeat_interleave(group, dim=1)
    h = h.float()
    diag = torch.diagonal(h)
    r = (w - (codes - z) * s) @ h
    for _ in range(passes):
        for lo in range(0, k, block):
            hi = min(lo + block, k)
            steps = torch.zeros(n, hi - lo)
            for j in range(lo, hi):
                sj = s[:, j]
                move = torch.where(sj > 0, r[:, j] / (sj * diag[j]), 0.0)
                q = (codes[:, j] + move).round_().clamp_(0, nmax)
                step = (q - codes[:, j]) * sj
                codes[:, j] = q
                steps[:, j - lo] = step
                r[:, lo:hi] -= step[:, None] * h[j, lo:hi][None, :]
            # the block's moves, on the columns outside it (inside, the loop kept R exact)
            if lo:
                r[:, :lo] -= steps @ h[lo:hi, :lo]
            if hi < k:
                r[:, hi:] -= steps @ h[lo:hi, hi:]
    return codes


def gptq_tile_quantize(w16: torch.Tensor, group: int, nbits: int, aux: bool, hessian: torch.Tensor,
                       damp: float = DEFAULT_DAMP, deltas=DEFAULT_DELTAS, lloyd_steps: int = 1,
                       column_scale: str = "fit", cd_passes: int = DEFAULT_CD_PASSES):
    """fp16 weight ``[N, K]`` and its input Hessian ``[K, K]`` -> codes ``[R, g]`` (uint8), scale
    and zero ``[R, 1]`` (fp16), column scale ``[1, K]`` (fp16), in the layout of layer.py's
    SINQ tiling (group row ``r = n * T + j``).

    ``column_scale``: "fit" (sinq_fit's ``t``), "sinkhorn" (its first step only) or "one"
    (benchmarks/results/quality_ablation.md §4 compares them).
    """
    if column_scale not in ("fit", "sinkhorn", "one"):
        raise ValueError(f"column_scale={column_scale!r}: choose 'fit', 'sinkhorn' or 'one'")
    n, k = w16.shape
    tiles = k // group
    if column_scale == "one":
        t = torch.ones(k, dtype=torch.float16)
    else:
        t_steps = 0 if column_scale == "sinkhorn" else DEFAULT_T_STEPS
        t = fit_tile_quantize(w16, group, nbits, aux, t_steps=t_steps)[3].view(k)
    tf = t.float()
    wn = w16.float() / tf
    hn = hessian.to(torch.float64) * tf.double()[:, None] * tf.double()[None, :]
    u = _inverse_hessian_factor(hn, damp)
    weights = torch.diagonal(hn).float().clamp_min(0)
    # pass 1: fit each group to the updated columns
    _, (s, z) = _error_feedback(wn.clone(), u, group, nbits, weights, None, deltas, lloyd_steps)
    scale_rows = s.to(torch.float16).T.reshape(-1, 1)
    zero_rows = z.to(torch.float16).T.reshape(-1, 1)
    s_read, z_read = stored_scales_zeros(scale_rows, zero_rows, aux)
    fixed = (s_read.float().view(n, tiles).T.contiguous(), z_read.float().view(n, tiles).T.contiguous())
    # pass 2: the codes for the values a reader gets back
    codes, _ = _error_feedback(wn.clone(), u, group, nbits, weights, fixed, deltas, lloyd_steps)
    if cd_passes:
        hd = hn.clone()
        hd.diagonal().add_(damp * float(torch.diagonal(hn).clamp_min(0).mean()))
        codes = _coordinate_descent(wn, codes, fixed, hd, group, nbits, cd_passes)
    codes = codes.to(torch.uint8).view(n, tiles, group).reshape(n * tiles, group)
    return codes, scale_rows, zero_rows, t.view(1, k)
