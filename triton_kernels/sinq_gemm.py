"""Triton kernels of the SINQ linear op (docs/design.md §1, §4), on the resident layout of
``sinq_vllm/kernels/gpu_layout.py`` (lane-ordered words, docs/design.md §4.3):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k // g]) * s[n, k // g] + bias[n]

``V(q) = q`` for uniform layers and ``V(q) = CB[q]`` (a 16-entry fp32 table, the fp16 values of
the NF4/NF3 codebook) for codebook layers (``CODEBOOK``).

Installed as ``sinq_vllm.triton_kernels.sinq_gemm``; never import it as a top-level
``triton_kernels`` (that name belongs to another package vLLM imports).

Three GEMM kernels, chosen by M (``choose_path``), and one dequantizer:

* ``gemv`` (small M, no ``tl.dot``): group-factored, per K block (inside one group)
  ``acc += s * (sum_k xt * V(q)  -  z * sum_k xt)``, fp32 math; split-K.
* ``factored`` (``tl.dot``, moderate M): the same factoring on tensor cores: the codes (or
  their codebook values) are the B operand, ``x * t`` rounded to the activation dtype the A
  operand, fp32 accumulation; scale and zero once per (K block, output). Split-K.
* ``dequant`` (``tl.dot``, large M): tiled GEMM, B = ``(V(q) - z) * s`` rounded to the
  activation dtype, A = ``x * t``.
* ``dequantize_shard``: the dense weight ``(V(Q) - z) * s * t`` of one merged shard in the
  activation dtype, for the prefill path (scratch + torch.matmul, sinq_vllm/kernels/gpu_layout.py).

**Word loads.** Each packed word is loaded once per K block: a ``[BLOCK_K / P, BLOCK_N]``
tile of words is expanded to ``[P, BLOCK_K / P, BLOCK_N]`` codes by shifts and reshaped to
``[BLOCK_K, BLOCK_N]``. Row ``r`` of that tile holds input column
``k = (w0 + r % BW) * P + r // BW`` (``BW = BLOCK_K / P``): a permutation of the reduction
index inside the block, which the A operand (``x``, ``t``) is gathered with, so the dot
product is unchanged.

**Merged layers:** every BLOCK_N tile lies inside one ``align`` block of the padded column
space, hence inside one shard; its column-scale row and output columns come from ``blk``.

**Split-K in one launch:** each program of a split stores its fp32 partial tile to a
workspace, then increments the tile's arrival counter (``counters``, acq_rel, gpu scope);
the program that arrives last sums the partials of every split in split order
(deterministic), adds the bias, stores the output and resets the counter to 0, so the
counters are zero again after every launch (CUDA-graph safe; docs/design.md §4.2).

Tuning: fixed default configs per path (``default_config``), chosen by M, group and the
layout's ``align``; ``SINQ_VLLM_TRITON_AUTOTUNE=1`` instead runs ``triton.autotune`` over
small per-path config lists (``candidate_configs``). M thresholds between the paths are
``SINQ_VLLM_TRITON_GEMV_MAX_M`` (default 1) and ``SINQ_VLLM_TRITON_FACTORED_MAX_M``
(default 64). Split-K is a run-time argument (no recompilation per split), planned from
the SM count by ``choose_split_k``. ``selectable_variants`` lists every kernel variant the
defaults can launch (the offline resource check compiles them all for sm_80 and sm_90).

Interpreter traps (handled under the ``INTERPRET`` constexpr, set only when the kernels run
in the interpreter, so the GPU code is unaffected):
* ``tl.dot`` on bf16 operands returns garbage: both dot operands are upcast to fp32 *after*
  being rounded to the activation dtype, so the values the dot sees are the GPU path's;
* fp32 -> bf16 casts truncate instead of rounding to nearest even: ``_round`` rounds on
  the bits instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # pragma: no cover - import location is stable in triton 3.x
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = ()

_SUM_COMBINE = tl.standard._sum_combine  # what tl.sum reduces with; the interpreter maps it to np.sum

ENV_AUTOTUNE = "SINQ_VLLM_TRITON_AUTOTUNE"
ENV_GEMV_MAX_M = "SINQ_VLLM_TRITON_GEMV_MAX_M"
ENV_FACTORED_MAX_M = "SINQ_VLLM_TRITON_FACTORED_MAX_M"
PATHS = ("gemv", "factored", "dequant")
#: resident CTAs per SM the split-K planner aims to fill (docs/design.md §4.2)
TARGET_CTAS_PER_SM = 4


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


@triton.jit
def _sum(v, axis: tl.constexpr):
    # == tl.sum(v, axis) for fp32 input. The kernels call no triton.language function that
    # is itself a @triton.jit function (tl.sum, tl.cdiv, tl.zeros): those are decorated when
    # triton is imported, so in a process that imported triton without TRITON_INTERPRET=1
    # they cannot run inside the interpreted instance of this module (load_interpreted()).
    return tl.reduce(v, axis, _SUM_COMBINE)


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype`` rounded to nearest even. The interpreter *truncates* fp32 -> bf16
    casts, so there the rounding is done on the bits and the (now exactly representable)
    value is returned as fp32: dot operands stay fp32, and a later cast of an exact value
    is exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _word_offsets(w, n, N_pad):
    """Element offset of word (w, n) of qweight: lane order (gpu_layout.word_offsets)."""
    return ((w >> 2) * (N_pad >> 5) + (n >> 5)) * 128 + (n & 7) * 16 + (w & 3) * 4 + ((n >> 3) & 3)


@triton.jit
def _sz_offsets(g, n, N_pad):
    """fp16 offset of the scale of (group g, column n) in scales_zeros (lane order; zero at +1)."""
    return (g * N_pad + (n & -32) + (n & 7) * 4 + ((n >> 3) & 3)) * 2


@triton.jit
def _code_shifts(BITS: tl.constexpr):
    """Bit offset of code i < P inside its word (gpu_layout.NIBBLE_POS for 4-bit containers)."""
    i = tl.arange(0, 32 // BITS)
    if BITS == 4:
        pos = (i >> 1) + 4 * (i & 1)
    else:
        pos = i
    return pos * BITS


@triton.jit
def _block_k(kb, BLOCK_K: tl.constexpr, BITS: tl.constexpr):
    """Input column of each row of the expanded code tile of K block kb (see module doc)."""
    PACK: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // PACK
    r = tl.arange(0, BLOCK_K)
    return kb * BLOCK_K + (r % BW) * PACK + r // BW


@triton.jit
def _codes(qw_ptr, kb, offs_n, K, N_pad, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [BLOCK_K, BLOCK_N] of K block kb, rows in _block_k order; each word loaded once."""
    PACK: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_w = kb * BW + tl.arange(0, BW)
    words = tl.load(qw_ptr + _word_offsets(offs_w[:, None], offs_n[None, :], N_pad),
                    mask=(offs_w * PACK < K)[:, None], other=0)
    q3 = (words[None, :, :] >> _code_shifts(BITS)[:, None, None]) & MASK  # [P, BW, BN]
    return tl.reshape(q3, (BLOCK_K, BLOCK_N))


