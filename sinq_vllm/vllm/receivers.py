"""Receiver parameters: where vLLM's model loaders deliver raw SINQ checkpoint tensors.

The planar packing and the strided quantAux layout cannot be sliced per rank or per
merged shard, so a layer first collects every raw tensor of each checkpoint module it
covers (``layer.sinq_raw[shard][key]``) and decodes them once after loading.
Parameters are registered under the checkpoint's own names (``W_q``, ``meta.scale.x``
...) so that vLLM routes each tensor, with its merged-shard id, to our loader.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SinqCheckpointError
from ..format.layer_meta import LayerMeta
from ..format.tensor_specs import required_keys, stored_dtype
from .compat import set_weight_attrs


def add_receivers(layer: nn.Module, prefix: str, metas: list[LayerMeta], shard_ids: list) -> None:
    layer.sinq_raw = [dict() for _ in metas]

    def weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None):
        if loaded_shard_id not in shard_ids:
            raise SinqCheckpointError(
                f"layer '{prefix}': got {param.sinq_key} for shard {loaded_shard_id!r}, expected one of "
                f"{shard_ids} (checkpoints with pre-fused q/k/v or gate/up are not SINQ checkpoints)"
            )
        layer.sinq_raw[shard_ids.index(loaded_shard_id)][param.sinq_key] = loaded_weight.detach()

    receivers = nn.Module()
    for key in required_keys(metas[0]):
        # the dtype the checkpoint stores, so vLLM's loaders see no dtype mismatch
        param = nn.Parameter(torch.empty(0, dtype=stored_dtype(metas[0], key)), requires_grad=False)
        set_weight_attrs(param, {"weight_loader": weight_loader, "sinq_key": key})
        if key == "W_q":
            layer.register_parameter("W_q", param)
        else:
            _register_nested(receivers, key[len("meta."):], param)
    layer.register_module("meta", receivers)


def take_raw(layer: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Hand over the collected tensors and drop the receivers from the layer."""
    raw = layer.sinq_raw
    del layer.sinq_raw, layer.W_q
    del layer._modules["meta"]
    return raw


def _register_nested(root: nn.Module, dotted: str, param: nn.Parameter) -> None:
    """Register ``param`` at ``root.<dotted>``, creating plain submodules on the way."""
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.register_module(part, nn.Module())
        module = module._modules[part]
    module.register_parameter(leaf, param)
