"""A CPU model of the index math of csrc/cuda/sinq_gemv.cu and sinq_dequant.cu, checked
against the float32 reference; no GPU needed.

The kernels cannot run without a GPU, but their riskiest part is pure index math: which
16-byte lane block of the lane-ordered layout each lane loads, how its four words, the
activations, the fp16 column scales and the (scale, zero) pairs fill ``mma.m16n8k16``
fragments (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"), the
permutation of the reduction index inside a K chunk, the NF4/NF3 table lookup, the
group-factored float zeros, token blocks (M <= 64), the one-launch split-K (per-thread
workspace slots, arrival counters, the last CTA's fixed-order sum and counter reset) and
the output columns of padded merged shards. This file replays the kernels CTA by CTA and
lane by lane with the same formulas (names follow the .cu files) and a warp-level mma that
gathers and scatters fragments by the PTX layout. Keep it in step with the kernels when
either changes. Tolerances as in test_triton_kernels.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernel_reference import make_weights, reference, rel_err
from sinq_vllm.kernels import gpu_layout

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
KWARPS, KTILES, KTHREADS, TOKEN_BLOCK = 4, 2, 128, 16


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


# ---- the kernels' helpers ------------------------------------------------------------
def u32(v):
    return int(v) & 0xFFFFFFFF


def nibble_pair(w, p):
    """lop3(w >> 4p, 0x000f000f, magic) - magic: the codes in nibbles p and p + 4."""
    w = u32(w) >> (4 * p)
    return (w & 0xF, (w >> 16) & 0xF)


def byte_pair(w, b0, b1):
    w = u32(w)
    return ((w >> (8 * b0)) & 0xFF, (w >> (8 * b1)) & 0xFF)


def nibble_code(w, i):
    return (u32(w) >> (4 * ((i >> 1) + 4 * (i & 1)))) & 0xF


def rnd(v, dtype):
    return torch.tensor(v, dtype=torch.float32).to(dtype).item()


def lane_words(c, wt, n_pad, lane):  # 16-byte index (detail::lane_words)
    return (c * (n_pad >> 5) + wt) * 32 + lane


def lane_scales(group, wt, n_pad, g):  # 16-byte index (detail::lane_scales)
    return group * (n_pad >> 2) + wt * 8 + g


class Memory:
    """The layout's tensors as the kernels see them: 16-byte blocks of words and pairs."""

    def __init__(self, tensors):
        self.words = tensors["qweight"].flatten().tolist()
        self.pairs = tensors["scales_zeros"].float().reshape(-1, 2).tolist()
        self.t = tensors["col_scales"].float()  # fp16 values
        self.blk = tensors["blk"].tolist()
        self.n_pad = tensors["qweight"].shape[1]
        self.align = self.n_pad // len(self.blk)

    def word4(self, index):
        return self.words[4 * index : 4 * index + 4]

    def pair4(self, index):
        return self.pairs[4 * index : 4 * index + 4]


