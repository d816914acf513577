"""Fused MoE for SINQ experts in Triton: a grouped GEMM over expert-sorted token blocks
with the SINQ dequant fused (installed as ``sinq_vllm.triton_kernels.sinq_moe``).

Per projection and expert ``e`` (docs/design.md §1, one column-scale vector per merged shard):

    y[m, s*N_s + n] = sum_k (x[m, k] * t[e, s, k]) * (V(Q[e, s*N_s + n, k]) - z[e, ., k // g]) * s[e, ., k // g]

with ``V(q) = q``, or the NF4/NF3 table (an fp32 [16] tensor of the fp16 values).

Resident layout (the torch backend's, stacked over local experts):
* ``qweight`` int32 ``[E, N, ceil(K / P)]``: ``P = 32 // nbits`` codes of one output row per
  word along K, least significant field first (any nbits in 2..8);
* ``scales``, ``zeros`` fp16 ``[E, N, K // g]``: per (row, group) scale and float zero (code units);
* ``col_scales`` fp16 ``[E, S, K]``: gate and up (S = 2) or down (S = 1) column scales.

Tokens are first grouped by expert into blocks of ``BLOCK_M`` rows (:func:`align_block_size`,
pure torch, no host synchronisation, so CUDA graphs can capture it). A program owns one
token block of one expert and one ``BLOCK_N`` tile of one merged shard, so the shard's
column scale multiplies the activation tile once per K step (activation side, as the
reference does) and the codes are dequantized tile by tile in registers:
``w = (V(q) - z) * s`` in fp32, cast to the activation dtype, ``tl.dot`` accumulating in fp32.
Each packed word is loaded once per step (a ``[BLOCK_W, BLOCK_N]`` word tile expanded to its
code fields), and the activations are gathered in the matching order of input columns.

The MoE forward is the usual two GEMMs: ``x -> [T*topk, 2I]`` (gate | up), the gated
activation in torch, ``[T*topk, I] -> [T*topk, H]`` with the router weight fused, then a
sum over the top-k slots.

Interpreter notes (``TRITON_INTERPRET=1``, the CPU tests): ``tl.dot`` on bf16 operands
returns garbage and casts to bf16 truncate instead of rounding to nearest, so when the
kernel object is the interpreter's (``UPCAST_DOT``) the dot operands stay fp32, rounded to
the activation dtype's values (``BF16_GRID``: by integer rounding); and the kernel calls
no ``@triton.jit`` library helpers (``tl.zeros``, ``tl.cdiv``), which the interpreter cannot
run when Triton was imported before ``TRITON_INTERPRET`` was set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["align_block_size", "sinq_moe_gemm", "sinq_fused_moe", "pick_config"]

NUM_WARPS, NUM_STAGES = 4, 3  # the launch's (Triton's defaults, explicit so the offline check compiles the same)


@triton.jit
def _bf16_grid(x):
    """Round fp32 to the nearest bf16 value, kept in fp32 (interpreter only: its casts to
    bf16 truncate instead of rounding to nearest even)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sinq_moe_gemm_kernel(
    a_ptr, qw_ptr, s_ptr, z_ptr, t_ptr, lut_ptr, out_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    N_SHARD, K, num_valid,
    stride_am, stride_ak,
    stride_qe, stride_qn,
    stride_se, stride_sn,
    stride_ze, stride_zn,
    stride_te, stride_ts,
    stride_om, stride_on,
    NUM_SHARDS: tl.constexpr, TOP_K: tl.constexpr, NBITS: tl.constexpr, SLOTS: tl.constexpr, GROUP: tl.constexpr,
    CODEBOOK: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, UPCAST_DOT: tl.constexpr, BF16_GRID: tl.constexpr,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // NBITS
    MASK: tl.constexpr = (1 << NBITS) - 1
    BLOCK_K: tl.constexpr = SLOTS * BLOCK_W  # the dot's K: SLOTS code slots of BLOCK_W words
    K_STEP: tl.constexpr = PER_WORD * BLOCK_W  # input columns a step advances

    pid = tl.program_id(0)
    tiles_per_shard = (N_SHARD + BLOCK_N - 1) // BLOCK_N
    num_pid_n = NUM_SHARDS * tiles_per_shard
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    shard = pid_n // tiles_per_shard
    tile = pid_n % tiles_per_shard

    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return  # a block of tokens routed to another rank's experts: rows stay zero

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    token_mask = token < num_valid
    a_rows = token // TOP_K

    offs_nl = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_nl < N_SHARD
    offs_n = (shard * N_SHARD + offs_nl).to(tl.int64)  # row of the expert's merged weight

    a_base = a_ptr + a_rows[:, None] * stride_am
    q_base = qw_ptr + expert * stride_qe + offs_n[None, :] * stride_qn
    s_base = s_ptr + expert * stride_se + offs_n[None, :] * stride_sn
    z_base = z_ptr + expert * stride_ze + offs_n[None, :] * stride_zn
    t_base = t_ptr + expert * stride_te + shard * stride_ts

    # Row r of a step's code tile holds slot i = r // BLOCK_W of word w = r % BLOCK_W, i.e.
    # input column (w0 + w) * PER_WORD + i: every word is loaded once and expanded to its
    # SLOTS fields (SLOTS = PER_WORD rounded up to a power of 2; slots >= PER_WORD get
    # zero activations). The activations are gathered in the same order.
    r = tl.arange(0, BLOCK_K)
    slot = r // BLOCK_W
    shift = tl.minimum(tl.arange(0, SLOTS), PER_WORD - 1) * NBITS  # < 32: no oversized shifts
    words_per_row = (K + PER_WORD - 1) // PER_WORD
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # tl.zeros is a jit function: see the module note
    for w0 in range(0, words_per_row, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        words = tl.load(q_base + offs_w[:, None], mask=(offs_w < words_per_row)[:, None] & n_mask[None, :], other=0)
        q = tl.reshape((words[None, :, :] >> shift[:, None, None]) & MASK, (BLOCK_K, BLOCK_N))
        offs_k = (w0 + r % BLOCK_W) * PER_WORD + slot
        k_mask = (slot < PER_WORD) & (offs_k < K)
        a = tl.load(a_base + offs_k[None, :] * stride_ak, mask=token_mask[:, None] & k_mask[None, :], other=0.0)
        t = tl.load(t_base + offs_k, mask=k_mask, other=0.0)
        a = a.to(tl.float32) * t.to(tl.float32)[None, :]

        if CODEBOOK:
            v = tl.load(lut_ptr + q)
        else:
            v = q.to(tl.float32)
        if GROUP % K_STEP == 0:
            # the whole step lies in one group: one scale and zero per output row
            g = (w0 * PER_WORD) // GROUP
            s = tl.load(s_ptr + expert * stride_se + offs_n * stride_sn + g, mask=n_mask, other=0.0)
            z = tl.load(z_ptr + expert * stride_ze + offs_n * stride_zn + g, mask=n_mask, other=0.0)
            w = (v - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
        else:
            grp = (tl.minimum(offs_k, K - 1) // GROUP)[:, None]
            kn_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_base + grp, mask=kn_mask, other=0.0)
            z = tl.load(z_base + grp, mask=kn_mask, other=0.0)
            w = (v - z.to(tl.float32)) * s.to(tl.float32)

        if UPCAST_DOT:
            # interpreter: tl.dot on bf16 operands returns garbage there, so the operands stay
            # fp32, rounded to the activation dtype's values as the compiled kernel rounds them
            if BF16_GRID:
                a = _bf16_grid(a)
                w = _bf16_grid(w)
            else:
                a = a.to(a_ptr.dtype.element_ty).to(tl.float32)
                w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.dot(a, w, input_precision="ieee")
        elif FP32_IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a.to(a_ptr.dtype.element_ty), w.to(a_ptr.dtype.element_ty))

    if MUL_ROUTED_WEIGHT:
        rw = tl.load(topk_w_ptr + token, mask=token_mask, other=0.0)
        acc = acc * rw.to(tl.float32)[:, None]
    if BF16_GRID:
        acc = _bf16_grid(acc)  # the store's cast is then exact
    out = out_ptr + token[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & n_mask[None, :])


def align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Group the ``T * topk`` (token, slot) pairs by expert into blocks of ``block_m``.

    ``topk_ids`` holds local expert ids (``-1``: an expert of another rank, left out).
    Returns ``sorted_ids`` int32 ``[max_padded]`` (flat pair index, ``T * topk`` as padding),
    ``expert_ids`` int32 ``[max_padded // block_m]`` (``-1`` past the used blocks) and
    ``num_post`` int32 ``[1]`` (used length). All shapes depend only on ``T * topk``, E
    and ``block_m`` and nothing is read back to the host.
    """
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    bucket = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # E: the "elsewhere" bucket
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    block_end = torch.cumsum(padded, 0)
    block_start = block_end - padded
    max_padded = numel + num_experts * (block_m - 1)
    max_padded = (max_padded + block_m - 1) // block_m * block_m

    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    first = torch.cumsum(counts, 0) - counts  # first position of each bucket in `order`
    rank = torch.arange(numel, device=dev) - first[sorted_bucket]
    dest = torch.where(sorted_bucket < num_experts, block_start[sorted_bucket] + rank,
                       torch.full_like(rank, max_padded))
    sorted_ids = torch.full((max_padded + 1,), numel, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    sorted_ids = sorted_ids[:max_padded]

    block_pos = torch.arange(max_padded // block_m, device=dev, dtype=torch.int64) * block_m
    expert_ids = torch.searchsorted(block_end[:num_experts], block_pos, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, torch.full_like(expert_ids, -1))
    num_post = block_end[num_experts - 1 : num_experts].to(torch.int32)
    return sorted_ids, expert_ids.to(torch.int32), num_post


def code_slots(nbits: int) -> int:
    """Fields expanded per packed word: ``32 // nbits`` rounded up to a power of 2."""
    return triton.next_power_of_2(32 // nbits)


def pick_config(num_pairs: int, n_shard: int, k: int, group: int) -> dict:
    """Block sizes by the number of routed (token, slot) pairs; BLOCK_K is the dot's K
    (code slots per step). Larger tiles spill or leave one CTA per SM with Triton 3.6 or 3.9
    (tests/test_gpu_resources.py)."""
    if num_pairs <= 64:
        bm, bn, bk = 16, 32, 32
    else:
        bm, bn, bk = 32, 32, 32
    bn = min(bn, max(16, triton.next_power_of_2(n_shard)))
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}


_LUTS: dict = {}


def codebook_table(name: str | None, device) -> torch.Tensor | None:
    """fp32 [16] table of an NF4/NF3 codebook on ``device`` (created once per device, outside any
    CUDA-graph capture: vLLM's warm-up runs before it captures)."""
    if name is None:
        return None
    key = (name, str(device))
    if key not in _LUTS:
        from sinq_vllm.format.codebooks import codebook_values  # noqa: PLC0415

        values = codebook_values(name).float()
        table = torch.zeros(16, dtype=torch.float32)
        table[: values.numel()] = values
        _LUTS[key] = table.to(device)
    return _LUTS[key]


def sinq_moe_gemm(a, qweight, scales, zeros, col_scales, out, topk_weights, sorted_ids, expert_ids, num_post, *,
                  nbits: int, group: int, top_k: int, mul_routed_weight: bool, block_m: int,
                  block_n: int | None = None, block_k: int | None = None, codebook: torch.Tensor | None = None):
    """``out[pair, :] = (a[pair // top_k] * t) @ W[expert(pair)]^T`` for every routed pair.

    ``a`` ``[rows, K]`` (fp16/bf16/fp32), ``out`` ``[T * topk, S * N_s]`` (pre-zeroed; pairs
    not routed here keep their value); ``codebook``: fp32 [16] code values (NF4/NF3) or None.
    ``block_k`` is the dot's K: ``block_k / code_slots(nbits)`` packed words per step.
    """
    for name, tensor in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("col_scales", col_scales)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"sinq_moe_gemm: {name} must be contiguous along its last dimension")
    if out.dtype != a.dtype:
        raise ValueError(f"sinq_moe_gemm: out dtype {out.dtype} differs from the activations' {a.dtype}")
    num_shards = col_scales.shape[1]
    n_total, k = qweight.shape[1], a.shape[1]
    n_shard = n_total // num_shards
    cfg = pick_config(out.shape[0], n_shard, k, group)
    block_n = block_n or cfg["BLOCK_N"]
    slots = code_slots(nbits)
    words = block_w(nbits, block_k or cfg["BLOCK_K"])  # tl.dot needs K >= 16
    grid = (expert_ids.shape[0] * num_shards * triton.cdiv(n_shard, block_n),)
    interpreted = type(_sinq_moe_gemm_kernel).__name__ == "InterpretedFunction"
    _sinq_moe_gemm_kernel[grid](
        a, qweight, scales, zeros, col_scales, codebook if codebook is not None else col_scales, out, topk_weights,
        sorted_ids, expert_ids, num_post,
        n_shard, k, out.shape[0],
        a.stride(0), a.stride(1),
        qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1),
        col_scales.stride(0), col_scales.stride(1),
        out.stride(0), out.stride(1),
        NUM_SHARDS=num_shards, TOP_K=top_k, NBITS=nbits, SLOTS=slots, GROUP=group, CODEBOOK=codebook is not None,
        MUL_ROUTED_WEIGHT=mul_routed_weight, UPCAST_DOT=interpreted,
        BF16_GRID=interpreted and a.dtype == torch.bfloat16,
        FP32_IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=words, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def block_w(nbits: int, block_k: int) -> int:
    """Packed words per step for a dot K of ``block_k`` (at least 16)."""
    slots = code_slots(nbits)
    return max(1, max(block_k, 16) // slots)


def selectable_variants() -> list[dict]:
    """Every kernel variant pick_config can launch, by activation dtype, container (4-bit
    power-of-2 fields, 3-bit padded fields, 8-bit bytes) and codebook; group 64 (the per-step
    scale path for 4/8-bit, the per-element gather for 3-bit). For the offline resource check."""
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for nbits in (4, 3, 8):
            for codebook in ((False, True) if nbits <= 4 else (False,)):
                for pairs in (1, 256):  # pick_config's two buckets
                    cfg = pick_config(pairs, 4096, 4096, 64)
                    out.append(dict(kernel="moe", dtype=dtype, nbits=nbits, codebook=codebook, group=64,
                                    block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"], block_k=cfg["BLOCK_K"]))
    return out


def compile_for_target(dtype: torch.dtype, nbits: int, group: int, codebook: bool, block_m: int, block_n: int,
                       block_k: int, arch: int = 90, **_):
    """Compile one variant of the MoE kernel for ``sm_<arch>`` without a GPU (sinq_gemm.aot_compile)."""
    from sinq_vllm.triton_kernels.sinq_gemm import TL_TYPES, aot_compile  # noqa: PLC0415

    act = TL_TYPES[dtype]
    sig = {"a_ptr": f"*{act}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "t_ptr": "*fp16",
           "lut_ptr": "*fp32", "out_ptr": f"*{act}", "topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32",
           "expert_ids_ptr": "*i32", "num_post_ptr": "*i32", "N_SHARD": "i32", "K": "i32", "num_valid": "i32"}
    sig.update({name: "i32" for name in ("stride_am", "stride_ak", "stride_qe", "stride_qn", "stride_se", "stride_sn",
                                         "stride_ze", "stride_zn", "stride_te", "stride_ts", "stride_om", "stride_on")})
    consts = dict(NUM_SHARDS=2, TOP_K=1, NBITS=nbits, SLOTS=code_slots(nbits), GROUP=group, CODEBOOK=codebook,
                  MUL_ROUTED_WEIGHT=True, UPCAST_DOT=False, BF16_GRID=False, FP32_IEEE=dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w(nbits, block_k))
    return aot_compile(_sinq_moe_gemm_kernel, sig, consts, NUM_WARPS, NUM_STAGES, arch)


_ACT = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
}


def sinq_fused_moe(x, topk_weights, topk_ids, w13: dict, w2: dict, *, nbits13: int, nbits2: int, group13: int,
                   group2: int, activation: str = "silu", apply_router_weight_on_input: bool = False,
                   expert_map=None, block_m: int | None = None, codebook13: str | None = None,
                   codebook2: str | None = None):
    """The routed-experts output ``[T, H]`` of a SINQ MoE layer.

    ``w13`` / ``w2``: resident tensors (``qweight``, ``scales``, ``zeros``, ``col_scales``),
    stacked over local experts; ``topk_ids`` global expert ids, mapped with ``expert_map``
    (global -> local, ``-1`` elsewhere) when given; ``codebook13`` / ``codebook2``: "nf4",
    "nf3" or None (uniform codes).
    """
    t, _ = x.shape
    top_k = topk_ids.shape[1]
    ids = topk_ids if expert_map is None else expert_map[topk_ids.long()]
    num_experts = w13["qweight"].shape[0]
    inter = w13["qweight"].shape[1] // 2
    hidden = w2["qweight"].shape[1]
    pairs = t * top_k
    bm = block_m or pick_config(pairs, inter, x.shape[1], group13)["BLOCK_M"]
    sorted_ids, expert_ids, num_post = align_block_size(ids, bm, num_experts)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()

    h = torch.zeros((pairs, 2 * inter), dtype=x.dtype, device=x.device)
    sinq_moe_gemm(x, w13["qweight"], w13["scales"], w13["zeros"], w13["col_scales"], h, weights,
                  sorted_ids, expert_ids, num_post, nbits=nbits13, group=group13, top_k=top_k,
                  mul_routed_weight=apply_router_weight_on_input, block_m=bm,
                  codebook=codebook_table(codebook13, x.device))
    hf = h.float()
    act = (_ACT[activation](hf[:, :inter]) * hf[:, inter:]).to(x.dtype)
    y = torch.zeros((pairs, hidden), dtype=x.dtype, device=x.device)
    sinq_moe_gemm(act, w2["qweight"], w2["scales"], w2["zeros"], w2["col_scales"], y, weights,
                  sorted_ids, expert_ids, num_post, nbits=nbits2, group=group2, top_k=1,
                  mul_routed_weight=not apply_router_weight_on_input, block_m=bm,
                  codebook=codebook_table(codebook2, x.device))
    return y.view(t, top_k, hidden).float().sum(1).to(x.dtype)
