"""Quantize one nn.Linear weight into the reference checkpoint tensors (docs/format.md §1, §2.3).

The pipeline mirrors ``Quantizer.quantize`` -> ``tiled_quant_rectangle`` ->
``quantize_dual_scale_shift`` for 1D tiling:

    W -> fp16 -> column slabs [N, B] -> fp32 -> Sinkhorn [-> x A-SINQ scale a]
      -> RTN or NF codebook per slab row
      -> q, s1 = scale * mu2, t = mu1 [/ a], z  (fp16) -> quantAux (rtn8) -> planar packing

What each method turns on is its row in ``quantizer/methods.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SinqConfigError
from ..format.aux8 import SCALE_TILE, dq8, rtn8
from ..format.codebooks import codebook_values
from ..format.layer_meta import LayerMeta
from ..format.packing import BITS_TO_PACKING, SUPPORTED_BITS, pack_planar
from ..format.tensor_specs import expected_tensor_specs
from ..log import get_logger
from .awq import awq_scale
from .methods import METHODS, QuantMethod, calibrated_methods, get_method
from .rtn import heavy_tailed, quantize_nf, quantize_rtn
from .sinkhorn import sinkhorn_log
from .sinq_fit import fit_tile_quantize, stored_scales_zeros
from .sinq_gptq import gptq_tile_quantize, input_hessian

logger = get_logger(__name__)

__all__ = ["METHODS", "QuantizedWeight", "quantize_weight", "quantize_weight_detailed", "stored_method"]

MIN_GROUP = 16  # the reference asserts the (possibly halved) tile is at least this
_SLAB_CHUNK_ELEMS = 1 << 22  # bounds the fp32 temporaries of Sinkhorn to a few 16 MiB buffers


@dataclass(frozen=True)
class QuantizedWeight:
    tensors: dict[str, torch.Tensor]
    meta: LayerMeta
    kurtosis_gated: bool  # a Sinkhorn layer that the reference gate sent to its RTN branch
    # the layer's calibration inputs shaped it: A-SINQ's activation scale was searched, or
    # sinq_gptq's error feedback ran (False: no activations, or a kurtosis-gated A-SINQ layer)
    calibrated: bool = False
    # error feedback ran: the float32 weight ``[N, K]`` a reader gets back, for the calibration
    # inputs of the next blocks (quantizer/activations.py, sequential)
    dequantized: torch.Tensor | None = None


def stored_method(method: str, aux: bool) -> str:
    """Method string for the sidecar; its substrings are the flags readers test.

    "sinq" is what the reference remaps to "sinq_quantAux" (and "asinq" to
    "sinq_awq_l1_quantAux"); without aux the "_quantAux" suffix is left out.
    """
    return get_method(method).stored_method(aux)


def validate_options(nbits: int, group_size: int, method: str) -> None:
    """Reject options the reference would reject (or silently mis-handle)."""
    m = get_method(method)
    if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits not in SUPPORTED_BITS:
        raise SinqConfigError(f"nbits={nbits!r} is not supported; choose one of {list(SUPPORTED_BITS)}")
    if nbits not in m.bits:
        raise SinqConfigError(
            f"method={method!r} writes {'/'.join(map(str, m.bits))}-bit codes ({m.summary}); nbits={nbits} does not "
            "fit it" + (" (use --method sinq_nf3 for 3 bits)" if m.codebook == "nf4" and nbits == 3 else "")
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise SinqConfigError(f"group_size={group_size!r} must be an integer")
    if group_size < MIN_GROUP or group_size % 8:
        raise SinqConfigError(
            f"group_size={group_size} must be a multiple of 8 and at least {MIN_GROUP} (typical: 64 or 128)"
        )


def _valid_groups(in_features: int) -> list[int]:
    return [g for g in range(MIN_GROUP, in_features + 1, 8) if in_features % g == 0]


def effective_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    """The reference tile fallback: halve the group until it divides K, never below 16."""
    b = group_size
    while b >= MIN_GROUP and in_features % b:
        b //= 2
    if b < MIN_GROUP or in_features % b:
        hint = _valid_groups(in_features)[:6]
        raise SinqConfigError(
            f"layer '{name}': in_features={in_features} is not divisible by group_size={group_size} "
            f"or any of its halves down to {MIN_GROUP}; "
            + (f"use --group-size in {hint} or " if hint else "")
            + f"exclude it with --skip {name}"
        )
    return b


def _check_aux_rows(name: str, rows: int, group: int) -> None:
    # The reference's rtn8 views the R scales as [32, R/32] and crashes otherwise; we
    # fail the same way but say why and what to do.
    if rows % SCALE_TILE:
        raise SinqConfigError(
            f"layer '{name}': quantAux needs out_features*in_features/group ({rows}, group {group}) "
            f"to be a multiple of {SCALE_TILE}; use --no-aux or exclude it with --skip {name}"
        )


def layer_meta(
    name: str, out_features: int, in_features: int, nbits: int, group_size: int, method: str, aux: bool,
    compute_dtype: str = "torch.bfloat16",
) -> LayerMeta:
    """The sidecar meta of a layer quantized with these options (the group after the reference fallback)."""
    group = effective_group_size(in_features, group_size, name)
    rows = out_features * in_features // group
    if aux:
        _check_aux_rows(name, rows, group)
    return LayerMeta(
        name=name,
        nbits=nbits,
        group_size=group,
        declared_group_size=group_size,  # the reference keeps the requested size in meta
        out_features=out_features,
        in_features=in_features,
        method=stored_method(method, aux),
        packing=BITS_TO_PACKING[nbits],
        aux=aux,
        scale_shape=(rows, 1),
        zero_shape=(rows, 1),
        compute_dtype=compute_dtype,
    )


def quantized_layout(
    out_features: int, in_features: int, nbits: int, group_size: int, aux: bool = True, name: str = "weight"
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of every tensor :func:`quantize_weight` returns, without quantizing."""
    meta = layer_meta(name, out_features, in_features, nbits, group_size, "sinq", aux)
    return {key: (spec.dtypes[0], spec.shape) for key, spec in expected_tensor_specs(meta).items() if spec.required}


