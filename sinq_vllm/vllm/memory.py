"""Resident-memory accounting of a loaded vLLM model (run inside the worker via
``LLM.apply_model``): bytes our SINQ layers hold vs the bf16 weights they replace."""

from __future__ import annotations

from torch import nn


def sinq_weight_bytes(model: nn.Module) -> dict:
    from .linear import SinqLinearMethod

    try:
        from .moe import SinqMoEMethod
    except ImportError:  # pragma: no cover - a vLLM without the fused-MoE package
        SinqMoEMethod = ()

    packed = dense_equiv = layers = 0
    moe_layers = 0
    other = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        own = list(module.parameters(recurse=False))
        if isinstance(method, SinqLinearMethod) and method.spec is not None:
            layers += 1
            spec = method.spec
            packed += sum(p.numel() * p.element_size() for n, p in module.named_parameters(recurse=False)
                          if n.startswith("sinq_"))
            dense_equiv += spec.out_features * spec.in_features * 2
        elif isinstance(method, SinqMoEMethod) and method.specs:
            moe_layers += 1  # SINQ experts: resident tensors stacked over the local experts
            experts = module.local_num_experts
            packed += sum(p.numel() * p.element_size() for n, p in module.named_parameters(recurse=False)
                          if n.startswith("sinq_"))
            dense_equiv += experts * sum(s.out_features * s.in_features * 2 for s in method.specs.values())
        else:
            other += sum(p.numel() * p.element_size() for p in own)
    return {"sinq_layers": layers, "sinq_moe_layers": moe_layers, "sinq_bytes": packed,
            "bf16_equivalent_bytes": dense_equiv, "other_param_bytes": other}
