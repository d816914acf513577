"""What every checkpoint tensor of a SINQ module must look like, from its sidecar meta.

:func:`expected_tensor_specs` is the one source of truth for tensor dtypes and shapes
(docs/format.md §2.3): the front-end header check (``format.validation``), the load-time
check (``format.decode.check_tensors``), the receivers vLLM loads into, the quantizer's
writer plan and ``inspect`` all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .aux8 import SCALE_TILE
from .layer_meta import LayerMeta
from .packing import packed_dtype, planar_rows

#: dtypes accepted for stored scales, zeros, column scales and biases
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes accepted for codes stored unpacked (legacy gemlite-era checkpoints, docs/format.md §2.11)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of a SINQ module must look like (dtype and shape)."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]  # the first is what the reference writes
    what: str  # what the shape means, for messages
    required: bool = True
    # legacy layouts also accepted: (shape, dtypes) pairs
    alternatives: tuple[tuple[tuple[int, ...], tuple[torch.dtype, ...]], ...] = ()
    alternative_what: str = ""

    def problem(self, dtype: torch.dtype | None, shape: tuple[int, ...]) -> str | None:
        """None if a tensor of this dtype and shape is acceptable, else what is wrong with it."""
        shape = tuple(shape)
        layouts = ((self.shape, self.dtypes), *self.alternatives)
        matching = [dtypes for s, dtypes in layouts if s == shape]
        if not matching:
            alt = f" or {self.alternative_what}" if self.alternative_what else ""
            return f"has shape {list(shape)}, expected {list(self.shape)} ({self.what}){alt}"
        if not any(dtype in dtypes for dtypes in matching):
            return f"has dtype {dtype}, expected {_dtype_list(matching[0])} for {self.what}"
        return None


def _dtype_list(dtypes) -> str:
    if len(dtypes) == 1:
        return str(dtypes[0])
    return "one of " + ", ".join(str(d) for d in dtypes)


def expected_tensor_specs(meta: LayerMeta) -> dict[str, TensorSpec]:
    """``{key: TensorSpec}`` of every tensor of one module, as its sidecar meta implies (1D tiling).

    Required keys come first, in the order the receivers register them.
    """
    n, k, g, r = meta.out_features, meta.in_features, meta.group_size, meta.grouped_rows
    packed = (planar_rows(r, meta.packing), g)
    unpacked = tuple({(r, g), (n, k)} - {packed})
    specs = {
        "W_q": TensorSpec(
            packed, (packed_dtype(meta.packing),), f"{meta.packing} planar packing of {r} groups of {g}",
            alternatives=tuple((s, INT_DTYPES) for s in unpacked),
            alternative_what=f"an unpacked [{n}, {k}] or [{r}, {g}] of integer codes",
        ),
        "meta.scale2": TensorSpec((1, k), FLOAT_DTYPES, "one column scale per input feature, 1D tiling"),
    }
    if meta.aux:
        x, one, tiles = (torch.uint8,), FLOAT_DTYPES, r // SCALE_TILE
        specs.update({
            "meta.scale.x": TensorSpec((SCALE_TILE, tiles), x, f"8-bit scales of {r} groups"),
            "meta.scale.s": TensorSpec((1, tiles), one, f"quantAux scale of {r} group scales"),
            "meta.scale.m": TensorSpec((1, tiles), one, f"quantAux minimum of {r} group scales"),
            "meta.zero.x": TensorSpec((r, 1), x, f"8-bit zeros of {r} groups"),
            "meta.zero.s": TensorSpec((1, 1), one, "quantAux scale of the zeros"),
            "meta.zero.m": TensorSpec((1, 1), one, "quantAux minimum of the zeros"),
        })
    else:
        specs.update({
            "meta.scale": TensorSpec((r, 1), FLOAT_DTYPES, f"one scale per group, {r} groups"),
            "meta.zero": TensorSpec((r, 1), FLOAT_DTYPES, f"one zero per group, {r} groups"),
        })
    specs["bias"] = TensorSpec((n,), FLOAT_DTYPES, "one bias per output feature", required=False)
    return specs


def required_keys(meta: LayerMeta) -> tuple[str, ...]:
    return tuple(key for key, spec in expected_tensor_specs(meta).items() if spec.required)


def stored_dtype(meta: LayerMeta, key: str) -> torch.dtype:
    """The dtype the reference writes for ``key`` (receivers take it, so vLLM sees no dtype mismatch)."""
    if key == "W_q":
        return packed_dtype(meta.packing)
    return torch.uint8 if key.endswith(".x") else torch.float16