def _normalize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 slabs ``[T, N, B]`` -> ``(x / mu1 / mu2, mu1 [T, B], mu2 [T, N, 1])``.

    ``mode``: "sinkhorn" (SINQ), "none" (plain RTN, unit factors) or "round_trip", the
    reference's branch for layers without the ``sinq`` flag (kurtosis-gated layers): it
    normalizes with Sinkhorn, multiplies the factors back (``x / mu1 / mu2 * mu1 * mu2`` is
    not exact in fp32) and then uses unit factors. Skipping the round trip flips ~0.3% of
    the codes at rounding ties, so gated layers would not match the reference bit for bit.
    """
    if mode == "none":
        return x, x.new_ones(x.shape[0], x.shape[2]), x.new_ones(x.shape[0], x.shape[1], 1)
    x, mu1, mu2 = sinkhorn_log(x)
    if mode == "round_trip":
        x = x * mu1[:, None, :] * mu2
        mu1, mu2 = torch.ones_like(mu1), torch.ones_like(mu2)
    return x, mu1, mu2


def _quantize_normalized(
    x: torch.Tensor, mu1: torch.Tensor, mu2: torch.Tensor, nbits: int, codebook: str | None,
    awq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized fp32 slabs -> uint8 codes, fp16 s1 ``[T, N, 1]``, z ``[T, N, 1]``, t ``[T, B]``.

    ``awq`` (fp16 ``[T, B]``, A-SINQ): the slabs are multiplied by it before quantization
    and the column scale divided by it, so it is absorbed into ``t`` (docs/format.md §1.5).
    """
    if awq is not None:
        x = x * awq[:, None, :]
        mu1 = mu1 / awq.float()
    if codebook is None:
        q, scales, zeros = quantize_rtn(x, nbits)
    else:
        q, scales, zeros = quantize_nf(x, codebook_values(codebook, torch.float32))
    s1 = (scales * mu2).to(torch.float16)
    # Codes pass through fp16 in the reference; exact for integers <= 255.
    return q.to(torch.uint8), s1, zeros.to(torch.float16), mu1.to(torch.float16)


