"""Resident layout shared by the GPU backends (``triton`` and ``cuda``).

One layout, built once by ``prepare``, read by the Triton kernels (every M) and by the
CUDA decode kernel (M <= 16), so the ``cuda`` backend can hand large M to Triton without
a second copy of the weights.

Merged layers are handled by padding each shard's rows (output features) on its own to
a multiple of ``align`` (128 by default: every q/k/v and gate/up shard of head-dim-128
models already is, so usually nothing is padded). Every block of ``align`` padded
columns then belongs to exactly one shard, and any kernel tile of ``BLOCK_N`` columns
with ``align % BLOCK_N == 0`` needs one column-scale row only.

Tensors (``N_pad`` padded output features, ``K`` input features, ``G = K / g``):

* ``qweight`` int32 ``[K / P, N_pad]``, ``P = 32 / B`` codes per word along K, where the
  container width ``B`` is 4 for nbits <= 4 and 8 for nbits 5..8 (2- and 3-bit codes
  are stored as nibbles). Column ``n`` of word row ``w`` holds the codes of
  ``k = w*P + i``, ``i < P``, at bit ``B * pos(i)``:

  - ``B = 4``: ``pos(i) = (i >> 1) + 4 * (i & 1)``, i.e. nibbles (0, 4) hold codes
    (0, 1), nibbles (1, 5) codes (2, 3), ... One ``lop3`` with mask ``0x000f000f`` then
    yields two consecutive codes as the two halves of a ``half2``/``bfloat162``: the
    operand pair an ``mma.m16n8k16`` fragment wants (csrc/cuda/sinq_gemv.cu).
  - ``B = 8``: ``pos(i) = i`` (plain little-endian bytes).

  N-contiguous rows give coalesced loads to both kernels.
* ``scales_zeros`` fp16 ``[G, N_pad, 2]``: (scale, float zero in code units) per
  (group, column), interleaved so one 32-bit load fetches both. Padded columns are 0.
* ``col_scales`` fp32 ``[S, K]``: the column scale ``t`` of each merged shard.
* ``blk`` int32 ``[N_pad / align, 3]``: per block of ``align`` padded columns
  (shard index, output column of the block's first column, valid columns in the block).
"""

from __future__ import annotations

import torch

from .contract import KernelBackend, LayerSpec, SinqWeights, pad_shard_rows

DEFAULT_ALIGN = 128

# code index i -> nibble position, and its inverse (position -> code index)
NIBBLE_POS = tuple((i >> 1) + 4 * (i & 1) for i in range(8))
NIBBLE_AT = tuple(NIBBLE_POS.index(p) for p in range(8))


def container_bits(nbits: int) -> int:
    if nbits <= 4:
        return 4
    if nbits <= 8:
        return 8
    raise ValueError(f"{nbits}-bit codes do not fit the GPU layout (at most 8 bits)")


def block_table(shard_offsets, align: int, device=None) -> torch.Tensor:
    rows = []
    for s, (a, b) in enumerate(zip(shard_offsets[:-1], shard_offsets[1:])):
        for start in range(0, -(-(b - a) // align) * align, align):
            rows.append((s, a + start, min(align, b - a - start)))
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> int32 words ``[K / P, N]`` (see module docstring)."""
    n, k = codes.shape
    bits = container_bits(nbits)
    per = 32 // bits
    if k % per:
        raise ValueError(f"in_features {k} is not a multiple of {per}")
    c = codes.to(torch.uint8).t().reshape(k // per, per, n)  # [W, i, N]
    if bits == 4:
        c = c[:, list(NIBBLE_AT), :]  # [W, pos, N]
        c = c.view(k // per, 4, 2, n)  # byte b holds positions 2b (low) and 2b+1 (high)
        c = c[:, :, 0, :] | (c[:, :, 1, :] << 4)
    # [W, 4 bytes, N] -> [W, N, 4] little-endian bytes of one int32 word
    return c.permute(0, 2, 1).contiguous().view(-1).view(torch.int32).view(k // per, n)


def unpack_codes(qweight: torch.Tensor, nbits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (tests, debugging): int32 ``[K / P, N]`` -> uint8 ``[N, K]``."""
    bits = container_bits(nbits)
    per = 32 // bits
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    pos = NIBBLE_POS if bits == 4 else tuple(range(per))
    shifts = torch.tensor([p * bits for p in pos], device=qweight.device)
    codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [W, i, N]
    return codes.reshape(k, -1).t().to(torch.uint8).contiguous()


def repack(weights: SinqWeights, align: int = DEFAULT_ALIGN) -> dict[str, torch.Tensor]:
    offs = tuple(int(o) for o in weights.shard_offsets)
    n, k = weights.codes.shape
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != n:
        raise ValueError(f"shard offsets {offs} do not partition {n} output rows")
    codes = pad_shard_rows(weights.codes.to(torch.uint8), offs, align)
    s = pad_shard_rows(weights.scales.to(torch.float16), offs, align)
    z = pad_shard_rows(weights.zeros.to(torch.float16), offs, align)
    return {
        "qweight": pack_codes(codes, weights.nbits),
        "scales_zeros": torch.stack([s.t(), z.t()], dim=-1).contiguous(),  # [G, N_pad, 2]
        "col_scales": weights.col_scales.to(torch.float32).contiguous(),
        "blk": block_table(offs, align, device=weights.codes.device),
    }


def layout_unsupported_reason(spec: LayerSpec) -> str | None:
    """Why a layer cannot use this layout (None: it can)."""
    if spec.nbits > 8:
        return f"{spec.nbits}-bit codes (at most 8)"
    if spec.group_size % 16 or spec.in_features % spec.group_size:
        return f"group size {spec.group_size} must be a multiple of 16 dividing in_features {spec.in_features}"
    return spec.offsets_problem()


#: the schema of every op on this layout: ``x[M, K]`` -> ``[M, out_features]`` in ``x.dtype``
LINEAR_OP_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor col_scales, Tensor blk, Tensor? bias, "
    "int nbits, int group_size, int out_features) -> Tensor"
)


def linear_op_fake(x, qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features, *extra):
    """Fake (meta) implementation of every op on this layout (``extra``: kernel tuning arguments)."""
    return x.new_empty((x.shape[0], out_features))


def define_linear_op(name: str, impl):
    """Register ``sinq_vllm::<name>`` with :data:`LINEAR_OP_SCHEMA`, opaque to torch.compile, with its fake."""
    op = torch.library.custom_op(f"sinq_vllm::{name}", impl, mutates_args=(), schema=LINEAR_OP_SCHEMA)
    op.register_fake(linear_op_fake)
    return op


class GpuLayoutBackend(KernelBackend):
    """A backend whose resident tensors are this layout and whose op has :data:`LINEAR_OP_SCHEMA`."""

    op_name: str = "?"

    def __init__(self, align: int = DEFAULT_ALIGN):
        self.align = align

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        return repack(weights, self.align)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        lead = x.shape[:-1]
        y = getattr(torch.ops.sinq_vllm, self.op_name)(
            x.reshape(-1, spec.in_features),
            tensors["qweight"],
            tensors["scales_zeros"],
            tensors["col_scales"],
            tensors["blk"],
            bias,
            spec.nbits,
            spec.group_size,
            spec.out_features,
        )
        return y.reshape(*lead, spec.out_features)
