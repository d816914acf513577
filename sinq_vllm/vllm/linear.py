"""``SinqLinearMethod``: how a vLLM linear layer holds and runs SINQ weights.

Loading happens in two steps, because the checkpoint layout cannot be sliced:
* ``create_weights`` registers *receiver* parameters under the checkpoint's own
  tensor names (``W_q``, ``meta.scale2``, ``meta.scale.x`` ...) so that vLLM's
  model loaders route every tensor, with its merged-shard id, to our weight loader,
  which keeps the raw tensor per shard;
* ``process_weights_after_loading`` validates and decodes every shard, cuts this
  tensor-parallel rank's part, lets the chosen kernel backend repack it once, and
  replaces the receivers with the backend's resident (still packed) tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SinqCheckpointError
from ..format.layer_meta import LayerMeta
from ..kernels.contract import SinqWeights, spec_of
from ..kernels.selection import select_backend
from ..log import get_logger
from .assembly import ShardSlice, assemble, check_k_split
from .compat import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from .receivers import add_receivers, take_raw

logger = get_logger(__name__)

_RESIDENT_PREFIX = "sinq_"


class SinqLinearMethod(LinearMethodBase):
    def __init__(self, prefix: str, metas: list[LayerMeta], has_bias: list[bool] | None = None):
        self.prefix = prefix
        self.metas = metas
        self.has_bias = has_bias if has_bias is not None else [True] * len(metas)
        self.backend = None
        self.spec = None
        self.resident_keys: tuple[str, ...] = ()

    # ---- parameters -------------------------------------------------------------------
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        full_sizes = _checkpoint_out_sizes(layer, output_size)
        self._check_shapes(layer, full_sizes, input_size, input_size_per_partition)
        layer.sinq_partition = (list(output_partition_sizes), input_size_per_partition)
        add_receivers(layer, self.prefix, self.metas, _shard_ids(layer, len(self.metas)))

    def _check_shapes(self, layer, full_sizes, input_size, input_per_partition) -> None:
        if len(full_sizes) != len(self.metas):
            raise SinqCheckpointError(
                f"layer '{self.prefix}' merges {len(full_sizes)} modules but the checkpoint has {len(self.metas)}"
            )
        kinds = {(m.aux, m.nbits, m.group_size, m.codebook) for m in self.metas}
        if len(kinds) > 1:
            names = ", ".join(m.name for m in self.metas)
            raise SinqCheckpointError(
                f"modules {names} are merged into vLLM layer '{self.prefix}' but were quantized with different "
                "options (bits, group size, quantAux or NF codebook); re-quantize them alike"
            )
        for meta, n in zip(self.metas, full_sizes):
            if (meta.out_features, meta.in_features) != (n, input_size):
                raise SinqCheckpointError(
                    f"layer '{meta.name}': sidecar shape [{meta.out_features}, {meta.in_features}] does not match "
                    f"the model config's [{n}, {input_size}]"
                )
        if isinstance(layer, RowParallelLinear):
            check_k_split(f"layer '{self.prefix}'", input_size, input_per_partition, self.metas[0].group_size)

    # ---- after loading ------------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "sinq_raw"):
            return  # already processed (vLLM may call this twice, e.g. on weight reload paths)
        device = layer.W_q.device
        parts = self._rank_parts(layer)
        weights = assemble(self.metas, take_raw(layer), parts, device)
        self._zero_biases_the_checkpoint_lacks(layer)
        del layer.sinq_partition
        self.install(layer, weights)

    def install(self, layer: nn.Module, weights: SinqWeights) -> None:
        """Pick the kernel backend for this layer and keep its packed, resident layout."""
        self.spec = spec_of(weights)
        self.backend = select_backend(self.spec, layer.params_dtype, weights.codes.device, self.prefix)
        resident = self.backend.prepare(weights)
        for key, tensor in resident.items():
            layer.register_parameter(_RESIDENT_PREFIX + key, nn.Parameter(tensor, requires_grad=False))
        self.resident_keys = tuple(resident)

    def _zero_biases_the_checkpoint_lacks(self, layer: nn.Module) -> None:
        """Transformers' SinqConfig path saves no biases; its own forward then runs without
        them, so zero (never leave uninitialised) the bias rows the checkpoint lacks."""
        bias = getattr(layer, "bias", None)
        if bias is None or all(self.has_bias):
            return
        partition_sizes, _ = layer.sinq_partition
        row = 0
        for size, present in zip(partition_sizes, self.has_bias):
            if not present:
                bias.data[row : row + size].zero_()
            row += size
        missing = [m.name for m, present in zip(self.metas, self.has_bias) if not present]
        _warn_missing_bias(missing)

    def _rank_parts(self, layer: nn.Module) -> list[ShardSlice]:
        partition_sizes, k_local = layer.sinq_partition
        tp_rank = getattr(layer, "tp_rank", 0)
        parts = []
        for i, meta in enumerate(self.metas):
            n, k = meta.out_features, meta.in_features
            if isinstance(layer, RowParallelLinear):
                parts.append(ShardSlice(0, n, tp_rank * k_local, (tp_rank + 1) * k_local))
            elif isinstance(layer, ReplicatedLinear):
                parts.append(ShardSlice(0, n, 0, k))
            else:
                rows = partition_sizes[i]
                index = tp_rank
                if isinstance(layer, QKVParallelLinear) and i > 0:
                    index = tp_rank // layer.num_kv_head_replicas
                parts.append(ShardSlice(index * rows, (index + 1) * rows, 0, k))
        return parts

    # ---- forward ---------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = {k: getattr(layer, _RESIDENT_PREFIX + k) for k in self.resident_keys}
        return self.backend.apply(tensors, self.spec, x, bias)


def _checkpoint_out_sizes(layer: nn.Module, output_size: int) -> list[int]:
    """Rows of each checkpoint module the layer merges. vLLM's QKV ``output_sizes`` count
    replicated KV heads once per rank when tp > num_kv_heads; the checkpoint has each once."""
    if isinstance(layer, QKVParallelLinear):
        kv = layer.total_num_kv_heads
        return [layer.total_num_heads * layer.head_size, kv * layer.head_size, kv * layer.v_head_size]
    return list(getattr(layer, "output_sizes", None) or [output_size])


def _shard_ids(layer: nn.Module, count: int) -> list:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"][:count]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(count))
    return [None]


_bias_warned = False


def _warn_missing_bias(modules: list[str]) -> None:
    global _bias_warned
    if not _bias_warned:
        _bias_warned = True
        logger.warning(
            "SINQ checkpoint has no bias for %s (and maybe other layers) although the model config has "
            "biases; they are set to zero, as in the model that wrote it (Transformers' SinqConfig path "
            "drops Linear biases). Re-quantize with `sinq-vllm quantize` to keep them.", ", ".join(modules),
        )
