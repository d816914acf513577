"""Mixture-of-experts through vLLM: a tiny random Qwen3-MoE (16 experts, top-2, layer 1 a
dense MLP), quantized with SINQ, served by a float32 vLLM CPU engine and compared with
Transformers carrying the dequantized weights (tests/reference_dequant.py stacks the
per-expert SINQ tensors into Transformers' fused expert parameters).

* SINQ experts, bf16 router (the default): vLLM's router picks the experts, SinqMoEMethod
  runs them (per-expert SINQ op on CPU);
* bf16 experts, SINQ router gate (``experts=False, routers=True``, the layout the reference
  code writes): vLLM's unquantized fused-MoE method, the gate through SinqLinearMethod.

The SINQ-experts engine is vLLM's default compiled one (``enforce_eager=False``), the other
eager (the eager per-expert op is also checked layer by layer in test_moe_method.py).

Tolerance: float32 engines differ from the oracle only in the order of the column-scale
multiply and in summation order, so prompt log-probabilities agree to 1e-3 and greedy
decoding is identical (routing near-ties would show up as a large difference).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import vllm_engine
from test_vllm_models import _max_logprob_diff, _prompt_ids, _reference, _vllm_outputs
from sinq_vllm.vllm.memory import sinq_weight_bytes

MOE = dict(num_hidden_layers=3, mlp_only_layers=[1])


def _sidecar(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json.meta.json").read_text())


def _moe_layer_methods(model):
    from sinq_vllm.vllm.moe import SinqMoEMethod

    out = {}
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if name.endswith("routed_experts") or name.endswith(".mlp.gate"):
            out[name] = type(qm).__name__
        if isinstance(qm, SinqMoEMethod):
            out[name + ":kernel"] = qm.kernel
            # the receivers (w13_W_q, w13_meta.scale.x ...) and the raw tensors are gone after loading
            out[name + ":leftovers"] = sorted(k for k in vars(mod) if k.startswith(("w13_", "w2_", "sinq_moe_")))
            out[name + ":resident"] = sorted(n for n, _ in mod.named_parameters(recurse=False))
    return out


def test_quantizer_writes_per_expert_sinq_modules(sinq_factory):
    ckpt = sinq_factory("qwen3_moe", **MOE)
    side = _sidecar(ckpt)
    experts = [n for n in side if ".mlp.experts." in n]
    assert len(experts) == 2 * 16 * 3  # 2 MoE layers x 16 experts x gate/up/down
    assert side["model.layers.0.mlp.experts.7.down_proj"]["meta"]["shape"] == [128, 64]
    assert side["model.layers.0.mlp.experts.7.gate_proj"]["meta"]["shape"] == [64, 128]
    assert "model.layers.1.mlp.gate_proj" in side  # the dense MLP layer
    assert not any(n.endswith(".mlp.gate") for n in side)  # router kept in bf16 by default
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.gate.weight" in index
    assert "model.layers.0.mlp.experts.3.up_proj.W_q" in index
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in index)
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in cfg["modules_to_not_convert"]


def _check_engine(ckpt, expect_methods, eager=True):
    ids_list = _prompt_ids(ckpt)
    ref_lp, ref_greedy = _reference(ckpt, ids_list, torch.float32)
    with vllm_engine(ckpt, dtype="float32", enforce_eager=eager) as llm:
        lp, greedy = _vllm_outputs(llm, ids_list)
        methods = llm.apply_model(_moe_layer_methods)[0]
        mem = llm.apply_model(sinq_weight_bytes)[0]
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    for key, value in expect_methods.items():
        assert methods[key] == value, methods
    return diff, greedy == ref_greedy, mem


def test_sinq_experts_float32_engine_matches_dequantized_transformers(sinq_factory):
    ckpt = sinq_factory("qwen3_moe", **MOE)
    experts = "model.layers.0.mlp.experts.routed_experts"
    diff, same_greedy, mem = _check_engine(ckpt, {
        experts: "SinqMoEMethod",
        experts + ":kernel": "loop",
        experts + ":leftovers": [],
        "model.layers.2.mlp.experts.routed_experts": "SinqMoEMethod",
        "model.layers.0.mlp.gate": "UnquantizedLinearMethod",
    }, eager=False)  # vLLM's default compiled engine: the per-expert op stays opaque to torch.compile
    print(f"qwen3_moe SINQ experts: max |logprob diff| vs dequantized Transformers (fp32) = {diff:.3g}; memory {mem}")
    assert diff < 1e-3, f"max |logprob diff| {diff}"
    assert same_greedy
    # experts stay packed: 2 MoE layers, 3 x 4 dense layers (attention, dense MLP)
    assert mem["sinq_moe_layers"] == 2 and mem["sinq_layers"] == 3 * 2 + 2
    assert mem["sinq_bytes"] < 0.36 * mem["bf16_equivalent_bytes"], mem


def test_bf16_experts_with_sinq_router_gate(sinq_factory):
    # Experts left in bf16 (as the reference code leaves v5 fused experts) and the router
    # gate SINQ-quantized: R = 16 experts x 2 groups = 32 rows, the smallest quantAux layout.
    ckpt = sinq_factory("qwen3_moe", experts=False, routers=True, **MOE)
    side = _sidecar(ckpt)
    assert side["model.layers.0.mlp.gate"]["meta"]["method"] == "sinq_quantAux"
    assert not any(".mlp.experts." in n for n in side)
    diff, same_greedy, _ = _check_engine(ckpt, {
        "model.layers.0.mlp.experts.routed_experts": "UnquantizedFusedMoEMethod",
        "model.layers.0.mlp.gate": "SinqLinearMethod",
    })
    print(f"qwen3_moe bf16 experts + SINQ router: max |logprob diff| vs dequantized Transformers (fp32) = {diff:.3g}")
    assert diff < 1e-3, f"max |logprob diff| {diff}"
    assert same_greedy


def test_cli_expert_and_router_flags():
    from sinq_vllm.cli import build_parser

    args = build_parser().parse_args(["quantize", "src", "out"])
    assert args.experts is True and args.routers is False
    args = build_parser().parse_args(["quantize", "src", "out", "--no-experts", "--quantize-routers"])
    assert args.experts is False and args.routers is True


def test_partially_quantized_experts_are_refused(tmp_path):
    from sinq_vllm.errors import SinqCheckpointError
    from sinq_vllm.format.layer_meta import LayerMeta
    from sinq_vllm.vllm.moe import sinq_moe_quant_method

    class FakeExperts:  # only what the hook reads; isinstance is checked first
        pass

    assert sinq_moe_quant_method(FakeExperts(), "x", {}) is None
    meta = LayerMeta("model.layers.0.mlp.experts.0.gate_proj", 4, 64, 64, 64, 128, "sinq_quantAux", "4bit_u8",
                     True, (128, 1), (128, 1), "torch.bfloat16")
    with pytest.raises(SinqCheckpointError, match="quantize all experts"):
        _hook_with_fake_routed_experts({meta.name: meta})


def _hook_with_fake_routed_experts(metas):
    from types import SimpleNamespace

    from sinq_vllm.vllm.compat import fused_moe_api
    from sinq_vllm.vllm.moe import sinq_moe_quant_method

    routed_experts = fused_moe_api().RoutedExperts
    layer = routed_experts.__new__(routed_experts)  # no __init__: just the attributes the hook reads
    object.__setattr__(layer, "moe_config", SimpleNamespace(num_logical_experts=2))
    object.__setattr__(layer, "ckpt_gate_proj_name", "gate_proj")
    object.__setattr__(layer, "ckpt_down_proj_name", "down_proj")
    object.__setattr__(layer, "ckpt_up_proj_name", "up_proj")
    return sinq_moe_quant_method(layer, "model.layers.0.mlp.experts", metas)
