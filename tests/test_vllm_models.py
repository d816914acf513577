"""Model level: SINQ checkpoints served by vLLM match Transformers on the dequantized weights.

Tolerances. float32 engines: the only difference from the oracle is the order of the
column-scale multiply (x*t then W vs x then W*t), so log-probabilities agree to 1e-3
and greedy decoding must be identical. bfloat16 engines round activations and weights
to 8 mantissa bits in both stacks, differently: we allow 0.15 in log-probability and
require the same greedy tokens only for the first steps where both are far from ties.

Engines: one runs vLLM's default compiled engine (``enforce_eager=False``, what ``vllm
serve`` does), the others eager.
"""

from __future__ import annotations

import pytest
import torch

from conftest import vllm_engine
from reference_dequant import dequantized_model
from sinq_vllm.vllm.memory import sinq_weight_bytes

PROMPTS = ["The quick brown fox", "Once upon a time there was a little", "In the beginning"]
GREEDY_STEPS = 32


def _prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]


def _reference(model_dir, ids_list, dtype):
    model = dequantized_model(model_dir, dtype=dtype)
    logprobs, greedy = [], []
    with torch.no_grad():
        for ids in ids_list:
            logits = model(torch.tensor([ids])).logits[0].float()
            logprobs.append(torch.log_softmax(logits, -1))
            out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False,
                                 min_new_tokens=GREEDY_STEPS, pad_token_id=0)
            greedy.append(out[0, len(ids):].tolist())
    return logprobs, greedy


def _vllm_outputs(llm, ids_list):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=GREEDY_STEPS, temperature=0, prompt_logprobs=0,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in ids_list], params, use_tqdm=False)
    prompt_lp = [[None] + [pl[ids[i]].logprob for i, pl in enumerate(o.prompt_logprobs) if i > 0]
                 for o, ids in zip(outs, ids_list)]
    return prompt_lp, [list(o.outputs[0].token_ids) for o in outs]


def _max_logprob_diff(ids_list, vllm_lp, ref_lp):
    worst = 0.0
    for ids, v, r in zip(ids_list, vllm_lp, ref_lp):
        for i in range(1, len(ids)):
            worst = max(worst, abs(v[i] - r[i - 1, ids[i]].item()))
    return worst


@pytest.mark.parametrize("arch, eager", [("qwen3", True), ("llama", False)], ids=["qwen3-eager", "llama-compiled"])
def test_float32_engine_matches_dequantized_transformers(arch, eager, sinq_factory):
    """Llama runs on vLLM's default compiled engine (torch.compile of the model with the SINQ
    ops opaque), Qwen3 eager: the same tolerance holds on both."""
    ckpt = sinq_factory(arch, nbits=4, group_size=64)
    ids_list = _prompt_ids(ckpt)
    ref_lp, ref_greedy = _reference(ckpt, ids_list, torch.float32)
    with vllm_engine(ckpt, dtype="float32", enforce_eager=eager) as llm:
        lp, greedy = _vllm_outputs(llm, ids_list)
        mem = llm.apply_model(sinq_weight_bytes)[0]
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"{arch}: max |logprob diff| vs dequantized Transformers (fp32) = {diff:.3g}; memory {mem}")
    assert diff < 1e-3, f"max |logprob diff| {diff}"
    assert greedy == ref_greedy
    # weights stay packed: 4-bit codes + per-group scale/zero ~ 0.28-0.32x of bf16
    assert mem["sinq_layers"] == 2 * 4  # qkv, o, gate_up, down per layer
    assert mem["sinq_bytes"] < 0.36 * mem["bf16_equivalent_bytes"], mem


def test_bfloat16_engine_close_to_dequantized_transformers(sinq_factory):
    ckpt = sinq_factory("qwen3", nbits=4, group_size=64)
    ids_list = _prompt_ids(ckpt)
    ref_lp, ref_greedy = _reference(ckpt, ids_list, torch.float32)
    with vllm_engine(ckpt, dtype="bfloat16", quantization="sinq") as llm:
        lp, greedy = _vllm_outputs(llm, ids_list)
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"qwen3 bf16 engine: max |logprob diff| vs dequantized Transformers (fp32) = {diff:.3g}")
    assert diff < 0.15, f"max |logprob diff| {diff}"
    assert all(g[:4] == r[:4] for g, r in zip(greedy, ref_greedy))
