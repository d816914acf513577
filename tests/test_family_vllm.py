"""NF4/NF3 checkpoints written by ``sinq-vllm quantize`` served by vLLM (float32 engines).

Oracle: Transformers on the dequantized weights (``tests/reference_dequant.py``, which looks
the codes up in its own copy of the codebooks, fp16-rounded as the reference computes). As
for uniform checkpoints (test_vllm_models.py) the engines differ from it only by where ``t``
is multiplied and by summation order: max |prompt log-prob diff| < 1e-3 and identical greedy
tokens. Checkpoints written by the reference itself are in test_ecosystem_checkpoints.py.

* MoE: Qwen3-MoE with NF3 experts (per-expert loop: the Triton MoE kernel computes uniform
  codes only) and NF3 dense layers (merged q/k/v and gate/up);
* tensor parallelism: tp=2 with NF4 layers and an NF4 ``lm_head`` split over the vocabulary.

With only the torch backend computing codebooks for now, ``auto`` selection on CPU uses it
(with a log line naming the skipped backend).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import vllm_engine
from reference_dequant import dequantized_model
from test_tensor_parallel import TP_MODEL
from test_vllm_models import GREEDY_STEPS, _max_logprob_diff, _prompt_ids, _vllm_outputs
from test_vllm_moe import MOE, _check_engine


def _methods(ckpt) -> set[str]:
    side = json.loads((ckpt / "model.safetensors.index.json.meta.json").read_text())
    return {e["meta"]["method"] for e in side.values()}


def test_nf3_moe_experts_match_dequantized_transformers(sinq_factory):
    ckpt = sinq_factory("qwen3_moe", nbits=3, method="sinq_nf3", **MOE)
    assert _methods(ckpt) == {"sinq_nf3_quantAux"}
    experts = "model.layers.0.mlp.experts.routed_experts"
    diff, same_greedy, mem = _check_engine(ckpt, {experts: "SinqMoEMethod", experts + ":kernel": "loop",
                                                  experts + ":leftovers": []})
    print(f"qwen3_moe NF3: max |logprob diff| vs dequantized Transformers (fp32) = {diff:.3g}; memory {mem}")
    assert diff < 1e-3, f"max |logprob diff| {diff}"
    assert same_greedy
    assert mem["sinq_moe_layers"] == 2


@pytest.mark.slow
def test_nf4_tp2_with_quantized_head_matches_dequantized_transformers(sinq_factory, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node: one core per rank
    ckpt = sinq_factory("qwen3", nbits=4, method="sinq_nf4", lm_head=True, **TP_MODEL)
    assert _methods(ckpt) == {"sinq_nf4_quantAux"}
    ids_list = _prompt_ids(ckpt)
    model = dequantized_model(ckpt, dtype=torch.float32)
    ref_lp, ref_greedy, ref_margins = [], [], []
    with torch.no_grad():
        for ids in ids_list:
            ref_lp.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1))
            # plain argmax on the raw logits, as vLLM with ignore_eos (generate()'s min_new_tokens
            # would mask EOS, which vLLM may emit)
            seq, margins = list(ids), []
            for _ in range(GREEDY_STEPS):
                top2 = model(torch.tensor([seq])).logits[0, -1].float().topk(2)
                margins.append(float(top2.values[0] - top2.values[1]))
                seq.append(int(top2.indices[0]))
            ref_greedy.append(seq[len(ids):])
            ref_margins.append(margins)
    with vllm_engine(ckpt, dtype="float32", tensor_parallel_size=2) as llm:
        lp, greedy = _vllm_outputs(llm, ids_list)
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"NF4 tp=2 with NF4 lm_head: max |logprob diff| vs dequantized Transformers = {diff:.3g}")
    assert diff < 1e-3
    for p, (got, want, margins) in enumerate(zip(greedy, ref_greedy, ref_margins)):
        if got != want:  # random tiny weights give near-ties: a split is allowed only at one
            step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            print(f"prompt {p}: greedy tokens agree for {step} steps, then split at a top-2 logit margin of "
                  f"{margins[step]:.3g}")
            assert margins[step] < 1e-4, f"prompt {p}: greedy differs at step {step}, margin {margins[step]:.3g}"
