"""A SINQ-quantized ``lm_head`` served packed, through the same kernel backends as the
linear layers.

Transformers' ``SinqConfig`` quantizes the output head by default, and ``sinq-vllm
quantize --quantize-lm-head`` does on request. The head is often the largest matrix
of a small model (Qwen3-0.6B: 151936 x 1024, a quarter of its weights) and it is read
in full for every decoded token, so keeping it at 4 bits matters for both memory and
decode speed.

vLLM's ``ParallelLMHead`` splits the vocabulary over tensor-parallel ranks and pads
each rank's part; vLLM's ``LogitsProcessor`` calls ``quant_method.apply(head, h)`` and
then drops the padding columns. This rank gets its rows of the original vocabulary,
followed by zero rows (code 0, scale 0: logits exactly 0) up to the padded size.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import SinqCheckpointError
from ..format.layer_meta import LayerMeta
from ..kernels.contract import SinqWeights
from ..log import get_logger
from .assembly import ShardSlice, assemble
from .compat import QuantizeMethodBase
from .linear import SinqLinearMethod
from .receivers import add_receivers, take_raw

logger = get_logger(__name__)


class SinqLMHeadMethod(QuantizeMethodBase):
    def __init__(self, prefix: str, meta: LayerMeta):
        super().__init__()
        self.prefix = prefix
        self.meta = meta
        # one checkpoint module, no bias: the linear method's install/apply fit as they are
        self.linear = SinqLinearMethod(prefix, [meta], has_bias=[False])

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        m = self.meta
        if (m.out_features, m.in_features) != (layer.org_vocab_size, input_size):
            raise SinqCheckpointError(
                f"layer '{self.prefix}': sidecar shape [{m.out_features}, {m.in_features}] does not match the "
                f"model config's vocabulary and hidden size [{layer.org_vocab_size}, {input_size}]"
            )
        add_receivers(layer, self.prefix, [m], [None])

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "sinq_raw"):
            return
        si = layer.shard_indices
        part = ShardSlice(si.org_vocab_start_index, si.org_vocab_end_index, 0, self.meta.in_features)
        device = layer.W_q.device
        weights = assemble([self.meta], take_raw(layer), [part], device)
        weights = _pad_rows(weights, layer.num_embeddings_per_partition)
        self.linear.install(layer, weights)
        logger.info("SINQ: '%s' is served packed (%d-bit g%d, %d vocabulary rows on this rank)",
                    self.prefix, self.meta.nbits, weights.group_size, part.row1 - part.row0)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear.apply(layer, x, bias)

    def embedding(self, layer: nn.Module, input_: torch.Tensor) -> torch.Tensor:
        raise SinqCheckpointError(f"'{self.prefix}' is a SINQ-quantized output head, not an input embedding")

    def tie_weights(self, layer: nn.Module, embed_tokens: nn.Module) -> nn.Module:
        # SinqConfig unties the model config when the head is quantized, so vLLM should
        # never ask; if a model ties anyway, keep the quantized head (its tensors are
        # then required at load, and their absence is reported by name).
        return layer


def _pad_rows(w: SinqWeights, rows: int) -> SinqWeights:
    extra = rows - w.out_features
    if extra <= 0:
        return w

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((extra, t.shape[1]))])

    return dataclasses.replace(w, codes=pad(w.codes), scales=pad(w.scales), zeros=pad(w.zeros), shard_offsets=(0, rows))
