"""Tensor parallelism on vLLM's CPU backend (two worker processes).

The checkpoint's planar packing cannot be sliced, so every rank unpacks and cuts its
rows (q/k/v, gate/up: column-parallel) or its K range (o_proj, down_proj: row-parallel,
with the column scales and groups sliced alike). Oracle: Transformers on the dequantized
weights, i.e. what tp=1 matches to 1e-5 in test_vllm_models; tolerance 1e-3 as there.
The engine is vLLM's default compiled one (each rank compiles its own graph).
"""

from __future__ import annotations


import pytest
import torch

from conftest import vllm_engine
from reference_dequant import dequantized_model
from sinq_vllm.errors import SinqCheckpointError
from test_vllm_models import GREEDY_STEPS, _max_logprob_diff, _prompt_ids, _vllm_outputs

# one KV head for two ranks (replicated k/v shards) and 4 query heads (2 per rank)
TP_MODEL = dict(num_key_value_heads=1, intermediate_size=256)


@pytest.mark.slow
def test_tp2_matches_dequantized_reference(sinq_factory, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node: one core per rank
    ckpt = sinq_factory("qwen3", nbits=4, group_size=64, lm_head=True, **TP_MODEL)  # head split over ranks too
    ids_list = _prompt_ids(ckpt)
    model = dequantized_model(ckpt, dtype=torch.float32)
    ref_lp, ref_greedy = [], []
    with torch.no_grad():
        for ids in ids_list:
            ref_lp.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1))
            ref_greedy.append(_argmax_tokens(model, ids, GREEDY_STEPS))
    with vllm_engine(ckpt, dtype="float32", tensor_parallel_size=2, enforce_eager=False) as llm:  # compiled
        lp, greedy = _vllm_outputs(llm, ids_list)  # ignore_eos: exactly GREEDY_STEPS tokens, EOS included
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"tp=2: max |logprob diff| vs dequantized Transformers = {diff:.3g}")
    assert diff < 1e-3
    assert [len(g) for g in greedy] == [GREEDY_STEPS] * len(ids_list)  # no early stop: every step compared
    eos = model.config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    print(f"tp=2: EOS {sorted(eos)} is the greedy token at {sum(t in eos for g in ref_greedy for t in g)} of "
          f"{GREEDY_STEPS * len(ids_list)} steps")
    for p, (got, want) in enumerate(zip(greedy, ref_greedy)):
        split = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert split is None, f"prompt {p}: greedy tokens split at step {split}"


def _argmax_tokens(model, ids: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens by plain argmax on the raw logits, EOS like any other token: what
    vLLM does with ``ignore_eos``. (``generate(min_new_tokens=...)`` would instead mask EOS out
    of the argmax, and without it generation stops at EOS; on random tiny models EOS can win a
    step, so either way the two sides would stop comparing the same thing.)"""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_row_parallel_split_off_group_boundary_is_refused():
    """K / tp not a multiple of the group size: a clear error naming the layer and the tp sizes that work."""
    from sinq_vllm.format.layer_meta import LayerMeta
    from sinq_vllm.vllm.linear import SinqLinearMethod
    from sinq_vllm.vllm.compat import RowParallelLinear

    meta = LayerMeta("model.layers.0.mlp.down_proj", 4, 64, 64, 128, 192, "sinq_quantAux", "4bit_u8", True,
                     (384, 1), (384, 1), None)
    layer = RowParallelLinear.__new__(RowParallelLinear)  # shape check only: no TP group needed
    torch.nn.Module.__init__(layer)
    method = SinqLinearMethod("model.layers.0.mlp.down_proj", [meta])
    with pytest.raises(SinqCheckpointError, match=r"down_proj.*192 input features.*group size 64.*work: \[1, 3\]"):
        method.create_weights(layer, 96, [128], 192, 128, torch.float32, weight_loader=None)
