"""Resident layout shared by the GPU backends (``triton`` and ``cuda``), docs/design.md §4.3.

One layout, built once by ``prepare``, read by the CUDA decode kernel (M <= 64), the
Triton kernels and the prefill dequantizers, so the ``cuda`` backend can hand any M to
another kernel without a second copy of the weights.

Merged layers are handled by padding each shard's rows (output features) on its own to
a multiple of ``align`` (128 by default: every q/k/v and gate/up shard of head-dim-128
models already is, so usually nothing is padded). Every block of ``align`` padded
columns then belongs to exactly one shard, and any kernel tile of ``BLOCK_N`` columns
with ``align % BLOCK_N == 0`` needs one column-scale row only.

Tensors (``N_pad`` padded output features, ``K`` input features, ``G = K / g``):

* ``qweight`` int32 ``[W_pad, N_pad]``: ``P = 32 / B`` codes per word along K, where the
  container width ``B`` is 4 for nbits <= 4 and 8 for nbits 5..8 (2- and 3-bit codes
  are stored as nibbles); ``W_pad`` = ``K / P`` rounded up to a multiple of 4 (padding
  words hold code 0). Word ``(w, n)`` holds the codes of ``k = w*P + i``, ``i < P``, of
  output column ``n`` at bit ``B * pos(i)``:

  - ``B = 4``: ``pos(i) = (i >> 1) + 4 * (i & 1)``, i.e. nibbles (0, 4) hold codes
    (0, 1), nibbles (1, 5) codes (2, 3), ... One ``lop3`` with mask ``0x000f000f`` then
    yields two consecutive codes as the two halves of a ``half2``/``bfloat162``: the
    operand pair an ``mma.m16n8k16`` fragment wants (csrc/cuda/sinq_gemv.cu).
  - ``B = 8``: ``pos(i) = i`` (plain little-endian bytes).

  The words are stored in *lane order* (:func:`word_offsets`): per chunk of 4 word rows
  and 32 columns, 512 contiguous bytes ``[g 8][j 4][slot 4]`` for column
  ``n = 32*wt + 8*slot + g`` and word row ``w = 4*c + j``. Lane ``4g + j`` of the CUDA
  decode kernel thereby reads its four words (columns ``g, g+8, g+16, g+24``, word row
  ``j``) with one 16-byte load, and a warp reads 512 contiguous bytes.
* ``scales_zeros`` fp16 ``[G, N_pad, 2]``: (scale, float zero in code units) per
  (group, column), interleaved so one 32-bit load fetches both, and in the same lane
  order per 32 columns (column ``n`` at position ``32*wt + 4*g + slot``): one 16-byte
  load per lane and group. Padded columns are 0.
* ``col_scales`` fp16 ``[S, K]``: the column scale ``t`` of each merged shard.
* ``blk`` int32 ``[N_pad / align, 3]``: per block of ``align`` padded columns
  (shard index, output column of the block's first column, valid columns in the block).
* ``counters`` int32 ``[N_pad / 8]``, zero: one arrival counter per output tile for the
  one-launch split-K of both GPU backends (the last CTA of a tile reduces the partial
  sums in a fixed order and resets its counter to 0, so the tensor is all zeros again
  after every call: CUDA-graph safe, deterministic; docs/design.md §4.2).
* ``codebook`` fp32 ``[16]`` (NF4/NF3 layers only): code value table, the fp16 values
  the reference computes with (sinq_vllm/format/codebooks.py), zero-padded.
"""

from __future__ import annotations

import os

import torch

from ..errors import SinqConfigError
from ..format.codebooks import codebook_values
from .contract import KernelBackend, LayerSpec, SinqWeights, pad_shard_rows

