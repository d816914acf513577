"""A SINQ-quantized ``lm_head`` (what Transformers' SinqConfig writes by default),
dequantized once at load time into vLLM's ordinary unquantized head.

vLLM computes logits through ``ParallelLMHead``'s own (vocab-parallel, padded) weight;
we collect the checkpoint's SINQ tensors, rebuild ``(Q - z) * s * t`` in float32 and
hand the dense matrix to the head's own weight loader, which shards and pads it.
"""

from __future__ import annotations

import torch
from torch import nn

from .assembly import ShardSlice, assemble
from .format.layer_meta import LayerMeta
from .log import get_logger
from .receivers import add_receivers, take_raw
from .vllm_compat import UnquantizedEmbeddingMethod

logger = get_logger(__name__)


class SinqDequantizedHeadMethod(UnquantizedEmbeddingMethod):
    def __init__(self, prefix: str, meta: LayerMeta):
        super().__init__()
        self.prefix = prefix
        self.meta = meta

    def create_weights(self, layer: nn.Module, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        add_receivers(layer, self.prefix, [self.meta], [None])

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if hasattr(layer, "sinq_raw"):
            m = self.meta
            w = assemble([m], take_raw(layer), [ShardSlice(0, m.out_features, 0, m.in_features)], torch.device("cpu"))
            layer.weight.weight_loader(layer.weight, w.dequantize().to(layer.weight.dtype))
            logger.info("SINQ: '%s' is quantized in the checkpoint; dequantized once at load (%d-bit g%d)",
                        self.prefix, m.nbits, w.group_size)
        super().process_weights_after_loading(layer)
