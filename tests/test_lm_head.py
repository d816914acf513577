"""A SINQ-quantized output head served packed (``SinqLMHeadMethod``) and the quantizer's
``lm_head=True`` option.

Layer level: the head's vocabulary-parallel part for every rank of tp = 1 and 2, with a
vocabulary that vLLM pads (520 -> 576 rows), against the float32 oracle; padding rows
must give exactly 0. Tolerance as in test_layer_loading: 2e-4 of the output magnitude
with float32 activations, 2e-2 with bf16. End to end, test_model_coverage serves a tied
Gemma3 whose head is quantized and test_tensor_parallel a quantized head at tp=2.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from reference_dequant import reference_linear
from sinq_vllm.format.names import SIDECAR_NAME
from sinq_vllm.vllm.lm_head import SinqLMHeadMethod
from sinq_vllm.quantizer import quantize_weight
from sinq_vllm.vllm.compat import ParallelLMHead
from test_layer_loading import BACKENDS, TOL, _weight

VOCAB, HIDDEN, PAD_TO = 520, 256, 64


def _head_layer(tp_rank: int, tp_size: int, dtype: torch.dtype) -> nn.Module:
    """The attributes of a ParallelLMHead that the method reads, without a TP group."""
    padded = -(-VOCAB // PAD_TO) * PAD_TO
    layer = nn.Module()
    layer.org_vocab_size = VOCAB
    layer.params_dtype = dtype
    layer.shard_indices = ParallelLMHead._get_indices(padded, padded, VOCAB, VOCAB, tp_rank, tp_size)
    layer.num_embeddings_per_partition = padded // tp_size
    return layer


def _load(method: SinqLMHeadMethod, layer: nn.Module, tensors: dict) -> None:
    method.create_weights(layer, HIDDEN, [layer.num_embeddings_per_partition], HIDDEN, VOCAB, layer.params_dtype)
    for _, param in list(layer.named_parameters()):
        param.weight_loader(param, tensors[param.sinq_key])
    method.process_weights_after_loading(layer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_rank_parts_match_oracle(backend, tp_size, dtype, monkeypatch):
    monkeypatch.setenv("SINQ_VLLM_BACKEND", backend)
    tensors, meta = quantize_weight(_weight(VOCAB, HIDDEN, 11), 4, 64, name="lm_head")
    x = torch.randn(3, HIDDEN)
    ref = reference_linear(x, tensors, meta.to_sidecar()["meta"])
    parts = []
    for rank in range(tp_size):
        layer = _head_layer(rank, tp_size, dtype)
        method = SinqLMHeadMethod("lm_head", meta)
        _load(method, layer, tensors)
        assert not hasattr(layer, "W_q")  # receivers replaced by the backend's packed tensors
        y = method.apply(layer, x.to(dtype))
        assert y.shape == (3, layer.num_embeddings_per_partition) and y.dtype == dtype
        si = layer.shard_indices
        rows = si.org_vocab_end_index - si.org_vocab_start_index
        assert torch.count_nonzero(y[:, rows:]) == 0, "padding rows must give exactly 0"
        parts.append(y[:, :rows].float())
    got = torch.cat(parts, 1)
    err = (got - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


def test_head_shape_mismatch_is_named():
    from sinq_vllm.errors import SinqCheckpointError

    _, meta = quantize_weight(_weight(VOCAB - 8, HIDDEN, 1), 4, 64, name="lm_head")
    layer = _head_layer(0, 1, torch.float32)
    with pytest.raises(SinqCheckpointError, match=r"'lm_head'.*\[512, 256\].*\[520, 256\]"):
        SinqLMHeadMethod("lm_head", meta).create_weights(layer, HIDDEN, [576], HIDDEN, VOCAB, torch.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_quantizer_lm_head_option(model_factory, tmp_path, tied):
    """Tied: the head is made from the embedding, the config is untied, the embedding stays.
    Untied: the head's own weight is quantized. Either way lm_head leaves modules_to_not_convert."""
    from safetensors import safe_open

    from sinq_vllm.quantizer import quantize_model

    src = model_factory("qwen3", tie_word_embeddings=tied)
    out = tmp_path / "q"
    quantize_model(src, out, nbits=4, group_size=64, progress=False, lm_head=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head" not in cfg["quantization_config"]["modules_to_not_convert"]
    assert "lm_head" in json.loads((out / SIDECAR_NAME).read_text())
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            keys |= set(h.keys())
    assert {"lm_head.W_q", "lm_head.meta.scale2", "model.embed_tokens.weight"} <= keys
    assert "lm_head.weight" not in keys
    # the head is the quantized embedding (tied) or the head's own weight (untied)
    with safe_open(next(src.glob("*.safetensors")), framework="pt") as h:
        source = h.get_tensor("model.embed_tokens.weight" if tied else "lm_head.weight")
    expected, _ = quantize_weight(source, 4, 64, name="lm_head")
    with safe_open(next(f for f in out.glob("*.safetensors") if "lm_head.W_q" in safe_open(f, "pt").keys()),
                   framework="pt") as h:
        assert torch.equal(h.get_tensor("lm_head.W_q"), expected["W_q"])
