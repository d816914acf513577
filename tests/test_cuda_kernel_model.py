"""A CPU model of the index math of csrc/cuda/sinq_gemv.cu, checked against the float32
reference; no GPU needed.

The decode kernel cannot run without a GPU, but its riskiest part is pure index math:
which word, nibble pair, activation and column scale each lane loads, how those fill
``mma.m16n8k16`` fragments (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating
point type"), the permutation of the reduction index inside a K chunk, the
group-factored float zeros, split-K and the output columns of padded merged shards.
This file replays the kernel lane by lane with the same formulas (names follow the
.cu file) and a warp-level mma that gathers and scatters fragments by the PTX layout.
Keep it in step with the kernel when either changes. Tolerances as in
test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from sinq_vllm.kernels import gpu_layout
from kernel_reference import make_weights, reference

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
KWARPS, KTILES = 4, 2


# ---- PTX fragment layouts of mma.m16n8k16 (.f16/.bf16 inputs, .f32 accumulators) ------
def a_pos(lane, reg, half):  # A is 16 x 16 (row, k)
    g, t = lane >> 2, lane & 3
    return (g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1))


def b_pos(lane, reg, half):  # B is 16 x 8 (k, n)
    g, t = lane >> 2, lane & 3
    return (2 * t + half + 8 * reg, g)


def c_pos(lane, e):  # C is 16 x 8 (row, n)
    g, t = lane >> 2, lane & 3
    return (g + 8 * (e >> 1), 2 * t + (e & 1))


def warp_mma(d, a, b):
    """d[lane][4] += A @ B with A/B gathered from a[lane][4][2], b[lane][2][2]."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        for r in range(4):
            for h in range(2):
                A[a_pos(lane, r, h)] = a[lane][r][h]
        for r in range(2):
            for h in range(2):
                B[b_pos(lane, r, h)] = b[lane][r][h]
    C = A @ B
    for lane in range(32):
        for e in range(4):
            d[lane][e] += C[c_pos(lane, e)].item()


# ---- the kernel, lane by lane --------------------------------------------------------
def u32(v):
    return int(v) & 0xFFFFFFFF


def nibble_pair(w, p):
    """lop3(w >> 4p, 0x000f000f, magic) - magic: the codes in nibbles p and p + 4."""
    w = u32(w) >> (4 * p)
    return (w & 0xF, (w >> 16) & 0xF)


def byte_pair(w, b0, b1):
    w = u32(w)
    return ((w >> (8 * b0)) & 0xFF, (w >> (8 * b1)) & 0xFF)


def rnd(v, dtype):
    return torch.tensor(v, dtype=torch.float32).to(dtype).item()


