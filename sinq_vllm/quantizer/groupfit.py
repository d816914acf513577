"""Least-squares scale and zero of every quantization group, found by a range search.

SINQ's RTN (docs/format.md §1.4) takes a group's scale and zero from its min and max. The
stored form reconstructs a group as ``x_i ~ s * (q_i - z) = a * q_i + b`` with ``a = s`` and
``b = -z * s``, and zeros are floats in code units (docs/format.md §2.7), so any affine fit
is storable as it is:

* for fixed codes ``q`` the best ``(a, b)`` is a two-parameter least-squares fit, in closed
  form from five sums over the group;
* for fixed ``(a, b)`` the best codes are the nearest ones.

Alternating the two from min-max RTN settles in the nearest local optimum. The range search
(as llama.cpp's k-quants ``make_qkx2_quants`` does) first rounds each group with several
step sizes ``(max - min) / (nmax + delta)``, ``delta`` in ``[-1, 1]`` (``delta < 0`` clips the
extremes, ``delta > 0`` leaves spare codes), fits ``(a, b)`` to each candidate's codes, keeps
the best per group and then polishes it with Lloyd steps (nearest codes, then least squares),
each kept only where it lowers the error.

Inputs are slabs ``[T, N, g]``: a group is a row of a slab (last dimension). Optional
weights ``[T, g]`` (one per column of a slab) make the fit a weighted least-squares one.
The CPU extension's ``group_fit`` op (csrc/cpu/sinq_group_fit.cpp) does the same in one
pass per candidate, with its sums in double; the torch version below is used without it.
"""

from __future__ import annotations

import torch

from .native_ops import native_op

#: Candidate ``delta`` of the range search: 9 step sizes between ``nmax - 1`` and ``nmax + 1``.
DEFAULT_DELTAS = tuple(-1.0 + 0.25 * i for i in range(9))
_MIN_RANGE = 1e-4  # the RTN floor of (max - min) (rtn.py), used for constant groups


def nearest_codes(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, nbits: int) -> torch.Tensor:
    """float32 codes ``clamp(round(x / s + z), 0, 2**nbits - 1)``, the best codes for fixed ``s, z``."""
    return torch.div(x, scales).add_(zeros).round_().clamp_(0, 2**nbits - 1)


def _sums(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None):
    """Weighted sums of q, q*q, x*q over the last dim, shaped ``[..., 1]``."""
    if w is None:
        return (q.sum(-1, keepdim=True), torch.linalg.vecdot(q, q).unsqueeze(-1),
                torch.linalg.vecdot(x, q).unsqueeze(-1))
    wq = q * w
    return (wq.sum(-1, keepdim=True), torch.linalg.vecdot(wq, q).unsqueeze(-1),
            torch.linalg.vecdot(wq, x).unsqueeze(-1))


def least_squares(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None, base) -> tuple:
    """Best ``(a, b, err)`` with ``x ~ a * q + b`` per group, for fixed codes ``q``.

    ``base = (sw, sx, sxx)`` are the code-independent sums of ``x`` (see :func:`_base_sums`).
    Where every code of a group is equal the fit is degenerate: ``a = 0`` and ``err = inf``,
    so that such a candidate never wins.
    """
    sw, sx, sxx = base
    sl, sll, sxl = _sums(x, q, w)
    det = sw * sll - sl * sl
    ok = det > 1e-9 * sw * sll.clamp_min(1.0)
    det = torch.where(ok, det, torch.ones_like(det))
    a = (sw * sxl - sx * sl) / det
    b = (sll * sx - sl * sxl) / det
    # Residual at the least-squares optimum (normal equations): sxx - a*sxl - b*sx.
    err = torch.where(ok & (a > 0), sxx - a * sxl - b * sx, torch.full_like(a, float("inf")))
    return a, b, err


def _base_sums(x: torch.Tensor, w: torch.Tensor | None):
    if w is None:
        sw = torch.full_like(x[..., :1], x.shape[-1])
        return sw, x.sum(-1, keepdim=True), torch.linalg.vecdot(x, x).unsqueeze(-1)
    wx = x * w
    sw = w.sum(-1, keepdim=True).expand_as(x[..., :1])
    return sw, wx.sum(-1, keepdim=True), torch.linalg.vecdot(wx, x).unsqueeze(-1)


