"""Per-layer meta of a SINQ checkpoint (one sidecar entry, sinq-format.md §2.4).

``LayerMeta`` is the single parsed, validated view of a sidecar entry that the
loader, the ``inspect`` command and the quantizer writer share.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SinqCheckpointError
from .packing import BITS_TO_PACKING, PACKINGS

SIDECAR_SUFFIX = ".meta.json"
INDEX_NAME = "model.safetensors.index.json"
SIDECAR_NAME = INDEX_NAME + SIDECAR_SUFFIX


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
        for cb in ("nf4", "nf3"):
            if cb in self.method:
                return cb
        return None

    @property
    def symmetric(self) -> bool:
        return "noz" in self.method

    def unsupported_reason(self) -> str | None:
        """Why our kernels cannot serve this layer faithfully, or None."""
        if self.nbits not in BITS_TO_PACKING:
            return f"nbits={self.nbits} (supported: {sorted(BITS_TO_PACKING)})"
        if self.tiling == "2D":
            return "2D tiling (the column scale depends on the row block)"
        if self.codebook:
            return f"{self.codebook.upper()} codebook quantization"
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
            method = str(meta.get("method", "sinq_quantAux"))
            packing = meta.get("packing") or BITS_TO_PACKING.get(int(nbits))
        except KeyError as e:
            raise SinqCheckpointError(f"{where}: missing meta field {e.args[0]!r}") from None
        if not (isinstance(nbits, (int, float)) and float(nbits).is_integer()):
            raise SinqCheckpointError(f"{where}: nbits={nbits!r} is not an integer bit width")
        nbits = int(nbits)
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise SinqCheckpointError(f"{where}: shape={shape!r} is not [out_features, in_features]")
        if packing not in PACKINGS:
            raise SinqCheckpointError(f"{where}: unknown packing {packing!r} (known: {sorted(PACKINGS)})")
        if PACKINGS[packing][1] != nbits:
            raise SinqCheckpointError(f"{where}: packing {packing!r} does not hold {nbits}-bit codes")
        n, k = shape
        scale_shape = tuple(meta.get("scale.shape") or meta.get("scale", {}).get("shape", ()) or ())
        zero_shape = tuple(meta.get("zero.shape") or meta.get("zero", {}).get("shape", ()) or ())
        if len(scale_shape) == 2:
            rows = scale_shape[0]
        elif len(scale_shape) == 3:
            rows = scale_shape[0] * scale_shape[1]
        else:
            raise SinqCheckpointError(f"{where}: scale.shape={list(scale_shape)} is neither [R, 1] nor [tiles, b, 1]")
        if rows <= 0 or (n * k) % rows:
            raise SinqCheckpointError(f"{where}: scale.shape={list(scale_shape)} does not divide shape {shape} into groups")
        group = (n * k) // rows
        if k % group:
            raise SinqCheckpointError(
                f"{where}: group size {group} (from scale.shape) does not divide in_features={k}"
            )
        declared = meta.get("group_size")
        return cls(
            name=name,
            nbits=nbits,
            group_size=group,
            declared_group_size=int(declared) if isinstance(declared, (int, float)) else None,
            out_features=n,
            in_features=k,
            method=method,
            packing=packing,
            aux="quantAux" in method,
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