@triton.jit
def _values(q, lut_ptr, CODEBOOK: tl.constexpr):
    """fp32 code values V(q): the code itself, or its codebook entry."""
    if CODEBOOK:
        return tl.load(lut_ptr + q)
    else:
        return q.to(tl.float32)


@triton.jit
def _tile_columns(pid_n, blk_ptr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
    """Padded columns of tile pid_n, their output columns, validity mask, shard index."""
    n0 = pid_n * BLOCK_N
    blk = n0 // ALIGN
    shard = tl.load(blk_ptr + blk * 3)
    out_start = tl.load(blk_ptr + blk * 3 + 1)
    valid = tl.load(blk_ptr + blk * 3 + 2)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    local = offs_n - blk * ALIGN
    return offs_n, out_start + local, local < valid, shard


@triton.jit
def _tile(pid_n, pid_m, pid_k, blk_ptr, M, K, SPLIT_K, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A program's output tile (columns as _tile_columns, rows, their mask) and its split's K blocks."""
    offs_n, n_out, n_ok, shard = _tile_columns(pid_n, blk_ptr, BLOCK_N, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nkb = (K + BLOCK_K - 1) // BLOCK_K
    per = (nkb + SPLIT_K - 1) // SPLIT_K
    kb0 = pid_k * per
    return offs_n, n_out, n_ok, shard, offs_m, offs_m < M, kb0, tl.minimum(kb0 + per, nkb)


@triton.jit
def _store_out(acc, out_ptr, bias_ptr, offs_m, m_ok, n_out, n_ok, stride_om, HAS_BIAS: tl.constexpr,
               INTERPRET: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n_out, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m[:, None] * stride_om + n_out[None, :], _round(acc, out_dtype, INTERPRET).to(out_dtype),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, pid_k, SPLIT_K, offs_m, m_ok, n_out, n_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """Store the tile; with SPLIT, the one-launch deterministic split-K reduction (module doc)."""
    if SPLIT:
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = ws_ptr + tile.to(tl.int64) * SPLIT_K * (BLOCK_M * BLOCK_N)
        tl.store(base + pid_k * (BLOCK_M * BLOCK_N) + local, acc)
        tl.debug_barrier()  # every thread's partial is stored before the (release) arrival
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
            for s in range(SPLIT_K):  # fixed order: bit-identical whichever program is last
                total += tl.load(base + s * (BLOCK_M * BLOCK_N) + local, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            _store_out(total, out_ptr, bias_ptr, offs_m, m_ok, n_out, n_ok, stride_om, HAS_BIAS, INTERPRET)
    else:
        _store_out(acc, out_ptr, bias_ptr, offs_m, m_ok, n_out, n_ok, stride_om, HAS_BIAS, INTERPRET)


@triton.jit
def _scale_zero(sz_ptr, g, offs_n, N_pad):
    sz = sz_ptr + _sz_offsets(g, offs_n, N_pad)
    return tl.load(sz).to(tl.float32), tl.load(sz + 1).to(tl.float32)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M_BUCKET", "SPLIT_K"])
def _sinq_gemv_kernel(
    x_ptr, qw_ptr, sz_ptr, t_ptr, blk_ptr, lut_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, N_pad, stride_xm, stride_om, M_BUCKET, SPLIT_K,
    GROUP: tl.constexpr, BITS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, CODEBOOK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Group-factored GEMV without tensor cores; requires GROUP % BLOCK_K == 0."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n, n_out, n_ok, shard, offs_m, m_ok, kb0, kb1 = _tile(pid_n, pid_m, pid_k, blk_ptr, M, K, SPLIT_K, ALIGN,
                                                               BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = _block_k(kb, BLOCK_K, BITS)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        t = tl.load(t_ptr + shard * K + offs_k).to(tl.float32)
        xt = x.to(tl.float32) * t[None, :]  # [BM, BK], kept in fp32
        v = _values(_codes(qw_ptr, kb, offs_n, K, N_pad, BLOCK_K, BLOCK_N, BITS), lut_ptr, CODEBOOK)  # [BK, BN]
        part = _sum(xt[:, :, None] * v[None, :, :], 1)  # [BM, BN]
        sx = _sum(xt, 1)  # [BM]
        s, z = _scale_zero(sz_ptr, (kb * BLOCK_K) // GROUP, offs_n, N_pad)
        acc += s[None, :] * (part - z[None, :] * sx[:, None])

    tile = pid_m * tl.num_programs(0) + pid_n
    _finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, pid_k, SPLIT_K, offs_m, m_ok, n_out, n_ok, stride_om,
                 BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, INTERPRET)


@triton.jit(do_not_specialize=["M_BUCKET", "SPLIT_K"])
def _sinq_gemm_kernel(
    x_ptr, qw_ptr, sz_ptr, t_ptr, blk_ptr, lut_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, N_pad, stride_xm, stride_om, M_BUCKET, SPLIT_K,
    GROUP: tl.constexpr, BITS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, CODEBOOK: tl.constexpr, FACTORED: tl.constexpr,
    GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Tiled tensor-core GEMM; FACTORED applies s and z per K block (GROUP % BLOCK_K == 0),
    otherwise B is dequantized per element."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    act_dtype = x_ptr.dtype.element_ty

    # grouped tile order: GROUP_M row tiles share each column tile's weights in L2
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = N_pad // BLOCK_N
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_n, n_out, n_ok, shard, offs_m, m_ok, kb0, kb1 = _tile(pid_n, pid_m, pid_k, blk_ptr, M, K, SPLIT_K, ALIGN,
                                                               BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = _block_k(kb, BLOCK_K, BITS)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        t = tl.load(t_ptr + shard * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        a = _round(x.to(tl.float32) * t[None, :], act_dtype, INTERPRET)  # x * t rounded once: the A operand
        q = _codes(qw_ptr, kb, offs_n, K, N_pad, BLOCK_K, BLOCK_N, BITS)  # [BK, BN] int32
        if FACTORED:
            sx = _sum(a.to(tl.float32), 1)  # sum of exactly the A values the dot sees
            if CODEBOOK:
                b = _round(_values(q, lut_ptr, CODEBOOK), act_dtype, INTERPRET)
            elif INTERPRET:
                b = q.to(tl.float32)  # the interpreter's int -> bf16 cast is wrong too
            else:
                b = q.to(act_dtype)  # integer codes are exact in fp16/bf16
            if INTERPRET:  # bf16 tl.dot is wrong in the interpreter: fp32 operands, same values
                part = tl.dot(a.to(tl.float32), b.to(tl.float32))
            else:
                part = tl.dot(a, b)
            s, z = _scale_zero(sz_ptr, (kb * BLOCK_K) // GROUP, offs_n, N_pad)
            acc += s[None, :] * (part - z[None, :] * sx[:, None])
        else:
            if GROUP % BLOCK_K == 0:
                s, z = _scale_zero(sz_ptr, (kb * BLOCK_K) // GROUP, offs_n, N_pad)
                s = s[None, :]
                z = z[None, :]
            else:
                s, z = _scale_zero(sz_ptr, (tl.minimum(offs_k, K - 1) // GROUP)[:, None], offs_n[None, :], N_pad)
            b = _round((_values(q, lut_ptr, CODEBOOK) - z) * s, act_dtype, INTERPRET)
            if INTERPRET:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a, b, acc)

    _finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT_K, offs_m, m_ok, n_out, n_ok, stride_om,
                 BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, INTERPRET)


@triton.jit
def _sinq_dequant_kernel(
    qw_ptr, sz_ptr, t_ptr, lut_ptr, out_ptr, K, N_pad, shard, col0, rows,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CODEBOOK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[r, k] = (V(Q) - z) * s * t[shard, k] for padded column col0 + r (r < rows); GROUP % BLOCK_K == 0."""
    PACK: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_r = tl.program_id(0)
    kb = tl.program_id(1)
    offs_r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = offs_r < rows
    offs_n = col0 + offs_r
    offs_w = kb * BW + tl.arange(0, BW)
    words = tl.load(qw_ptr + _word_offsets(offs_w[:, None], offs_n[None, :], N_pad), mask=r_ok[None, :], other=0)
    q3 = (words[None, :, :] >> _code_shifts(BITS)[:, None, None]) & MASK  # [P, BW, BN]
    k3 = offs_w[None, :, None] * PACK + tl.arange(0, PACK)[:, None, None]  # [P, BW, 1]
    t = tl.load(t_ptr + shard * K + k3).to(tl.float32)
    sz = sz_ptr + _sz_offsets((kb * BLOCK_K) // GROUP, offs_n, N_pad)
    s = tl.load(sz, mask=r_ok, other=0.0).to(tl.float32)
    z = tl.load(sz + 1, mask=r_ok, other=0.0).to(tl.float32)
    w3 = (_values(q3, lut_ptr, CODEBOOK) - z[None, None, :]) * s[None, None, :] * t
    w = tl.reshape(tl.permute(w3, (2, 1, 0)), (BLOCK_N, BLOCK_K))  # column k = w * P + i: natural order
    out_dtype = out_ptr.dtype.element_ty
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :], _round(w, out_dtype, INTERPRET).to(out_dtype),
             mask=r_ok[:, None])


# --------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


def interpreting() -> bool:
    return bool(_InterpretedFunction) and isinstance(_sinq_gemm_kernel, _InterpretedFunction)


def autotune_enabled() -> bool:
    """Off by default: every candidate config is a separate compilation, which would add
    minutes to the first start of a server (per path, M bucket and constexpr set)."""
    return not interpreting() and os.environ.get(ENV_AUTOTUNE, "0").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def choose_path(m: int, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "gemv"  # no fp32 tensor-core path (tf32 would lose precision)
    if m <= _env_int(ENV_GEMV_MAX_M, 1):
        return "gemv"
    if m <= _env_int(ENV_FACTORED_MAX_M, 64):
        return "factored"
    return "dequant"


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def m_bucket(m: int) -> int:
    return min(_pow2_ceil(m), 4096)


def _largest_pow2_divisor(v: int, cap: int) -> int:
    d = 1
    while v % (d * 2) == 0 and d * 2 <= cap:
        d *= 2
    return d


def _block_m(path: str, m: int) -> int:
    if path == "gemv":
        return 1 if m == 1 else 4
    if path == "factored":
        return 16 if m <= 16 else 32  # 33..64 rows: two row tiles (BLOCK_M 64 needs too many registers)
    return 64


def candidate_configs(path: str, m: int, group: int, align: int, k: int) -> list[Config]:
    """Autotune space of one path; every config has align % BLOCK_N == 0 and, for the
    factored paths, group % BLOCK_K == 0."""
    bm = _block_m(path, m)
    bk_cap = _largest_pow2_divisor(group, 256)
    out: list[Config] = []
    if path == "gemv":
        for bn in (32, 64, 128, 256):
            for bk in (16, 32, 64, 128):
                for w in (2, 4, 8):
                    if bk <= bk_cap and bm * bk * bn <= 16384 and bk * bn >= 1024:
                        out.append(Config(bm, bn, bk, w, 2))
    elif path == "factored":
        for bn in (32, 64, 128):
            for bk in (32, 64, 128):
                for w, st in ((4, 2), (4, 3), (4, 4), (8, 3)):
                    if bk <= bk_cap:
                        out.append(Config(bm, bn, bk, w, st))
        if not out:  # group 16
            out = [Config(bm, bn, 16, 4, 3) for bn in (32, 64, 128)]
    else:
        for bmm in ((bm,) if bm == 64 else (64, 128)):
            for bn in (64, 128):
                for w, st in ((4, 3), (4, 4), (8, 3), (8, 4)):
                    out.append(Config(bmm, bn, 32, w, st))
            out.append(Config(bmm, 128, 64, 8, 2))
    out = [c for c in out if align % c.block_n == 0 and c.block_n <= align]
    return out or [default_config(path, m, group, align, k)]


def default_config(path: str, m: int, group: int, align: int, k: int) -> Config:
    """Fixed config used when autotuning is off (and the fallback of every pruned list).
    Every default is compiled for sm_80 and sm_90 by the offline resource check
    (tests/test_gpu_resources.py): no spills, >= 2 CTAs per SM (3-4 for most), with the
    Triton of CI (3.9) and of the GPU image (3.6, which allocates up to twice the registers
    for the same kernel). Larger tiles (BLOCK_K 64, BLOCK_M 64 on the factored path, 128 x 128
    on the dequant path, 8 warps) spill or leave one CTA per SM with one of the two."""
    bk_cap = _largest_pow2_divisor(group, 256)
    if interpreting():
        bn = min(32, align)
        if path == "gemv":
            return Config(min(_pow2_ceil(m), 4), bn, min(32, bk_cap), 1, 1)
        return Config(16, bn, min(32, bk_cap), 1, 1)
    bn_cap = min(align, 128)
    bm = _block_m(path, m)
    if path == "gemv":
        return Config(bm, min(bn_cap, 128 if bm == 1 else 64), min(32, bk_cap), 4, 2)
    if path == "factored":
        return Config(bm, min(bn_cap, 64), min(32 if bm == 16 else 16, bk_cap), 4, 3)
    return Config(bm, min(bn_cap, 64), 32, 4, 3)


DEQUANT_BLOCK_N = 32


def dequant_block_k(group: int) -> int:
    return min(32, _largest_pow2_divisor(group, 32))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split_k(path: str, m: int, n_pad: int, k: int, nbits: int, config: Config, device: torch.device) -> int:
    """Split K when the output tiles alone cannot give every SM ``TARGET_CTAS_PER_SM`` programs
    (decode shapes): at least 2 K blocks per split, and fp32 partials (written and read once,
    mostly in L2) at most half the packed weight bytes."""
    if path == "dequant":
        return 1
    tiles = max(1, n_pad // config.block_n) * max(1, -(-m // config.block_m))
    kblocks = max(1, k // config.block_k)
    if device.type != "cuda":
        return 2 if kblocks >= 4 else 1  # interpreter: exercise split-K on larger K
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-TARGET_CTAS_PER_SM * sms // tiles)
    by_traffic = max(1, (k * nbits) // (128 * max(1, m)))
    return max(1, min(want, kblocks // 2, by_traffic, 32))


def _tiles(path: str, m: int, n_pad: int, config: Config) -> int:
    return (n_pad // config.block_n) * -(-m // config.block_m)


def selectable_variants(groups=(16, 32, 64, 128), ms=(1, 2, 3, 4, 8, 16, 32, 64, 128, 256)) -> list[dict]:
    """Every (kernel, constexpr set, config) the fixed defaults can launch for the backends'
    align (128), 4- and 8-bit containers, fp16/bf16 (and fp32 on the gemv path), with and
    without a codebook (4-bit only), split-K on and off (GEMV and factored only). Bias,
    ALIGN and the exact group change no register or shared-memory use; the K block does."""
    out, seen = [], set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m in ms:
            path = choose_path(m, dtype)
            for group in groups:
                cfg = default_config(path, m, group, 128, 4 * group)
                for bits in (4, 8):
                    for codebook in ((False, True) if bits == 4 else (False,)):
                        for split in ((False, True) if path != "dequant" else (False,)):
                            key = (path, dtype, bits, codebook, split, cfg)
                            if key not in seen:
                                seen.add(key)
                                out.append(dict(kernel=path, dtype=dtype, bits=bits, codebook=codebook, split=split,
                                                group=group, config=cfg))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for group in groups:
            bk = dequant_block_k(group)
            for bits in (4, 8):
                for codebook in ((False, True) if bits == 4 else (False,)):
                    key = ("dequantize_shard", dtype, bits, codebook, bk)
                    if key not in seen:
                        seen.add(key)
                        out.append(dict(kernel="dequantize_shard", dtype=dtype, bits=bits, codebook=codebook,
                                        split=False, group=group, config=Config(1, DEQUANT_BLOCK_N, bk, 4, 1)))
    return out


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

_AUTOTUNERS: dict = {}


def _autotuned(path: str, m_bkt: int, group: int, align: int, k: int):
    key = (path, m_bkt, group, align)
    fn = _AUTOTUNERS.get(key)
    if fn is None:
        kernel = _sinq_gemv_kernel if path == "gemv" else _sinq_gemm_kernel
        configs = [
            triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in candidate_configs(path, m_bkt, group, align, k)
        ]
        fn = triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "SPLIT_K"])(kernel)
        _AUTOTUNERS[key] = fn
    return fn


def _container_bits(qweight: torch.Tensor, nbits: int, k: int) -> int:
    """Container width (4 or 8 bits) of ``nbits`` codes, checked against qweight's word rows
    (``W_pad`` = K / P rounded up to 4 rows, gpu_layout.word_rows)."""
    bits = 4 if nbits <= 4 else 8
    words = -(-k // (32 // bits))
    if qweight.shape[0] != -(-words // 4) * 4:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match {nbits}-bit codes of in_features {k}")
    return bits


def sinq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_zeros: torch.Tensor,
    col_scales: torch.Tensor,
    blk: torch.Tensor,
    counters: torch.Tensor | None,
    codebook: torch.Tensor | None,
    bias: torch.Tensor | None,
    nbits: int,
    group_size: int,
    out_features: int,
    path: str | None = None,
    split_k: int | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``y = sinq_linear(x[M, K])`` -> ``[M, out_features]`` in ``x.dtype``.

    ``counters``: the layout's zeroed arrival counters (None or too small: a zeroed temporary).
    ``path``/``split_k``/``config`` override the automatic choices (tests, benchmarks)."""
    if x.dim() != 2:
        raise ValueError("x must be 2-D [M, K]")
    m, k = x.shape
    n = out_features
    n_pad = qweight.shape[1]
    bits = _container_bits(qweight, nbits, k)
    align = n_pad // blk.shape[0] if blk.shape[0] else 128
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    path = path or choose_path(m, x.dtype)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}")
    if path != "gemv" and x.dtype == torch.float32:
        raise ValueError("the tensor-core paths need fp16 or bf16 activations")
    tuned = config is None and autotune_enabled()
    cfg = config or default_config(path, m, group_size, align, k)
    if split_k is None:
        split_k = choose_split_k(path, m, n_pad, k, bits, cfg, x.device)
    # the tuner picks the blocks at launch: size the scratch for any of its candidates
    cfgs = candidate_configs(path, m_bucket(m), group_size, align, k) if tuned else [cfg]
    tiles = max(_tiles(path, m, n_pad, c) for c in cfgs)
    ws_elems = split_k * max(_tiles(path, m, n_pad, c) * c.block_m * c.block_n for c in cfgs)
    if split_k > 1:
        ws = torch.empty(ws_elems, dtype=torch.float32, device=x.device)
        if counters is None or counters.numel() < tiles:
            counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    else:
        ws = out
        counters = counters if counters is not None else blk
    has_bias = bias is not None
    common = dict(GROUP=group_size, BITS=bits, ALIGN=align, SPLIT=split_k > 1, HAS_BIAS=has_bias,
                  CODEBOOK=codebook is not None, INTERPRET=interpreting())
    args = (x, qweight, scales_zeros, col_scales, blk, codebook if codebook is not None else col_scales,
            bias if has_bias else out, out, ws, counters, m, n, k, n_pad, x.stride(0), n, m_bucket(m), split_k)
    if path != "gemv":
        common.update(FACTORED=path == "factored", GROUP_M=8)

    def grid(meta):
        tiles_n = n_pad // meta["BLOCK_N"]
        tiles_m = triton.cdiv(m, meta["BLOCK_M"])
        if path == "gemv":
            return (tiles_n, split_k, tiles_m)
        return (tiles_n * tiles_m, split_k)

    if tuned:
        _autotuned(path, m_bucket(m), group_size, align, k)[grid](*args, **common)
    else:
        kernel = _sinq_gemv_kernel if path == "gemv" else _sinq_gemm_kernel
        kernel[grid](*args, **common, **cfg.kwargs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def dequantize_shard(out: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, col_scales: torch.Tensor,
                     codebook: torch.Tensor | None, nbits: int, group_size: int, shard: int, col0: int) -> torch.Tensor:
    """``out[r, :] = (V(Q) - z) * s * t[shard]`` (``out.dtype``) of padded columns ``col0 + r``, r < out rows."""
    rows, k = out.shape
    bits = _container_bits(qweight, nbits, k)
    bk = dequant_block_k(group_size)
    grid = (triton.cdiv(rows, DEQUANT_BLOCK_N), k // bk)
    _sinq_dequant_kernel[grid](
        qweight, scales_zeros, col_scales, codebook if codebook is not None else col_scales, out,
        k, qweight.shape[1], shard, col0, rows, GROUP=group_size, BITS=bits, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=bk,
        CODEBOOK=codebook is not None, INTERPRET=interpreting(), num_warps=4, num_stages=1,
    )
    return out


# --------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed: CI compile checks, register/smem inspection)
# --------------------------------------------------------------------------------------

TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_compile(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """Compile a @triton.jit kernel for ``sm_<arch>`` with Triton's bundled ptxas, without a GPU;
    returns the ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


def compile_for_target(path: str, act_dtype: torch.dtype, nbits: int, group: int, config: Config,
                       align: int = 128, split: bool = False, has_bias: bool = True, codebook: bool = False,
                       arch: int = 90):
    """Compile one variant of this module's kernels (``path``: a GEMM path or
    ``"dequantize_shard"``) for ``sm_<arch>`` without a GPU (see :func:`aot_compile`)."""
    act = TL_TYPES[act_dtype]
    bits = 4 if nbits <= 4 else 8
    if path == "dequantize_shard":
        kernel = _sinq_dequant_kernel
        sig = {"qw_ptr": "*i32", "sz_ptr": "*fp16", "t_ptr": "*fp16", "lut_ptr": "*fp32", "out_ptr": f"*{act}",
               "K": "i32", "N_pad": "i32", "shard": "i32", "col0": "i32", "rows": "i32"}
        consts = dict(GROUP=group, BITS=bits, BLOCK_N=config.block_n, BLOCK_K=config.block_k, CODEBOOK=codebook,
                      INTERPRET=False)
    else:
        kernel = _sinq_gemv_kernel if path == "gemv" else _sinq_gemm_kernel
        sig = {"x_ptr": f"*{act}", "qw_ptr": "*i32", "sz_ptr": "*fp16", "t_ptr": "*fp16", "blk_ptr": "*i32",
               "lut_ptr": "*fp32", "bias_ptr": f"*{act}", "out_ptr": f"*{act}", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "M": "i32", "N": "i32", "K": "i32", "N_pad": "i32", "stride_xm": "i32", "stride_om": "i32",
               "M_BUCKET": "i32", "SPLIT_K": "i32"}
        consts = dict(GROUP=group, BITS=bits, ALIGN=align, SPLIT=split, HAS_BIAS=has_bias, CODEBOOK=codebook,
                      INTERPRET=False, **config.kwargs())
        if path != "gemv":
            consts.update(FACTORED=path == "factored", GROUP_M=8)
    return aot_compile(kernel, sig, consts, config.num_warps, config.num_stages, arch)


# --------------------------------------------------------------------------------------
# interpreter instance (CPU tensors: tests, --dry-run)
# --------------------------------------------------------------------------------------

_INTERPRETED = None
_LOAD_LOCK = threading.Lock()


def load_interpreted():
    """A separate instance of this module whose kernels run in Triton's interpreter.

    ``triton.jit`` decides interpreted vs compiled when a kernel is *decorated*, so the
    module is executed once more with ``TRITON_INTERPRET=1`` set only for that import;
    the compiled kernels of this module (GPU) are left alone and the variable is restored.
    The kernels call no ``triton.language`` function that is itself a ``@triton.jit``
    function (see ``_sum``), so this works even when triton was imported without the
    variable.
    """
    global _INTERPRETED
    if interpreting():
        return sys.modules[__name__]
    with _LOAD_LOCK:
        if _INTERPRETED is None:
            spec = importlib.util.spec_from_file_location(__name__ + "_interpreted", __file__)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses and triton look the module up by name
            old = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                spec.loader.exec_module(mod)
            finally:
                if old is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = old
            if not mod.interpreting():
                raise RuntimeError("triton did not build interpreted kernels under TRITON_INTERPRET=1")
            _INTERPRETED = mod
    return _INTERPRETED