def _op(x: torch.Tensor):
    return native_op("group_fit") if x.device.type == "cpu" else None


def _slab_weights(weights: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``[T, g]`` weights as the ``[T, 1, g]`` the torch sums broadcast."""
    return None if weights is None else weights.to(torch.float32).reshape(x.shape[0], 1, x.shape[2])


def fit_groups(
    x: torch.Tensor,
    nbits: int,
    deltas=DEFAULT_DELTAS,
    lloyd_steps: int = 1,
    weights: torch.Tensor | None = None,
    native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float zero per group of the slabs ``x [T, N, g]``, ``[T, N, 1]`` float32 each,
    that minimize the (weighted) squared error of ``s * (nearest_codes - z)``, found by the
    range search over ``deltas`` (``()``: min-max RTN's codes only) and ``lloyd_steps`` Lloyd
    steps. ``native=False`` forces the torch version."""
    x = x.to(torch.float32)
    op = _op(x) if native else None
    if op is not None:
        return op(x.contiguous(), nbits, [float(d) for d in deltas or (0.0,)], lloyd_steps,
                  None if weights is None else weights.to(torch.float32).contiguous(), None, None)
    weights = _slab_weights(weights, x)
    nmax = 2**nbits - 1
    lo = x.amin(-1, keepdim=True)
    rng = x.amax(-1, keepdim=True) - lo
    # The fit is translation invariant; sums of x - min lose less to cancellation.
    xm = x - lo
    base = _base_sums(xm, weights)
    floor = rng.clamp(min=_MIN_RANGE)

    best = None
    for delta in deltas or (0.0,):
        q = torch.mul(xm, (nmax + delta) / floor).round_().clamp_(0, nmax)
        cand = least_squares(xm, q, weights, base)
        if best is None:
            best = cand
        else:
            better = cand[2] < best[2]
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
    a, b, err = best
    for _ in range(lloyd_steps):
        safe_a = torch.where(err < float("inf"), a, floor / nmax)
        q = torch.sub(xm, b).div_(safe_a).round_().clamp_(0, nmax)
        cand = least_squares(xm, q, weights, base)
        better = cand[2] < err
        a, b, err = (torch.where(better, c, o) for c, o in zip(cand, (a, b, err)))
    return _to_scale_zero(a, b + lo, err, lo, rng, nmax)


def refine_groups(
    x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, nbits: int, weights: torch.Tensor | None = None,
    native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd step from a previous ``(s, z)``: nearest codes, then the least-squares fit
    to them, kept per group only where it lowers the error."""
    x = x.to(torch.float32)
    op = _op(x) if native else None
    if op is not None:
        return op(x.contiguous(), nbits, [], 1, None if weights is None else weights.to(torch.float32).contiguous(),
                  scales.to(torch.float32).contiguous(), zeros.to(torch.float32).contiguous())
    weights = _slab_weights(weights, x)
    base = _base_sums(x, weights)
    q = nearest_codes(x, scales, zeros, nbits)
    a, b, err = least_squares(x, q, weights, base)
    old = _error_of(x, q, scales, zeros, weights)
    better = err < old
    return torch.where(better, a, scales), torch.where(better, -b / a.where(better, 1.0), zeros)


def _error_of(x, q, scales, zeros, weights):
    r = x - (q - zeros) * scales
    r = r * r
    return (r if weights is None else r * weights).sum(-1, keepdim=True)


def _to_scale_zero(a, b, err, lo, rng, nmax):
    """``(a, b)`` -> ``(s, z)``; a group without a valid fit (near-constant) keeps min-max RTN's."""
    floor = rng.clamp(min=_MIN_RANGE)
    ok = (err < float("inf")) & (floor > _MIN_RANGE)  # near-constant groups: RTN's floor, as SINQ
    rtn_s = floor / nmax
    s = torch.where(ok, a, rtn_s)
    z = torch.where(ok, -b / s, -torch.round(lo / rtn_s))
    return s, z
