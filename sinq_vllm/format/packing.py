"""Bit packing of SINQ codes.

Two layouts live here:

* the *planar* layout of the reference checkpoints (docs/format.md §2.6): codes of the
  grouped view ``[R, g]`` are split into ``p`` slabs along dim 0, slab ``i`` in the
  i-th most significant field. Rows far apart share a word, so this layout can never
  be sliced for tensor parallelism: unpack first.
* the *K-packed* layout we keep resident in memory: ``32 // nbits`` codes of one
  output row per int32 word along K, least significant field first. Rows stay
  independent, so any row range (a TP shard, a merged-layer shard) is a plain slice.
"""

from __future__ import annotations

import math

import torch

# packing name -> (values per word, bits per value)
PACKINGS: dict[str, tuple[int, int]] = {
    "8bit_u8": (1, 8),
    "4bit_u8": (2, 4),
    "2bit_u8": (4, 2),
    "1bit_u8": (8, 1),
    "3bit_32": (10, 3),
    "5bit_32": (6, 5),
    "6bit_32": (5, 6),
}
BITS_TO_PACKING: dict[int, str] = {8: "8bit_u8", 6: "6bit_32", 5: "5bit_32", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)


def packed_dtype(packing: str) -> torch.dtype:
    return torch.int32 if packing.endswith("_32") else torch.uint8


def planar_rows(num_rows: int, packing: str) -> int:
    """Rows of the packed tensor for ``num_rows`` code rows."""
    per_word, _ = PACKINGS[packing]
    return math.ceil(num_rows / per_word)


def pack_planar(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer codes ``[R, g]`` the way the reference ``BitPack`` does."""
    packing = BITS_TO_PACKING[nbits]
    per_word, bits = PACKINGS[packing]
    rows = codes.shape[0]
    step = planar_rows(rows, packing)
    wide = torch.zeros((step * per_word, codes.shape[1]), dtype=torch.int64, device=codes.device)
    wide[:rows] = codes.to(torch.int64)
    out = torch.zeros((step, codes.shape[1]), dtype=torch.int64, device=codes.device)
    for i in range(per_word):
        out |= wide[i * step : (i + 1) * step] << (bits * (per_word - 1 - i))
    if packed_dtype(packing) == torch.uint8:
        return out.to(torch.uint8)
    return out.to(torch.int32)


def unpack_planar(packed: torch.Tensor, packing: str, num_rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_planar`: uint8 codes ``[num_rows, g]``."""
    per_word, bits = PACKINGS[packing]
    wide = packed.to(torch.int64)
    mask = (1 << bits) - 1
    slabs = [(wide >> (bits * (per_word - 1 - i))) & mask for i in range(per_word)]
    return torch.cat(slabs, 0)[:num_rows].to(torch.uint8)


def k_pack_factor(nbits: int) -> int:
    """Codes per int32 word in the K-packed resident layout."""
    return 32 // nbits


def pack_along_k(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> int32 ``[N, ceil(K / (32 // nbits))]``, LSB first."""
    per_word = k_pack_factor(nbits)
    n, k = codes.shape
    words = math.ceil(k / per_word)
    wide = torch.zeros((n, words * per_word), dtype=torch.int64, device=codes.device)
    wide[:, :k] = codes.to(torch.int64)
    wide = wide.view(n, words, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * nbits
    packed = (wide << shifts).sum(-1)
    # int32 two's complement view of the (<= 32-bit) unsigned word
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_along_k(packed: torch.Tensor, nbits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_along_k`: uint8 codes ``[N, k]``."""
    per_word = k_pack_factor(nbits)
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * nbits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)
