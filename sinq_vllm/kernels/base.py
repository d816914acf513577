"""The one op contract every SINQ kernel backend implements.

    y = concat_s( (x * t_s) @ ((Q_s - z_s) * s_s)^T ) + bias

``SinqWeights`` is the canonical, backend-neutral form of one (TP-local) layer, built
once by the loader from the checkpoint. A backend turns it into its own resident
layout once (``prepare``) and runs the op on that layout (``apply``) with no per-call
repacking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class SinqWeights:
    codes: torch.Tensor  # uint8 [N, K], values < 2**nbits
    scales: torch.Tensor  # fp16 [N, G], reference values (after quantAux dequant)
    zeros: torch.Tensor  # fp16 [N, G], float zeros in code units (never rounded)
    col_scales: torch.Tensor  # fp16 [S, K], one column scale vector per merged shard
    shard_offsets: tuple[int, ...]  # S + 1 boundaries along N: shard s = rows [o[s], o[s+1])
    nbits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight ``(Q - z) * s * t`` (for layers vLLM keeps dense)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        w = (self.codes.float().view(n, -1, g) - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
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


class KernelBackend(ABC):
    name: str = "?"

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
    )
