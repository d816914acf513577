"""Coverage beyond Llama/Qwen: each architecture of the README's matrix, served from a
tiny random SINQ checkpoint by a float32 engine, matches Transformers on the dequantized
weights (tolerance 1e-3 in log-probability, as in test_vllm_models)."""

from __future__ import annotations

import pytest
import torch

from conftest import vllm_engine
from reference_dequant import dequantized_model
from test_vllm_models import _max_logprob_diff, _prompt_ids, _vllm_outputs


@pytest.mark.parametrize("arch, nbits, group, aux, head", [
    ("qwen2", 8, 64, False, False),   # attention biases; 8-bit; plain fp16 scales/zeros
    ("mistral", 3, 64, True, False),  # 3-bit, int32 planar packing
    # GeLU MLP, sliding + full attention; tied head quantized (untied, served packed)
    ("gemma3", 4, 128, True, True),
])
def test_architecture(arch, nbits, group, aux, head, sinq_factory):
    ckpt = sinq_factory(arch, nbits=nbits, group_size=group, aux=aux, lm_head=head, intermediate_size=256)
    ids_list = _prompt_ids(ckpt)
    model = dequantized_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        ref_lp = [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in ids_list]
    with vllm_engine(ckpt, dtype="float32") as llm:
        lp, _ = _vllm_outputs(llm, ids_list)
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"{arch} {nbits}-bit g{group} {'aux' if aux else 'no-aux'}{' quantized head' if head else ''}: "
          f"max |logprob diff| = {diff:.3g}")
    assert diff < 1e-3
