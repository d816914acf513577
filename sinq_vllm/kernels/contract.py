"""The one op contract every SINQ kernel backend implements.

    y = concat_s( (x * t_s) @ ((V(Q_s) - z_s) * s_s)^T ) + bias

``V(q) = q`` for uniform layers and ``V(q) = CB[q]`` for NF4/NF3 layers (``codebook`` names
the table in ``sinq_vllm.format.codebooks``; values in fp16, as the reference computes).

``SinqWeights`` is the canonical, backend-neutral form of one (TP-local) layer, built
once by the loader from the checkpoint. A backend turns it into its own resident
layout once (``prepare``) and runs the op on that layout (``apply``) with no per-call
repacking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..format.codebooks import codebook_values


@dataclass
class SinqWeights:
    codes: torch.Tensor  # uint8 [N, K], values < 2**nbits
    scales: torch.Tensor  # fp16 [N, G], reference values (after quantAux dequant)
    zeros: torch.Tensor  # fp16 [N, G], float zeros in code units (never rounded)
    col_scales: torch.Tensor  # fp16 [S, K], one column scale vector per merged shard
    shard_offsets: tuple[int, ...]  # S + 1 boundaries along N: shard s = rows [o[s], o[s+1])
    nbits: int
    group_size: int
    codebook: str | None = None  # "nf4" | "nf3": codes index that table; None: uniform

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight ``(V(Q) - z) * s * t`` (for layers vLLM keeps dense)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        values = self.codes.float()
        if self.codebook is not None:
            values = codebook_values(self.codebook, device=self.codes.device).float()[self.codes.long()]
        w = (values.view(n, -1, g) - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        w = w.view(n, k)
        for s in range(len(self.shard_offsets) - 1):
            w[self.shard_offsets[s] : self.shard_offsets[s + 1]] *= self.col_scales[s].float()
        return w


@dataclass(frozen=True)
class LayerSpec:
    """Static facts about a prepared layer that ``apply`` needs besides tensors."""

    nbits: int
    group_size: int
    out_features: int
    in_features: int
    shard_offsets: tuple[int, ...]
    codebook: str | None = None  # as SinqWeights.codebook

    def offsets_problem(self) -> str | None:
        """None when the shard offsets partition the output rows, else what is wrong."""
        offs = self.shard_offsets
        if len(offs) < 2 or offs[0] != 0 or offs[-1] != self.out_features or any(b < a for a, b in zip(offs, offs[1:])):
            return f"shard offsets {offs} do not partition {self.out_features} output rows"
        return None


class KernelBackend(ABC):
    name: str = "?"
    #: the codebooks (``LayerSpec.codebook``) this backend computes; uniform layers always
    codebooks: frozenset[str] = frozenset()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run in this process at all (None: it can)."""
        return None

    @abstractmethod
    def unsupported_reason(self, spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot run this layer (None: it can)."""

    @abstractmethod
    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        """Repack once into this backend's resident layout."""

    @abstractmethod
    def apply(
        self, tensors: dict[str, torch.Tensor], spec: LayerSpec, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Compute the op for ``x[..., K]``; returns ``[..., N]`` in ``x.dtype``."""


def spec_of(weights: SinqWeights) -> LayerSpec:
    return LayerSpec(
        nbits=weights.nbits,
        group_size=weights.group_size,
        out_features=weights.out_features,
        in_features=weights.in_features,
        shard_offsets=tuple(weights.shard_offsets),
        codebook=weights.codebook,
    )


def pad_shard_rows(t: torch.Tensor, shard_offsets, multiple: int) -> torch.Tensor:
    """Rows of each merged-layer shard padded with zeros to a multiple of ``multiple``, concatenated.

    Resident layouts pad per shard so that every tile of ``multiple`` rows belongs to one
    shard and needs one column-scale row only.
    """
    parts = []
    for a, b in zip(shard_offsets[:-1], shard_offsets[1:]):
        rows = b - a
        padded = -(-rows // multiple) * multiple
        part = t[a:b]
        if padded != rows:
            part = torch.cat([part, part.new_zeros((padded - rows, *t.shape[1:]))])
        parts.append(part)
    return torch.cat(parts) if parts else t[:0]