def model_kernel(tensors, x, bits, group, n_out, split_k, k_per_split, dtype):
    qw = tensors["qweight"].flatten().tolist()
    sz = tensors["scales_zeros"].float().reshape(-1, 2).tolist()  # [G * N_pad] (s, z)
    cs = tensors["col_scales"].float()
    blk_t = tensors["blk"].tolist()
    m, k = x.shape
    n_pad = tensors["qweight"].shape[1]
    align = n_pad // len(blk_t)
    PACK = 32 // bits
    CK = 4 * PACK
    KPL = PACK
    MT = 2 if m > 8 else 1
    out = torch.zeros(m, n_out, dtype=torch.float64)
    partials = torch.zeros(split_k, m, n_out, dtype=torch.float64)
    xf = x.float()
    grid_x = -(-n_pad // (KWARPS * 16 * KTILES))
    for bx_ in range(grid_x):
        for split in range(split_k):
            for warp in range(KWARPS):
                col0 = (bx_ * KWARPS + warp) * (16 * KTILES)
                if col0 >= n_pad:
                    continue
                kbeg = split * k_per_split
                kend = min(k, kbeg + k_per_split)
                nch = (kend - kbeg) // CK if kend > kbeg else 0
                cpg = group // CK
                blk = col0 // align
                shard, out0, valid = blk_t[blk]
                local0 = col0 - blk * align
                acc = [[[[0.0] * 4 for _ in range(MT)] for _ in range(KTILES)] for _ in range(32)]
                accg = [[[[0.0] * 4 for _ in range(MT)] for _ in range(KTILES)] for _ in range(32)]
                sxg = [[[0.0] * 4 for _ in range(MT)] for _ in range(32)]
                group_index = kbeg // group
                in_group = 0

                def lane_sz(lane, gi):
                    g = lane >> 2
                    return [[sz[gi * n_pad + col0 + g + 16 * t + 8 * h] for h in range(2)] for t in range(KTILES)]

                szr = [lane_sz(lane, group_index) for lane in range(32)]
                for c in range(nch):
                    # per-lane loads and the token operand
                    words, bxs = [], []
                    for lane in range(32):
                        g, j = lane >> 2, lane & 3
                        wrow = kbeg // PACK + j + 4 * c
                        words.append([[qw[wrow * n_pad + col0 + g + 16 * t + 8 * h] for h in range(2)]
                                      for t in range(KTILES)])
                        kk = kbeg + KPL * j + c * CK
                        tv = cs[shard, kk : kk + KPL].tolist()
                        per_mt = []
                        for mt in range(MT):
                            tok = g + 8 * mt
                            xv = xf[tok, kk : kk + KPL].tolist() if tok < m else [0.0] * KPL
                            per_mt.append([(rnd(xv[2 * q] * tv[2 * q], dtype), rnd(xv[2 * q + 1] * tv[2 * q + 1], dtype))
                                           for q in range(KPL // 2)])
                        bxs.append(per_mt)
                    steps = 2 if bits == 4 else 1
                    for s in range(steps):
                        for mt in range(MT):
                            d = [sxg[lane][mt] for lane in range(32)]
                            warp_mma(d, [[(1.0, 1.0)] * 4 for _ in range(32)],
                                     [[bxs[lane][mt][2 * s], bxs[lane][mt][2 * s + 1]] for lane in range(32)])
                        for t in range(KTILES):
                            a = []
                            for lane in range(32):
                                w0, w1 = words[lane][t]
                                if bits == 4:
                                    a.append([nibble_pair(w0, 2 * s), nibble_pair(w1, 2 * s),
                                              nibble_pair(w0, 2 * s + 1), nibble_pair(w1, 2 * s + 1)])
                                else:
                                    a.append([byte_pair(w0, 0, 1), byte_pair(w1, 0, 1),
                                              byte_pair(w0, 2, 3), byte_pair(w1, 2, 3)])
                            for mt in range(MT):
                                d = [accg[lane][t][mt] for lane in range(32)]
                                warp_mma(d, a, [[bxs[lane][mt][2 * s], bxs[lane][mt][2 * s + 1]] for lane in range(32)])
                    in_group += 1
                    if in_group == cpg or c + 1 == nch:
                        for lane in range(32):
                            for t in range(KTILES):
                                for h in range(2):
                                    sc, ze = szr[lane][t][h]
                                    for mt in range(MT):
                                        for e in range(2):
                                            acc[lane][t][mt][2 * h + e] += sc * (
                                                accg[lane][t][mt][2 * h + e] - ze * sxg[lane][mt][e])
                                            accg[lane][t][mt][2 * h + e] = 0.0
                            for mt in range(MT):
                                sxg[lane][mt] = [0.0] * 4
                        in_group = 0
                        group_index += 1
                        if c + 1 < nch:
                            szr = [lane_sz(lane, group_index) for lane in range(32)]
                # stores
                for lane in range(32):
                    g, j = lane >> 2, lane & 3
                    for t in range(KTILES):
                        for h in range(2):
                            local = local0 + 16 * t + g + 8 * h
                            if local >= valid:
                                continue
                            col = out0 + local
                            for mt in range(MT):
                                for e in range(2):
                                    tok = 8 * mt + 2 * j + e
                                    if tok < m:
                                        partials[split, tok, col] = acc[lane][t][mt][2 * h + e]
    out = partials.sum(0)
    return out


def plan_split_k(k, group, requested):
    """Mirror of sinq_cuda::plan_split_k with a forced split."""
    groups = k // group
    split = max(1, min(requested, groups))
    gps = -(-groups // split)
    return -(-groups // gps), gps * group


@pytest.mark.parametrize(
    "nbits,group,m,dtype,split",
    [
        (4, 32, 3, torch.bfloat16, 1),
        (4, 64, 12, torch.float16, 2),  # two token tiles, split-K
        (8, 32, 5, torch.bfloat16, 2),
        (8, 16, 9, torch.float16, 1),
        (3, 32, 1, torch.bfloat16, 1),  # 3-bit codes in the 4-bit container
    ],
)
def test_kernel_model_matches_reference(nbits, group, m, dtype, split):
    # two shards, the first padded within its 128-column block, the second a whole block
    w = make_weights((100, 128), 128, nbits, group, seed=nbits * 10 + group)
    tensors = gpu_layout.repack(w)  # align 128 = one CTA
    x = torch.randn(m, 128).to(dtype)
    split_k, k_per_split = plan_split_k(128, group, split)
    y = model_kernel(tensors, x, gpu_layout.container_bits(nbits), group, w.out_features, split_k, k_per_split, dtype)
    ref = reference(w, x)
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], err