DEFAULT_ALIGN = 128
WARP_COLUMNS = 32  # columns of one lane-order block
CHUNK_WORD_ROWS = 4  # word rows of one lane-order block
LUT_SIZE = 16
#: M from which both GPU backends dequantize each shard into a bf16/fp16 scratch and call
#: torch.matmul (cuBLAS) instead of a fused kernel
ENV_PREFILL_MIN_M = "SINQ_VLLM_PREFILL_MIN_M"
DEFAULT_PREFILL_MIN_M = 256

# code index i -> nibble position, and its inverse (position -> code index)
NIBBLE_POS = tuple((i >> 1) + 4 * (i & 1) for i in range(8))
NIBBLE_AT = tuple(NIBBLE_POS.index(p) for p in range(8))


def container_bits(nbits: int) -> int:
    if nbits <= 4:
        return 4
    if nbits <= 8:
        return 8
    raise ValueError(f"{nbits}-bit codes do not fit the GPU layout (at most 8 bits)")


def word_rows(k: int, nbits: int) -> int:
    """``W_pad``: rows of ``qweight`` for ``k`` input features."""
    per = 32 // container_bits(nbits)
    words = -(-k // per)
    return -(-words // CHUNK_WORD_ROWS) * CHUNK_WORD_ROWS


def word_offsets(w: torch.Tensor, n: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Element offset of word ``(w, n)`` in ``qweight`` (lane order; the same formula as
    ``_word_offsets`` in triton_kernels/sinq_gemm.py and ``word_index`` in sinq_gemv.cu)."""
    return ((w >> 2) * (n_pad >> 5) + (n >> 5)) * 128 + (n & 7) * 16 + (w & 3) * 4 + ((n >> 3) & 3)


def sz_columns(n: torch.Tensor) -> torch.Tensor:
    """Stored position of column ``n`` in a ``scales_zeros`` row (lane order)."""
    return (n & ~31) + (n & 7) * 4 + ((n >> 3) & 3)


def _to_lane_order(t: torch.Tensor) -> torch.Tensor:
    """``[..., N_pad]`` in column order -> lane order of 32-column blocks: ``[wt, slot, g]`` -> ``[wt, g, slot]``."""
    lead, n = t.shape[:-1], t.shape[-1]
    return t.reshape(*lead, n // 32, 4, 8).transpose(-1, -2).reshape(*lead, n)


def _from_lane_order(t: torch.Tensor) -> torch.Tensor:
    lead, n = t.shape[:-1], t.shape[-1]
    return t.reshape(*lead, n // 32, 8, 4).transpose(-1, -2).reshape(*lead, n)


def block_table(shard_offsets, align: int, device=None) -> torch.Tensor:
    rows = []
    for s, (a, b) in enumerate(zip(shard_offsets[:-1], shard_offsets[1:])):
        for start in range(0, -(-(b - a) // align) * align, align):
            rows.append((s, a + start, min(align, b - a - start)))
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)


def padded_shard_starts(shard_offsets, align: int) -> list[int]:
    """First padded column of each shard (and the end): each shard is padded to ``align``."""
    starts = [0]
    for a, b in zip(shard_offsets[:-1], shard_offsets[1:]):
        starts.append(starts[-1] + -(-(b - a) // align) * align)
    return starts


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes ``[N_pad, K]`` (``N_pad`` a multiple of 32) -> int32 ``[W_pad, N_pad]`` in lane order."""
    n, k = codes.shape
    if n % WARP_COLUMNS:
        raise ValueError(f"padded output features {n} are not a multiple of {WARP_COLUMNS}")
    bits = container_bits(nbits)
    per = 32 // bits
    rows = word_rows(k, nbits)
    c = torch.zeros((n, rows * per), dtype=torch.uint8, device=codes.device)
    c[:, :k] = codes.to(torch.uint8)
    c = c.t().reshape(rows, per, n)  # [W, i, N]
    if bits == 4:
        c = c[:, list(NIBBLE_AT), :]  # [W, pos, N]
        c = c.view(rows, 4, 2, n)  # byte b holds positions 2b (low) and 2b+1 (high)
        c = c[:, :, 0, :] | (c[:, :, 1, :] << 4)
    # [W, 4 bytes, N] -> [W, N, 4] little-endian bytes of one int32 word
    words = c.permute(0, 2, 1).contiguous().view(-1).view(torch.int32).view(rows, n)
    # [C, j, wt, slot, g] -> [C, wt, g, j, slot]
    words = words.view(rows // 4, 4, n // 32, 4, 8).permute(0, 2, 4, 1, 3)
    return words.contiguous().view(rows, n)


def unpack_codes(qweight: torch.Tensor, nbits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (tests, debugging): int32 ``[W_pad, N_pad]`` -> uint8 ``[N_pad, K]``."""
    rows, n = qweight.shape
    words = qweight.view(rows // 4, n // 32, 8, 4, 4).permute(0, 3, 1, 4, 2).reshape(rows, n)
    bits = container_bits(nbits)
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    pos = NIBBLE_POS if bits == 4 else tuple(range(per))
    shifts = torch.tensor([p * bits for p in pos], device=qweight.device)
    codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [W, i, N]
    return codes.reshape(rows * per, n)[:k].t().to(torch.uint8).contiguous()


def unpack_scales_zeros(scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the lane order of ``scales_zeros`` (tests): fp16 ``scales``, ``zeros`` ``[N_pad, G]``."""
    natural = _from_lane_order(scales_zeros.transpose(1, 2))  # [G, 2, N_pad]
    return natural[:, 0].t(), natural[:, 1].t()


def codebook_lut(name: str, device=None) -> torch.Tensor:
    """fp32 ``[16]``: the codebook's fp16 values (as the reference computes with them), zero-padded."""
    values = codebook_values(name).float()
    lut = torch.zeros(LUT_SIZE, dtype=torch.float32)
    lut[: values.numel()] = values
    return lut.to(device)


def repack(weights: SinqWeights, align: int = DEFAULT_ALIGN) -> dict[str, torch.Tensor]:
    offs = tuple(int(o) for o in weights.shard_offsets)
    n, k = weights.codes.shape
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != n:
        raise ValueError(f"shard offsets {offs} do not partition {n} output rows")
    if align % WARP_COLUMNS:
        raise ValueError(f"align {align} is not a multiple of {WARP_COLUMNS}")
    codes = pad_shard_rows(weights.codes.to(torch.uint8), offs, align)
    s = pad_shard_rows(weights.scales.to(torch.float16), offs, align)
    z = pad_shard_rows(weights.zeros.to(torch.float16), offs, align)
    n_pad = codes.shape[0]
    sz = torch.stack([_to_lane_order(s.t()), _to_lane_order(z.t())], dim=-1)  # [G, N_pad, 2]
    out = {
        "qweight": pack_codes(codes, weights.nbits),
        "scales_zeros": sz.contiguous(),
        "col_scales": weights.col_scales.to(torch.float16).contiguous(),
        "blk": block_table(offs, align, device=weights.codes.device),
        "counters": torch.zeros(max(1, n_pad // 8), dtype=torch.int32, device=weights.codes.device),
    }
    if weights.codebook is not None:
        out["codebook"] = codebook_lut(weights.codebook, device=weights.codes.device)
    return out


def layout_unsupported_reason(spec: LayerSpec) -> str | None:
    """Why a layer cannot use this layout (None: it can)."""
    if spec.nbits > 8:
        return f"{spec.nbits}-bit codes (at most 8)"
    if spec.codebook is not None and spec.nbits > 4:
        return f"{spec.codebook.upper()} codebook with {spec.nbits}-bit codes (at most 4)"
    if spec.group_size % 16 or spec.in_features % spec.group_size:
        return f"group size {spec.group_size} must be a multiple of 16 dividing in_features {spec.in_features}"
    return spec.offsets_problem()


def prefill_min_m() -> int:
    value = os.environ.get(ENV_PREFILL_MIN_M, str(DEFAULT_PREFILL_MIN_M)).strip()
    try:
        m = int(value)
    except ValueError:
        m = 0
    if m < 1:
        raise SinqConfigError(f"{ENV_PREFILL_MIN_M}={value!r} must be a positive integer (default {DEFAULT_PREFILL_MIN_M})")
    return m


def prefill_linear(x, qweight, col_scales, blk, bias, out_features: int, shard_offsets, dequant) -> torch.Tensor:
    """Large-M path of both GPU backends: per merged shard, ``dequant(scratch, shard, first_padded_column)``
    writes the shard's dense weight ``(V(Q) - z) * s * t`` in ``x.dtype`` into ``scratch[rows, K]``, and
    torch.matmul (cuBLAS on GPU) multiplies it into the shard's output columns. One scratch of the largest
    shard is reused for every shard (from torch's caching allocator: CUDA-graph safe, and freed blocks are
    reused by the next layer)."""
    m, k = x.shape
    align = qweight.shape[1] // blk.shape[0]
    offs = [int(o) for o in shard_offsets]
    starts = padded_shard_starts(offs, align)
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    scratch = torch.empty((max(b - a for a, b in zip(offs[:-1], offs[1:])), k), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    for s, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
        if b == a:
            continue
        w = scratch[: b - a]
        dequant(w, s, starts[s])
        target = out if len(offs) == 2 else out[:, a:b]
        if bias is None:
            torch.mm(x, w.t(), out=target)
        else:
            torch.addmm(bias[a:b].to(x.dtype), x, w.t(), out=target)
    return out


#: the schema of every op on this layout: ``x[M, K]`` -> ``[M, out_features]`` in ``x.dtype``.
#: ``counters`` is scratch that every call leaves all-zero again (not a mutation the caller sees).
LINEAR_OP_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor col_scales, Tensor blk, Tensor counters, "
    "Tensor? codebook, Tensor? bias, int nbits, int group_size, int out_features, int[] shard_offsets) -> Tensor"
)
LAYOUT_KEYS = ("qweight", "scales_zeros", "col_scales", "blk", "counters")


def linear_op_fake(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias, nbits, group_size,
                   out_features, *extra):
    """Fake (meta) implementation of every op on this layout (``extra``: the ops' trailing arguments)."""
    return x.new_empty((x.shape[0], out_features))


def define_linear_op(name: str, impl):
    """Register ``sinq_vllm::<name>`` with :data:`LINEAR_OP_SCHEMA`, opaque to torch.compile, with its fake."""
    op = torch.library.custom_op(f"sinq_vllm::{name}", impl, mutates_args=(), schema=LINEAR_OP_SCHEMA)
    op.register_fake(linear_op_fake)
    return op


def op_args(tensors: dict[str, torch.Tensor], spec: LayerSpec, x: torch.Tensor, bias) -> tuple:
    """The arguments of a :data:`LINEAR_OP_SCHEMA` op for resident ``tensors`` and ``x[M, K]``."""
    return (x, *(tensors[key] for key in LAYOUT_KEYS), tensors.get("codebook"), bias, spec.nbits, spec.group_size,
            spec.out_features, list(spec.shard_offsets))


class GpuLayoutBackend(KernelBackend):
    """A backend whose resident tensors are this layout and whose op has :data:`LINEAR_OP_SCHEMA`."""

    op_name: str = "?"
    codebooks = frozenset({"nf4", "nf3"})

    def __init__(self, align: int = DEFAULT_ALIGN):
        self.align = align

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        return repack(weights, self.align)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        lead = x.shape[:-1]
        op = getattr(torch.ops.sinq_vllm, self.op_name)
        y = op(*op_args(tensors, spec, x.reshape(-1, spec.in_features), bias))
        return y.reshape(*lead, spec.out_features)
