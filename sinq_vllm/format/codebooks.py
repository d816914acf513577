"""Non-uniform code values of SINQ's NF4 and NF3 methods (docs/format.md §1.4, §1.7).

A layer whose sidecar method contains ``nf4`` or ``nf3`` stores codes ``Q`` that index these
tables: ``W = (CB[Q] - z) * s * t``. The values are the reference's fp32 constants
(``sinq/quantizer.py`` and ``sinq/dual_shift.py``, identical in both); the reference casts
them to the scales' dtype (fp16) before use, so fp16 is what a faithful kernel computes with.
Uniform layers have no codebook: the value of code ``q`` is ``q``.
"""

from __future__ import annotations

import torch

CODEBOOKS: dict[str, tuple[float, ...]] = {
    "nf4": (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ),
    "nf3": (
        -1.0, -0.5350227355957031, -0.2469314038753510, 0.0,
        0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1.0,
    ),
}
#: bits of the codes each codebook is indexed by
CODEBOOK_BITS = {name: (len(values) - 1).bit_length() for name, values in CODEBOOKS.items()}


def codebook_values(name: str, dtype: torch.dtype = torch.float16, device=None) -> torch.Tensor:
    """The table of ``name`` as a tensor, by default in fp16 as the reference computes with it."""
    return torch.tensor(CODEBOOKS[name], dtype=torch.float32, device=device).to(dtype)
