"""Per-layer meta of a SINQ checkpoint (one sidecar entry, docs/format.md §2.4).

``LayerMeta`` is the single parsed, validated view of a sidecar entry that the
loader, the ``inspect`` command and the quantizer writer share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SinqCheckpointError
from .codebooks import CODEBOOK_BITS
from .packing import BITS_TO_PACKING, PACKINGS

@dataclass(frozen=True)
class LayerMeta:
    name: str  # HF module name, e.g. "model.layers.0.self_attn.q_proj"
    nbits: int
    group_size: int  # effective group size (rows of the grouped view are N*K/group_size)
    declared_group_size: int | None  # meta["group_size"], stale after the tile fallback
    out_features: int
    in_features: int
    method: str
    packing: str
    aux: bool
    scale_shape: tuple[int, ...]
    zero_shape: tuple[int, ...]
    compute_dtype: str | None

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def grouped_rows(self) -> int:
        return self.out_features * self.num_groups

    @property
    def tiling(self) -> str:
        return "2D" if len(self.scale_shape) == 3 else "1D"

    @property
    def codebook(self) -> str | None:
        """The non-uniform code table the method names ("nf4", "nf3"), or None (uniform codes)."""
        return method_codebook(self.method)

    @property
    def symmetric(self) -> bool:
        return "noz" in self.method

    def unsupported_reason(self) -> str | None:
        """Why our kernels cannot serve this layer faithfully, or None."""
        if self.nbits not in BITS_TO_PACKING:
            return f"nbits={self.nbits} (supported: {sorted(BITS_TO_PACKING)})"
        if self.tiling == "2D":
            return "2D tiling (the column scale depends on the row block)"
        if self.symmetric:
            return "symmetric 'noz' quantization (scalar zero)"
        return None

    @classmethod
    def from_sidecar(cls, name: str, entry: dict, source: str) -> "LayerMeta":
        """Parse and check one sidecar entry; ``source`` names the file in errors."""
        meta = entry.get("meta", entry) if isinstance(entry, dict) else None
        where = f"{source}: layer '{name}'"
        if not isinstance(meta, dict):
            raise SinqCheckpointError(f"{where}: entry is not a JSON object with a 'meta' field")
        try:
            nbits = meta["nbits"]
            shape = meta["shape"]
        except KeyError as e:
            raise SinqCheckpointError(f"{where}: missing meta field {e.args[0]!r}") from None
        method = str(meta.get("method", "sinq_quantAux"))
        if isinstance(nbits, bool) or not (isinstance(nbits, (int, float)) and float(nbits).is_integer()):
            raise SinqCheckpointError(f"{where}: nbits={nbits!r} is not an integer bit width")
        nbits = int(nbits)
        packing = meta.get("packing") or BITS_TO_PACKING.get(nbits)
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_pos_int(v) for v in shape)):
            raise SinqCheckpointError(f"{where}: shape={shape!r} is not [out_features, in_features]")
        if not isinstance(packing, str) or packing not in PACKINGS:
            raise SinqCheckpointError(f"{where}: unknown packing {packing!r} (known: {sorted(PACKINGS)})")
        if PACKINGS[packing][1] != nbits:
            raise SinqCheckpointError(f"{where}: packing {packing!r} does not hold {nbits}-bit codes")
        codebooks = [cb for cb in CODEBOOK_BITS if cb in method.lower()]
        if len(codebooks) > 1:
            raise SinqCheckpointError(f"{where}: method {method!r} names several codebooks {codebooks}")
        if codebooks and CODEBOOK_BITS[codebooks[0]] != nbits:
            # docs/format.md §1.4: NF4 indexes 16 levels, NF3 8; other widths have no table
            raise SinqCheckpointError(
                f"{where}: method {method!r} stores {codebooks[0].upper()} codes, which are "
                f"{CODEBOOK_BITS[codebooks[0]]}-bit, but nbits={nbits}"
            )
        if meta.get("axis", 1) != 1:
            raise SinqCheckpointError(f"{where}: axis={meta.get('axis')!r}; SINQ groups run along in_features (axis 1)")
        n, k = shape
        declared = meta.get("group_size")
        if isinstance(declared, float) and declared.is_integer():
            declared = int(declared)
        if declared is not None and not _is_pos_int(declared):
            raise SinqCheckpointError(f"{where}: group_size={declared!r} is not a positive integer")
        quantizer_group = reference_group_size(declared or k, k)
        scale_shape = _shape_field(meta, "scale", where)
        zero_shape = _shape_field(meta, "zero", where)
        if not scale_shape:  # the reference writes no scale.shape/zero.shape for plain (non-quantAux) scales
            if k % quantizer_group:
                raise SinqCheckpointError(
                    f"{where}: no scale.shape, and group_size={declared} does not divide in_features={k}"
                )
            scale_shape = (n * k // quantizer_group, 1)
        if len(scale_shape) == 2 and scale_shape[1] == 1:
            rows = scale_shape[0]
        elif len(scale_shape) == 3 and scale_shape[2] == 1:
            rows = scale_shape[0] * scale_shape[1]
        else:
            raise SinqCheckpointError(f"{where}: scale.shape={list(scale_shape)} is neither [R, 1] nor [tiles, b, 1]")
        if rows <= 0 or (n * k) % rows:
            raise SinqCheckpointError(
                f"{where}: scale.shape={list(scale_shape)} does not divide shape {shape} into groups"
            )
        group = (n * k) // rows
        if k % group:
            raise SinqCheckpointError(
                f"{where}: group size {group} (from scale.shape) does not divide in_features={k}"
            )
        if zero_shape and math.prod(zero_shape) != rows:
            raise SinqCheckpointError(
                f"{where}: zero.shape={list(zero_shape)} holds {math.prod(zero_shape)} zeros, expected one per group "
                f"({rows}, as scale.shape={list(scale_shape)} says)"
            )
        if declared is not None and quantizer_group != group:
            raise SinqCheckpointError(
                f"{where}: group_size={declared} with in_features={k} gives groups of {quantizer_group}, but "
                f"scale.shape={list(scale_shape)} implies groups of {group}"
            )
        aux = "quantAux" in method
        if aux and rows % 32:
            raise SinqCheckpointError(
                f"{where}: method {method!r} stores 8-bit scales as [32, R/32], but R={rows} groups is not a "
                "multiple of 32"
            )
        return cls(
            name=name,
            nbits=nbits,
            group_size=group,
            declared_group_size=declared,
            out_features=n,
            in_features=k,
            method=method,
            packing=packing,
            aux=aux,
            scale_shape=scale_shape,
            zero_shape=zero_shape,
            compute_dtype=meta.get("compute_dtype"),
        )

    def to_sidecar(self) -> dict:
        """The sidecar entry the reference writes for this layer."""
        return {
            "meta": {
                "nbits": self.nbits,
                "group_size": self.declared_group_size if self.declared_group_size is not None else self.group_size,
                "shape": [self.out_features, self.in_features],
                "scale.shape": list(self.scale_shape),
                "awq_scale": None,
                "zero.shape": list(self.zero_shape),
                "axis": 1,
                "packing": self.packing,
                "method": self.method,
                "compute_dtype": self.compute_dtype or "torch.bfloat16",
                "unpack_view_dtype": "torch.int32" if self.packing.endswith("_32") else "torch.uint8",
                "view_as_float": False,
            }
        }


def method_codebook(method: str) -> str | None:
    """The codebook a sidecar method string selects (its ``nf4``/``nf3`` flag, docs/format.md §1.1;
    the reference tests the lower-cased string)."""
    return next((cb for cb in CODEBOOK_BITS if cb in method.lower()), None)


def reference_group_size(group_size: int, in_features: int) -> int:
    """The group the reference quantizer uses: it halves a group that does not divide K, down to 16."""
    g = group_size
    while g >= 16 and in_features % g:
        g //= 2
    return g


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _shape_field(meta: dict, name: str, where: str) -> tuple[int, ...]:
    """``meta["<name>.shape"]`` (sidecar) or ``meta[name]["shape"]`` (re-nested), checked."""
    value = meta.get(f"{name}.shape")
    if value is None and isinstance(meta.get(name), dict):
        value = meta[name].get("shape")
    if value is None:
        return ()
    if not (isinstance(value, (list, tuple)) and len(value) <= 4 and all(_is_pos_int(v) for v in value)):
        raise SinqCheckpointError(f"{where}: {name}.shape={value!r} is not a list of positive integers")
    return tuple(value)