def _tile_quantize(w16: torch.Tensor, group: int, nbits: int, method: QuantMethod, gated: bool,
                   activations: torch.Tensor | None = None):
    """Quantize all column slabs of ``w16``: codes ``[R, g]``, s, z ``[R, 1]``, t ``[1, K]``, and
    whether an A-SINQ scale was searched.

    Without an activation scale to search, slabs go through in chunks (bounded fp32
    temporaries). A-SINQ needs every slab's Sinkhorn result for each candidate scale, so
    it normalizes the whole matrix once and keeps it (one fp32 copy of the weight).
    """
    n, k = w16.shape
    tiles = k // group
    slabs = w16.view(n, tiles, group).permute(1, 0, 2)  # [T, N, B]
    mode = "round_trip" if gated else ("sinkhorn" if method.sinkhorn else "none")
    codebook = method.codebook
    if method.calibrated and activations is not None and not gated:
        x, mu1, mu2 = _normalize(slabs.to(torch.float32), mode)
        awq = awq_scale(w16, activations, x, mu1, mu2, nbits).view(tiles, group)
        return (*_assemble(n, [_quantize_normalized(x, mu1, mu2, nbits, codebook, awq)]), True)
    step = max(1, _SLAB_CHUNK_ELEMS // (n * group))
    parts = [_quantize_normalized(*_normalize(slabs[lo : lo + step].to(torch.float32), mode), nbits, codebook)
             for lo in range(0, tiles, step)]
    return (*_assemble(n, parts), False)


def _assemble(n: int, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks of ``(q [t, N, B], s1 [t, N, 1], z [t, N, 1], t [t, B])`` in slab order -> the stored
    layout: group row r = n * T + j, output row major, slab minor (reference permute(1, 0, 2))."""
    q = torch.cat([p[0] for p in parts])
    tiles, _, group = q.shape
    codes = q.permute(1, 0, 2).reshape(n * tiles, group)
    scale = torch.cat([p[1] for p in parts])[..., 0].T.reshape(-1, 1)
    zero = torch.cat([p[2] for p in parts])[..., 0].T.reshape(-1, 1)
    col = torch.cat([p[3] for p in parts]).reshape(1, tiles * group)
    return codes, scale.contiguous(), zero.contiguous(), col


def _require_finite(name: str, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise SinqConfigError(
            f"layer '{name}': {what} is not finite in fp16 (a weight beyond the fp16 range, or a constant "
            "group far from zero; the reference would write NaN/inf here); "
            f"exclude it with --skip {name}"
        )


_ZERO_AUX_WARN = 0.5  # code units; beyond this quantAux moves zeros to another code


def _aux_tensors(scale: torch.Tensor, zero: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    sx, ss, sm = rtn8(scale, SCALE_TILE)
    # One global (min, step) pair for all zeros of the layer, as the reference does, so a
    # single outlying zero (a constant group far from 0) coarsens every zero of the layer.
    zx, zs, zm = rtn8(zero, zero.numel())
    err = float((dq8(zx, zs, zm, zero.shape).float() - zero.float()).abs().max())
    if err > _ZERO_AUX_WARN:
        logger.warning(
            "layer '%s': 8-bit quantAux moves zero-points by up to %.2f code units (zeros span %g..%g); "
            "consider --no-aux", name, err, float(zero.min()), float(zero.max()),
        )
    return {
        "meta.scale.x": sx, "meta.scale.s": ss, "meta.scale.m": sm,
        "meta.zero.x": zx, "meta.zero.s": zs, "meta.zero.m": zm,
    }


def quantize_weight_detailed(
    W: torch.Tensor,
    nbits: int,
    group_size: int,
    method: str = "sinq",
    aux: bool = True,
    name: str = "weight",
    compute_dtype: torch.dtype | str | None = None,
    activations: torch.Tensor | None = None,
) -> QuantizedWeight:
    """:func:`quantize_weight` plus whether the kurtosis gate fired and whether the layer's
    calibration inputs were used. ``activations`` (``[S, L, K]``, calibrated methods only):
    the layer's inputs on the calibration set; without them an A-SINQ layer is quantized like
    SINQ, as the reference does for layers it collected nothing for, and a sinq_gptq layer
    like sinq_fit."""
    validate_options(nbits, group_size, method)
    qm = get_method(method)
    if W.dim() != 2 or not W.is_floating_point():
        raise SinqConfigError(f"layer '{name}': expected a 2-D float weight, got {tuple(W.shape)} {W.dtype}")
    n, k = W.shape
    compute_dtype = str(W.dtype if compute_dtype is None else compute_dtype)
    if not compute_dtype.startswith("torch."):
        compute_dtype = f"torch.{compute_dtype}"
    meta = layer_meta(name, n, k, nbits, group_size, method, aux, compute_dtype)
    group = meta.group_size
    if group != group_size:
        # meta["group_size"] keeps the requested size (reference behaviour); readers use W_q.shape[1]
        logger.info("layer '%s': group size %d -> %d (in_features=%d)", name, group_size, group, k)

    # The reference works on fp16 weights whatever the model dtype (docs/format.md §1.6).
    w16 = W.detach().to("cpu", torch.float16).contiguous()
    gated = qm.kurtosis_gate and heavy_tailed(w16)
    if gated:
        logger.info("layer '%s': kurtosis > 5, quantized without Sinkhorn (the reference's gate)", name)
    if activations is not None and (not qm.calibrated or activations.shape[-1] != k):
        raise SinqConfigError(f"layer '{name}': activations {tuple(activations.shape)} given to method {method!r} "
                              f"(only {calibrated_methods()} use them, with in_features={k} last)")
    # Gated layers take the reference's RTN branch, Sinkhorn round trip included, so that
    # they match it bit for bit; --method rtn stays plain RTN (our baseline, no Sinkhorn).
    dequantized = None
    if qm.error_feedback and activations is not None:
        codes, scale, zero, col = gptq_tile_quantize(w16, group, nbits, aux, input_hessian(activations))
        used = True
        s_read, z_read = stored_scales_zeros(scale, zero, aux)
        dequantized = ((codes.float() - z_read.float()) * s_read.float()).view(n, k) * col.float()
    elif qm.fitted:
        codes, scale, zero, col = fit_tile_quantize(w16, group, nbits, aux)
        used = False
    else:
        codes, scale, zero, col, used = _tile_quantize(w16, group, nbits, qm, gated, activations)
    # An inf/NaN weight (e.g. beyond the fp16 range) reaches every scale and zero of its
    # group row, so checking these R values covers the N*K weights.
    _require_finite(name, "a group scale", scale)
    _require_finite(name, "a zero-point", zero)
    _require_finite(name, "a column scale", col)

    tensors = {"W_q": pack_planar(codes, nbits), "meta.scale2": col}
    if aux:
        tensors.update(_aux_tensors(scale, zero, name))
    else:
        tensors.update({"meta.scale": scale, "meta.zero": zero})

    return QuantizedWeight(tensors, meta, gated, used, dequantized)


def quantize_weight(
    W: torch.Tensor, nbits: int, group_size: int, method: str = "sinq", aux: bool = True, **options
) -> tuple[dict[str, torch.Tensor], LayerMeta]:
    """Quantize ``W[N, K]`` (out, in) to the reference SINQ checkpoint tensors.

    Returns the tensors keyed as in the checkpoint without the module prefix (``W_q``,
    ``meta.scale2``, ``meta.scale.{x,s,m}``, ``meta.zero.{x,s,m}``, or ``meta.scale`` /
    ``meta.zero`` without aux) and the layer's :class:`LayerMeta`. ``options`` are the other
    keywords of :func:`quantize_weight_detailed`: ``name`` (in errors and in the meta) and
    ``compute_dtype`` (default: ``W.dtype``; recorded only).
    """
    q = quantize_weight_detailed(W, nbits, group_size, method, aux, **options)
    return q.tensors, q.meta
