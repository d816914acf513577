"""quantAux: 8-bit storage of SINQ scales and zeros (docs/format.md §2.5).

``rtn8`` mirrors the reference ``Quantizer.rtn8`` and ``dq8`` its inverse ``x * s + m``
evaluated in fp16, so that dequantizing once at load time reproduces the reference
values bit for bit.
"""

from __future__ import annotations

import torch

SCALE_TILE = 32  # scales are quantized per column of a [32, R/32] view


def rtn8(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to uint8 per column of its ``[tile, -1]`` view: ``(x_u8, scale, min)``."""
    v = x.reshape(tile, -1)
    lo = v.min(0, keepdim=True).values
    v = v - lo
    scale = v.max(0, keepdim=True).values / (2**8 - 1)
    q = torch.round(v / scale).clip(0, 2**8 - 1).to(torch.uint8)
    return q, scale, lo


def dq8(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, shape) -> torch.Tensor:
    """Dequantize a quantAux triplet exactly like the reference (``x * s + m``)."""
    return (x * scale + minimum).view(shape)
