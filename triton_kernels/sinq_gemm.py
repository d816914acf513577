"""Triton kernels of the SINQ linear op (DESIGN.md §1, §4), on the resident layout of
``sinq_vllm/kernels/gpu_layout.py``:

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (Q[n, k] - z[n, k // g]) * s[n, k // g] + bias[n]

Installed as ``sinq_vllm.triton_kernels.sinq_gemm``; never import it as a top-level
``triton_kernels`` (that name belongs to another package vLLM imports).

Three kernels, chosen by M (``choose_path``):

* ``gemv`` (small M, no ``tl.dot``): tile ``[BLOCK_K, BLOCK_N]`` of codes, fp32 math,
  *group-factored*: per K block (inside one group)
  ``acc += s * (sum_k xt * q  -  z * sum_k xt)``, so the per-weight work is a shift,
  a mask, a convert and an FMA; split-K over a second grid axis.
* ``factored`` (``tl.dot``, moderate M): the same factoring on tensor cores: the integer
  codes (exact in fp16/bf16) are the B operand, ``x * t`` rounded to the activation
  dtype the A operand, fp32 accumulation; scale and zero are applied once per
  (K block, output) instead of once per weight. Split-K.
* ``dequant`` (``tl.dot``, large M): classic tiled GEMM, B = ``(q - z) * s`` rounded to
  the activation dtype, A = ``x * t`` (per-element dequant cost amortised over BLOCK_M).

Merged layers: every BLOCK_N tile lies inside one ``align`` block of the padded column
space, hence inside one shard; its column-scale row and output columns come from the
``blk`` table. One launch per layer (plus a small reduction when split-K > 1).
Split-K partials are written to an fp32 ``[SPLIT_K, M, N]`` buffer and summed in a
fixed order by ``_splitk_reduce_kernel`` (deterministic, no atomics, no zero-fill).

Tuning: fixed default configs per path (``default_config``), chosen by M, group and the
layout's ``align``; ``SINQ_VLLM_TRITON_AUTOTUNE=1`` instead runs ``triton.autotune`` over
small per-path config lists (``candidate_configs``), keyed on (M bucket, N, K, split-K) -
off by default because every config is a compilation (minutes at a server's first start).
Under the interpreter a single small config is used. M thresholds between the paths are
``SINQ_VLLM_TRITON_GEMV_MAX_M`` (default 1) and ``SINQ_VLLM_TRITON_FACTORED_MAX_M``
(default 64). Split-K is a run-time argument (no recompilation per split), planned from
the SM count by ``choose_split_k``.

Interpreter traps (triton 3.9), handled under the ``INTERPRET`` constexpr, which is set
only when the kernels run in the interpreter (so the GPU code is unaffected):
* ``tl.dot`` on bf16 operands returns garbage (the interpreter multiplies the raw uint16
  bit patterns): both dot operands are upcast to fp32 *after* being rounded to the
  activation dtype, so the values the dot sees are the GPU path's;
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


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _sum(v, axis: tl.constexpr):
    # == tl.sum(v, axis) for fp32 input. The kernels call no triton.language function that
    # is itself a @triton.jit function (tl.sum, tl.cdiv): those are decorated when triton is
    # imported, so in a process that imported triton without TRITON_INTERPRET=1 they cannot
    # run inside the interpreted instance of this module (load_interpreted()).
    return tl.reduce(v, axis, _SUM_COMBINE)


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype`` rounded to nearest even. The interpreter (triton 3.9) *truncates*
    fp32 -> bf16 casts, so there the rounding is done on the bits and the (now exactly
    representable) value is returned as fp32: dot operands stay fp32 (see DOT trap), and a
    later cast of an exact value is exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _code_shift(offs_k, BITS: tl.constexpr):
    """Bit offset of the code of input column k inside its int32 word (gpu_layout.py)."""
    PACK: tl.constexpr = 32 // BITS
    i = offs_k % PACK
    if BITS == 4:
        pos = (i >> 1) + 4 * (i & 1)
    else:
        pos = i
    return pos * BITS


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
def _k_block_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K):
    nkb = (K + BLOCK_K - 1) // BLOCK_K
    per = (nkb + SPLIT_K - 1) // SPLIT_K
    kb0 = pid_k * per
    kb1 = tl.minimum(kb0 + per, nkb)
    return kb0, kb1


@triton.jit
def _store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, m_ok, n_out, n_ok, M, N, stride_om,
                SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    mask = m_ok[:, None] & n_ok[None, :]
    if not SPLIT:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n_out, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + n_out[None, :]
        out_dtype = out_ptr.dtype.element_ty
        tl.store(ptrs, _round(acc, out_dtype, INTERPRET).to(out_dtype), mask=mask)
    else:
        # fp32 partials [SPLIT_K, M, N], contiguous
        ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + n_out[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET", "SPLIT_K"])
def _sinq_gemv_kernel(
    x_ptr, qw_ptr, sz_ptr, t_ptr, blk_ptr, bias_ptr, out_ptr,
    M, N, K, N_pad, stride_xm, stride_om, M_BUCKET, SPLIT_K,
    GROUP: tl.constexpr, BITS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Group-factored GEMV without tensor cores; requires GROUP % BLOCK_K == 0."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1

    offs_n, n_out, n_ok, shard = _tile_columns(pid_n, blk_ptr, BLOCK_N, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    kb0, kb1 = _k_block_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        t = tl.load(t_ptr + shard * K + offs_k)
        xt = x.to(tl.float32) * t[None, :]  # [BM, BK], kept in fp32
        words = tl.load(qw_ptr + (offs_k // PACK)[:, None] * N_pad + offs_n[None, :])
        q = ((words >> _code_shift(offs_k, BITS)[:, None]) & MASK).to(tl.float32)  # [BK, BN]
        part = _sum(xt[:, :, None] * q[None, :, :], 1)  # [BM, BN]
        sx = _sum(xt, 1)  # [BM]
        g = (kb * BLOCK_K) // GROUP
        sz = sz_ptr + (g * N_pad + offs_n) * 2
        s = tl.load(sz).to(tl.float32)
        z = tl.load(sz + 1).to(tl.float32)
        acc += s[None, :] * (part - z[None, :] * sx[:, None])

    _store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, m_ok, n_out, n_ok, M, N, stride_om, SPLIT, HAS_BIAS, INTERPRET)


@triton.jit(do_not_specialize=["M_BUCKET", "SPLIT_K"])
def _sinq_gemm_kernel(
    x_ptr, qw_ptr, sz_ptr, t_ptr, blk_ptr, bias_ptr, out_ptr,
    M, N, K, N_pad, stride_xm, stride_om, M_BUCKET, SPLIT_K,
    GROUP: tl.constexpr, BITS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, FACTORED: tl.constexpr,
    GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Tiled tensor-core GEMM; FACTORED applies s and z per K block (GROUP % BLOCK_K == 0),
    otherwise B is dequantized per element."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
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

    offs_n, n_out, n_ok, shard = _tile_columns(pid_n, blk_ptr, BLOCK_N, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    kb0, kb1 = _k_block_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        t = tl.load(t_ptr + shard * K + offs_k, mask=k_ok, other=0.0)
        a = _round(x.to(tl.float32) * t[None, :], act_dtype, INTERPRET)  # x * t rounded once: the A operand
        words = tl.load(qw_ptr + (offs_k // PACK)[:, None] * N_pad + offs_n[None, :], mask=k_ok[:, None], other=0)
        q = (words >> _code_shift(offs_k, BITS)[:, None]) & MASK  # [BK, BN] int32
        if FACTORED:
            sx = _sum(a.to(tl.float32), 1)  # sum of exactly the A values the dot sees
            if INTERPRET:  # bf16 tl.dot is wrong in the interpreter: fp32 operands, same values
                part = tl.dot(a.to(tl.float32), q.to(tl.float32))
            else:
                part = tl.dot(a, q.to(act_dtype))  # integer codes are exact in fp16/bf16
            g = (kb * BLOCK_K) // GROUP
            sz = sz_ptr + (g * N_pad + offs_n) * 2
            s = tl.load(sz).to(tl.float32)
            z = tl.load(sz + 1).to(tl.float32)
            acc += s[None, :] * (part - z[None, :] * sx[:, None])
        else:
            if GROUP % BLOCK_K == 0:
                g = (kb * BLOCK_K) // GROUP
                sz = sz_ptr + (g * N_pad + offs_n) * 2
                s = tl.load(sz).to(tl.float32)[None, :]
                z = tl.load(sz + 1).to(tl.float32)[None, :]
            else:
                g2 = tl.minimum(offs_k, K - 1) // GROUP
                sz = sz_ptr + (g2[:, None] * N_pad + offs_n[None, :]) * 2
                s = tl.load(sz).to(tl.float32)
                z = tl.load(sz + 1).to(tl.float32)
            b = _round((q.to(tl.float32) - z) * s, act_dtype, INTERPRET)
            if INTERPRET:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a, b, acc)

    _store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, m_ok, n_out, n_ok, M, N, stride_om, SPLIT, HAS_BIAS, INTERPRET)


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, out_ptr, M, N, SPLIT_K, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """out[m, n] = sum_s partials[s, m, n] (fixed order) + bias[n]; out contiguous [M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, _round(acc, out_dtype, INTERPRET).to(out_dtype), mask=mask)


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
        return min(_pow2_ceil(m), 4)
    if path == "factored":
        return min(max(16, _pow2_ceil(m)), 64)
    return 64 if m <= 64 else 128


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
    """Fixed config used when autotuning is off (and the fallback of every pruned list)."""
    bk_cap = _largest_pow2_divisor(group, 256)
    if interpreting():
        bn = min(32, align)
        if path == "gemv":
            return Config(min(_pow2_ceil(m), 4), bn, min(32, bk_cap), 1, 1)
        return Config(16, bn, min(32, bk_cap), 1, 1)
    bn_cap = min(align, 128)
    if path == "gemv":
        bm = min(_pow2_ceil(m), 4)
        return Config(bm, min(bn_cap, 128), min(64 if bm == 1 else 32, bk_cap), 4, 2)
    # register use checked by compiling for sm_90 (cuobjdump --dump-resource-usage): these
    # defaults do not spill; e.g. dequant 128x128x64 with 4 warps or factored 64x64x64
    # with 4 warps do.
    if path == "factored":
        bm = _block_m(path, m)
        return Config(bm, min(bn_cap, 64), min(64, bk_cap), 4 if bm <= 32 else 8, 3)
    bm = _block_m(path, m)
    return Config(bm, bn_cap, 32, 8 if bm == 128 else 4, 3)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split_k(path: str, m: int, n_pad: int, k: int, group: int, device: torch.device) -> int:
    """Split K when the output tiles alone cannot fill the GPU (decode shapes)."""
    if path == "dequant":
        return 1
    if device.type != "cuda":
        return 2 if k >= 4 * group and k >= 128 else 1  # interpreter: exercise split-K on larger K
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    tiles = max(1, n_pad // 64) * max(1, -(-m // _block_m(path, m)))
    kblocks = max(1, k // max(32, min(group, 128)))
    split = 1
    # up to ~2 waves of programs; keep >= 2 K blocks per split; partials <= ~1/4 of weight bytes
    while split * 2 <= 16 and tiles * split * 2 <= 2 * sms and kblocks // (split * 2) >= 2 and 32 * m * split * 2 <= k:
        split *= 2
    return split


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


def sinq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_zeros: torch.Tensor,
    col_scales: torch.Tensor,
    blk: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    group_size: int,
    out_features: int,
    path: str | None = None,
    split_k: int | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``y = sinq_linear(x[M, K])`` -> ``[M, out_features]`` in ``x.dtype``.

    ``path``/``split_k``/``config`` override the automatic choices (tests, benchmarks)."""
    if x.dim() != 2:
        raise ValueError("x must be 2-D [M, K]")
    m, k = x.shape
    n = out_features
    n_pad = qweight.shape[1]
    rows = qweight.shape[0]
    per = k // rows if rows and k % rows == 0 else 0
    if per not in (4, 8):
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match in_features {k}")
    bits = 32 // per
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
    if split_k is None:
        split_k = choose_split_k(path, m, n_pad, k, group_size, x.device)
    has_bias = bias is not None
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    bias_arg = bias if has_bias else out
    common = dict(GROUP=group_size, BITS=bits, ALIGN=align, SPLIT=split_k > 1, HAS_BIAS=has_bias,
                  INTERPRET=interpreting())
    args = (x, qweight, scales_zeros, col_scales, blk, bias_arg, target, m, n, k, n_pad, x.stride(0), n, m_bucket(m),
            split_k)
    if path != "gemv":
        common.update(FACTORED=path == "factored", GROUP_M=8)

    def grid(meta):
        tiles_n = n_pad // meta["BLOCK_N"]
        tiles_m = triton.cdiv(m, meta["BLOCK_M"])
        if path == "gemv":
            return (tiles_n, split_k, tiles_m)
        return (tiles_n * tiles_m, split_k)

    if config is None and autotune_enabled():
        _autotuned(path, m_bucket(m), group_size, align, k)[grid](*args, **common)
    else:
        cfg = config or default_config(path, m, group_size, align, k)
        kernel = _sinq_gemv_kernel if path == "gemv" else _sinq_gemm_kernel
        kernel[grid](*args, **common, **cfg.kwargs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if split_k > 1:
        block = 256 if interpreting() else 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias_arg, out, m, n, SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block, INTERPRET=interpreting()
        )
    return out


# --------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed: CI compile checks, register/smem inspection)
# --------------------------------------------------------------------------------------

_TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_for_target(path: str, act_dtype: torch.dtype, nbits: int, group: int, config: Config,
                       align: int = 128, split_k: int = 1, has_bias: bool = True, arch: int = 90):
    """Compile one kernel variant for ``sm_<arch>`` with Triton's bundled ptxas, without a
    GPU; returns the ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    act = _TL_TYPES[act_dtype]
    out = act if split_k == 1 else "fp32"
    sig = {"x_ptr": f"*{act}", "qw_ptr": "*i32", "sz_ptr": "*fp16", "t_ptr": "*fp32", "blk_ptr": "*i32",
           "bias_ptr": f"*{act}", "out_ptr": f"*{out}", "M": "i32", "N": "i32", "K": "i32", "N_pad": "i32",
           "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32", "SPLIT_K": "i32"}
    consts = dict(GROUP=group, BITS=4 if nbits <= 4 else 8, ALIGN=align, SPLIT=split_k > 1, HAS_BIAS=has_bias,
                  INTERPRET=False, **config.kwargs())
    if path != "gemv":
        consts.update(FACTORED=path == "factored", GROUP_M=8)
    sig.update({k: "constexpr" for k in consts})
    kernel = _sinq_gemv_kernel if path == "gemv" else _sinq_gemm_kernel
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                   "enable_fp_fusion": True})


# --------------------------------------------------------------------------------------
# interpreter instance (CPU tensors: tests, --interpret-smoke)
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
