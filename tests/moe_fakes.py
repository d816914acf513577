"""Helpers (not a test module): drive ``SinqMoEMethod`` without a vLLM engine.

:func:`fake_routed_experts` builds a stand-in for vLLM's ``RoutedExperts`` with just the
attributes the method reads (MoE config, tensor-parallel rank, expert map), then
:func:`load_experts` feeds SINQ checkpoint tensors through the receivers exactly as
``RoutedExperts.load_weights`` does (``weight_loader(param=, loaded_weight=, weight_name=,
shard_id=, expert_id=, return_success=True)``) and runs ``process_weights_after_loading``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from reference_dequant import dequant_layer

PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def make_checkpoint_experts(num_experts, hidden, inter, group=64, nbits=4, seed=0):
    """``{(e, shard_id): (tensors, sidecar meta)}`` of SINQ-quantized random experts."""
    from sinq_vllm.quantizer import quantize_weight

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(num_experts):
        for sid, proj in PROJ.items():
            shape = (hidden, inter) if sid == "w2" else (inter, hidden)
            w = (0.08 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            tensors, meta = quantize_weight(w, nbits, group, "sinq", True, name=f"model.layers.0.mlp.experts.{e}.{proj}")
            out[(e, sid)] = (tensors, meta)
    return out


class FakeRoutedExperts(nn.Module):
    def __init__(self, num_experts, hidden, inter, tp_rank=0, tp_size=1, dtype=torch.float32):
        super().__init__()
        from sinq_vllm.vllm.moe import MoEActivation

        self.moe_config = SimpleNamespace(
            activation=MoEActivation.SILU, is_act_and_mul=True, has_bias=False, intermediate_size=inter,
            hidden_dim=hidden, num_logical_experts=num_experts,
            moe_parallel_config=SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size),
        )
        self.params_dtype = dtype
        self.local_num_experts = num_experts
        self.expert_map = None
        self.apply_router_weight_on_input = False
        self.tp_size = tp_size

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        return expert_id


def load_experts(ckpt, num_experts, hidden, inter, tp_rank=0, tp_size=1, prefix="model.layers.0.mlp.experts"):
    """(method, layer) after create_weights, loading and process_weights_after_loading."""
    from sinq_vllm.vllm.moe import SinqMoEMethod

    layer = FakeRoutedExperts(num_experts, hidden, inter, tp_rank, tp_size)
    metas = {sid: [ckpt[(e, sid)][1] for e in range(num_experts)] for sid in PROJ}
    method = SinqMoEMethod(layer.moe_config, prefix, metas)
    method.create_weights(layer, layer.local_num_experts, hidden, inter // tp_size, torch.float32)
    for (e, sid), (tensors, _) in ckpt.items():
        family = "w2" if sid == "w2" else "w13"
        local = layer._map_global_expert_id_to_local_expert_id(e) >= 0
        for key, tensor in tensors.items():
            param = getattr(layer, f"{family}_{key}")
            ok = param.weight_loader(param=param, loaded_weight=tensor, weight_name=f"{family}_{key}",
                                     shard_id=sid, expert_id=e, return_success=True)
            assert ok == local  # another expert-parallel rank's expert: not loaded here
    method.process_weights_after_loading(layer)
    return method, layer


def reference_moe_output(ckpt, x, topk_w, topk_ids, inter_slice=None):
    """float64 routed-experts output from the dequantized checkpoint; ``inter_slice`` keeps
    one tensor-parallel rank's part of the intermediate dimension (a partial sum)."""
    dq = {k: dequant_layer(t, m.to_sidecar()["meta"]).double() for k, (t, m) in ckpt.items()}
    sl = inter_slice or slice(None)
    out = torch.zeros(x.shape[0], dq[(0, "w2")].shape[0], dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            xm = x[m].double()
            g, u = dq[(e, "w1")][sl] @ xm, dq[(e, "w3")][sl] @ xm
            out[m] += float(topk_w[m, j]) * (dq[(e, "w2")][:, sl] @ (torch.nn.functional.silu(g) * u))
    return out