# ---- sinq_gemv.cu --------------------------------------------------------------------
def model_warp(mem, x, bits, group, lut, dtype, m0, mt_count, warp_col0, kbeg, kend):
    """acc[lane][t][mt][4] of one warp (the kernel's main loop)."""
    PACK = 32 // bits
    CK, KPL = 4 * PACK, PACK
    m, _ = x.shape
    xf = x.float()
    n_pad = mem.n_pad
    wt = warp_col0 >> 5
    shard = mem.blk[warp_col0 // mem.align][0]
    nch = (kend - kbeg) // CK if kend > kbeg else 0
    cpg = group // CK
    acc = [[[[0.0] * 4 for _ in range(mt_count)] for _ in range(KTILES)] for _ in range(32)]
    accg = [[[[0.0] * 4 for _ in range(mt_count)] for _ in range(KTILES)] for _ in range(32)]
    sxg = [[[0.0] * 4 for _ in range(mt_count)] for _ in range(32)]
    group_index = kbeg // group
    sz = [mem.pair4(lane_scales(group_index, wt, n_pad, lane >> 2)) for lane in range(32)]
    in_group = 0
    lut_t = [rnd(v, dtype) for v in lut] if lut is not None else None
    for c in range(nch):
        words, bxs = [], []
        for lane in range(32):
            g, j = lane >> 2, lane & 3
            words.append(mem.word4(lane_words(kbeg // CK + c, wt, n_pad, lane)))
            kk = kbeg + KPL * j + c * CK
            has_token = m0 + g < m
            tv = mem.t[shard, kk : kk + KPL].tolist() if has_token else [0.0] * KPL
            per_mt = []
            for mt in range(mt_count):
                tok = m0 + g + 8 * mt
                xv = xf[tok, kk : kk + KPL].tolist() if tok < m else [0.0] * KPL
                per_mt.append([(rnd(xv[2 * q] * tv[2 * q], dtype), rnd(xv[2 * q + 1] * tv[2 * q + 1], dtype))
                               for q in range(KPL // 2)])
            bxs.append(per_mt)
        steps = 2 if bits == 4 else 1
        for s in range(steps):
            for mt in range(mt_count):
                d = [sxg[lane][mt] for lane in range(32)]
                warp_mma(d, [[(1.0, 1.0)] * 4 for _ in range(32)],
                         [[bxs[lane][mt][2 * s], bxs[lane][mt][2 * s + 1]] for lane in range(32)])
            for t in range(KTILES):
                a = []
                for lane in range(32):
                    w0, w1 = words[lane][2 * t], words[lane][2 * t + 1]  # slots 2t (rows g), 2t+1 (rows g+8)
                    if bits == 8:
                        frag = [byte_pair(w0, 0, 1), byte_pair(w1, 0, 1), byte_pair(w0, 2, 3), byte_pair(w1, 2, 3)]
                    else:
                        frag = [nibble_pair(w0, 2 * s), nibble_pair(w1, 2 * s),
                                nibble_pair(w0, 2 * s + 1), nibble_pair(w1, 2 * s + 1)]
                        if lut_t is not None:
                            frag = [(lut_t[lo], lut_t[hi]) for lo, hi in frag]
                    a.append(frag)
                for mt in range(mt_count):
                    d = [accg[lane][t][mt] for lane in range(32)]
                    warp_mma(d, a, [[bxs[lane][mt][2 * s], bxs[lane][mt][2 * s + 1]] for lane in range(32)])
        in_group += 1
        if in_group == cpg or c + 1 == nch:
            for lane in range(32):
                for t in range(KTILES):
                    for h in range(2):
                        sc, ze = sz[lane][2 * t + h]
                        for mt in range(mt_count):
                            for e in range(2):
                                acc[lane][t][mt][2 * h + e] += sc * (
                                    accg[lane][t][mt][2 * h + e] - ze * sxg[lane][mt][e])
                                accg[lane][t][mt][2 * h + e] = 0.0
                for mt in range(mt_count):
                    sxg[lane][mt] = [0.0] * 4
            in_group = 0
            group_index += 1
            if c + 1 < nch:
                sz = [mem.pair4(lane_scales(group_index, wt, n_pad, lane >> 2)) for lane in range(32)]
    return acc


def model_gemv(tensors, x, bits, group, n_out, split_k, k_per_split, dtype, lut=None, bias=None, seed=0):
    """The decode kernel's launch: CTAs of 4 warps, token blocks, one-launch split-K. The
    splits of a tile arrive in a shuffled order (any CTA may be last)."""
    mem = Memory(tensors)
    m, k = x.shape
    mt_count = 2 if m > 8 else 1
    blocks = -(-m // TOKEN_BLOCK) if m > 8 else 1
    vals = KTILES * mt_count * 4
    n_ctas = mem.n_pad // (KWARPS * 32)
    out = torch.full((m, n_out), float("nan"), dtype=torch.float64)
    workspace = {}
    counters = [0] * (blocks * n_ctas)
    order = [(bx, by, sp) for by in range(n_ctas) for bx in range(blocks) for sp in range(split_k)]
    random.Random(seed).shuffle(order)
    for bx, by, split in order:
        m0 = bx * TOKEN_BLOCK
        kbeg = split * k_per_split
        kend = min(k, kbeg + k_per_split)
        cta = []  # (thread, value index, column, token, value)
        for warp in range(KWARPS):
            col0 = (by * KWARPS + warp) * 32
            blk = col0 // mem.align
            _, out0, valid = mem.blk[blk]
            local0 = col0 - blk * mem.align
            acc = model_warp(mem, x, bits, group, lut, dtype, m0, mt_count, col0, kbeg, kend)
            for lane in range(32):
                g, j = lane >> 2, lane & 3
                for t in range(KTILES):
                    for h in range(2):
                        local = local0 + 16 * t + 8 * h + g
                        for mt in range(mt_count):
                            for e in range(2):
                                tok = m0 + 8 * mt + 2 * j + e
                                if local < valid and tok < m:
                                    v_index = (t * mt_count + mt) * 4 + 2 * h + e
                                    cta.append((warp * 32 + lane, v_index, out0 + local, tok, acc[lane][t][mt][2 * h + e]))
        b = [0.0] * n_out if bias is None else bias.float().tolist()
        if split_k == 1:
            for _, _, col, tok, v in cta:
                out[tok, col] = rnd(v + b[col], dtype)
            continue
        tile = by * blocks + bx
        for tid, v_index, _, _, v in cta:
            workspace[((tile * split_k + split) * vals + v_index) * KTHREADS + tid] = v
        counters[tile] += 1
        if counters[tile] == split_k:  # the last CTA of the tile
            for tid, v_index, col, tok, _ in cta:
                total = 0.0
                for s in range(split_k):
                    total += workspace[((tile * split_k + s) * vals + v_index) * KTHREADS + tid]
                out[tok, col] = rnd(total + b[col], dtype)
            counters[tile] = 0
    assert counters == [0] * len(counters), "counters must be zero after the launch"
    return out


def plan_split_k(k, group, requested):
    """Mirror of sinq_cuda::plan_split_k with a forced split."""
    groups = k // group
    split = max(1, min(requested, groups))
    gps = -(-groups // split)
    return -(-groups // gps), gps * group


@pytest.mark.parametrize(
    "nbits,group,m,dtype,split,codebook",
    [
        (4, 32, 3, torch.bfloat16, 1, None),
        (4, 64, 12, torch.float16, 2, None),  # two token tiles, split-K
        (8, 32, 5, torch.bfloat16, 2, None),
        (8, 16, 9, torch.float16, 1, None),
        (3, 32, 1, torch.bfloat16, 1, None),  # 3-bit codes in the 4-bit container
        (4, 32, 37, torch.bfloat16, 3, None),  # three token blocks, the last one partial
        (4, 32, 6, torch.float16, 2, "nf4"),
        (3, 32, 17, torch.bfloat16, 1, "nf3"),
    ],
)
def test_gemv_model_matches_reference(nbits, group, m, dtype, split, codebook):
    # two shards, the first padded within its 128-column block, the second a whole block
    w = make_weights((100, 128), 128, nbits, group, seed=nbits * 10 + group + m, codebook=codebook)
    tensors = gpu_layout.repack(w)  # align 128 = one CTA
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 128, generator=gen).to(dtype)
    bias = torch.randn(w.out_features, generator=gen).to(dtype) if m % 2 else None
    split_k, k_per_split = plan_split_k(128, group, split)
    lut = tensors["codebook"].tolist() if codebook else None
    y = model_gemv(tensors, x, gpu_layout.container_bits(nbits), group, w.out_features, split_k, k_per_split, dtype,
                   lut=lut, bias=bias, seed=m)
    assert not torch.isnan(y).any(), "some outputs were never written"
    err = rel_err(y, reference(w, x, bias))
    assert err < TOL[dtype], err


# ---- sinq_dequant.cu -----------------------------------------------------------------
def model_dequant(tensors, bits, group, k, shard, col0, rows, dtype, lut=None):
    """W[r, k] of padded columns col0 + r, thread by thread as sinq_dequant_kernel writes it."""
    mem = Memory(tensors)
    PACK = 32 // bits
    CK = 4 * PACK
    warp_tiles = -(-rows // 32)
    out = torch.full((rows, k), float("nan"), dtype=torch.float64)
    for idx in range((k // CK) * warp_tiles * 32):
        lane, rest = idx & 31, idx >> 5
        wt = col0 // 32 + rest % warp_tiles
        c = rest // warp_tiles
        g, j = lane >> 2, lane & 3
        k0 = c * CK + PACK * j
        words = mem.word4(lane_words(c, wt, mem.n_pad, lane))
        pairs = mem.pair4(lane_scales((c * CK) // group, wt, mem.n_pad, g))
        t = mem.t[shard, k0 : k0 + PACK].tolist()
        for slot in range(4):
            r = wt * 32 + 8 * slot + g - col0
            if r >= rows:
                continue
            sc, ze = pairs[slot]
            for i in range(PACK):
                code = nibble_code(words[slot], i) if bits == 4 else (u32(words[slot]) >> (8 * i)) & 0xFF
                value = lut[code] if lut is not None else float(code)
                out[r, k0 + i] = rnd((value - ze) * sc * t[i], dtype)
    return out


@pytest.mark.parametrize("nbits,group,dtype,codebook", [(4, 32, torch.bfloat16, None), (8, 16, torch.float16, None),
                                                        (4, 64, torch.float16, "nf4")])
def test_dequant_model_matches_reference(nbits, group, dtype, codebook):
    w = make_weights((70, 45), 128, nbits, group, seed=nbits + group, codebook=codebook)
    tensors = gpu_layout.repack(w)
    dense = reference(w, torch.eye(128)).T  # [N, K]: (V(Q) - z) * s * t per shard
    lut = tensors["codebook"].tolist() if codebook else None
    starts = gpu_layout.padded_shard_starts(w.shard_offsets, gpu_layout.DEFAULT_ALIGN)
    for s, (a, b) in enumerate(zip(w.shard_offsets[:-1], w.shard_offsets[1:])):
        y = model_dequant(tensors, gpu_layout.container_bits(nbits), group, 128, s, starts[s], b - a, dtype, lut)
        assert not torch.isnan(y).any()
        assert rel_err(y, dense[a:b]) < TOL[dtype]
