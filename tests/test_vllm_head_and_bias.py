"""What Transformers' SinqConfig path writes, reproduced on our own checkpoint:
a SINQ-quantized ``lm_head`` (served packed) and Linear biases missing from the
checkpoint although the config has them (zeroed with a warning, as the model that wrote
the checkpoint computes). One float32 engine, vLLM's default compiled one (eager quantized
heads: test_model_coverage's Gemma3, test_ecosystem_checkpoints); same tolerances as
test_vllm_models."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ckpt_mutation import INDEX, SIDECAR, copy_checkpoint, edit_tensors
from conftest import vllm_engine
from reference_dequant import dequantized_state_dict
from sinq_vllm.quantizer import quantize_weight
from test_vllm_models import _max_logprob_diff, _prompt_ids, _vllm_outputs

DROPPED_BIASES = ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
                  "model.layers.0.self_attn.v_proj.bias", "model.layers.1.self_attn.k_proj.bias"]


def _quantize_lm_head(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    shard = index["weight_map"]["lm_head.weight"]
    tensors = load_file(ckpt / shard)
    head = tensors.pop("lm_head.weight")
    q, meta = quantize_weight(head, 4, 64, name="lm_head")
    tensors.update({f"lm_head.{k}": v for k, v in q.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, ckpt / shard)
    index["weight_map"].pop("lm_head.weight")
    index["weight_map"].update({f"lm_head.{k}": shard for k in q})
    (ckpt / INDEX).write_text(json.dumps(index))
    side = json.loads((ckpt / SIDECAR).read_text())
    side["lm_head"] = meta.to_sidecar()
    (ckpt / SIDECAR).write_text(json.dumps(side))


def _reference_model(ckpt):
    """Transformers on the dequantized weights, with the dropped biases at zero."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = dequantized_state_dict(ckpt, torch.float32)
    for name in DROPPED_BIASES:
        rows = sd[name.replace(".bias", ".weight")].shape[0]
        sd[name] = torch.zeros(rows)
    cfg = AutoConfig.from_pretrained(str(ckpt))
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_quantized_head_and_missing_biases(sinq_factory, tmp_path):
    ckpt = copy_checkpoint(sinq_factory("qwen2", nbits=4, group_size=64), tmp_path / "hf-path-like")
    _quantize_lm_head(ckpt)
    edit_tensors(ckpt, lambda t: [t.pop(name) for name in DROPPED_BIASES if name in t])

    ref_model = _reference_model(ckpt)
    assert not torch.equal(ref_model.lm_head.weight, ref_model.model.embed_tokens.weight)

    ids_list = _prompt_ids(ckpt)
    ref_lp = []
    with torch.no_grad():
        for ids in ids_list:
            ref_lp.append(torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].float(), -1))
    with vllm_engine(ckpt, dtype="float32", enforce_eager=False) as llm:  # vLLM's default compiled engine
        lp, _ = _vllm_outputs(llm, ids_list)
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"qwen2 with quantized lm_head and dropped biases: max |logprob diff| = {diff:.3g}")
    assert diff < 1e-3, diff
