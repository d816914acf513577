"""The kernel tests' oracle: random SINQ layers and an independent float32 reference.

The reference is written here from the op's math (docs/design.md §1), not from any
backend or from ``SinqWeights.dequantize``:

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k // g]) * s[n, k // g] + bias[n]

with ``V(q) = q`` for uniform layers and ``V(q) = CB[q]`` (the fp32 table of
``sinq_vllm.format.codebooks`` rounded to fp16, as the reference computes) for NF4/NF3.
"""

from __future__ import annotations

import torch

from sinq_vllm.format.codebooks import CODEBOOKS
from sinq_vllm.kernels.contract import SinqWeights


def make_weights(shard_sizes, k: int, nbits: int, group: int, seed: int = 0, codebook: str | None = None) -> SinqWeights:
    """A merged layer of ``len(shard_sizes)`` shards: random codes, scales, float zeros (never
    integers) and a distinct column-scale vector per shard. With ``codebook`` ("nf4", "nf3")
    the codes index that table and the zeros are in its units (about [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(shard_sizes)
    offs = [0]
    for s in shard_sizes:
        offs.append(offs[-1] + s)
    qmax = 2**nbits - 1
    codes = torch.randint(0, qmax + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.05 + 0.005).half()
    zeros = (torch.rand(n, k // group, generator=gen) * qmax).half()
    if codebook is not None:
        zeros = (torch.rand(n, k // group, generator=gen) * 2 - 1).half()
    col = (torch.rand(len(shard_sizes), k, generator=gen) * 1.5 + 0.25).half()
    return SinqWeights(codes, scales, zeros, col, tuple(offs), nbits, group, codebook)


def code_values(w: SinqWeights) -> torch.Tensor:
    """float32 ``V(Q)`` [N, K]: the codes, or their codebook values (fp16-rounded table)."""
    if w.codebook is None:
        return w.codes.to(torch.float32)
    table = torch.tensor(CODEBOOKS[w.codebook], dtype=torch.float32).half().float()
    return table[w.codes.long().cpu()].to(w.codes.device)


def reference(w: SinqWeights, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32: dequant ``(V(Q) - z) * s`` per group, ``x * t`` per shard, matmul, + bias (on ``x``'s device)."""
    n, k = w.codes.shape
    g = w.group_size
    q = code_values(w).view(n, k // g, g)
    xf = x.to(torch.float32).reshape(-1, k)
    deq = ((q - w.zeros.float()[..., None]) * w.scales.float()[..., None]).view(n, k).to(xf.device)
    col = w.col_scales.float().to(xf.device)
    offs = w.shard_offsets
    y = torch.cat([(xf * col[s]) @ deq[offs[s] : offs[s + 1]].T for s in range(len(offs) - 1)], 1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], n)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|: the error relative to the output's scale."""
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
