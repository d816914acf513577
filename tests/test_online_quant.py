"""Online quantization: a plain bf16 checkpoint served with SINQ, quantized while loading.

Oracle: the offline quantizer on the same weights (no quantAux, as online defaults),
dequantized into Transformers. With tp=1 both quantize the same bf16 values, so the
tolerance is the one of test_vllm_models (1e-3 in log-probability). The engine is vLLM's
default compiled one."""

from __future__ import annotations

import pytest
import torch

from conftest import vllm_engine
from reference_dequant import dequantized_model
from sinq_vllm.errors import SinqConfigError
from sinq_vllm.vllm.memory import sinq_weight_bytes
from sinq_vllm.vllm.online import OnlineOptions, options_from_config, options_from_env
from test_vllm_models import _max_logprob_diff, _prompt_ids, _vllm_outputs


def test_online_engine_matches_offline_quantization(model_factory, sinq_factory):
    bf16 = model_factory("llama")
    offline = sinq_factory("llama", nbits=4, group_size=64, aux=False)
    ids_list = _prompt_ids(bf16)
    model = dequantized_model(offline, dtype=torch.float32)
    with torch.no_grad():
        ref_lp = [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in ids_list]
    overrides = {"quantization_config": {"quant_method": "sinq", "online": True, "nbits": 4, "group_size": 64}}
    with vllm_engine(bf16, dtype="float32", hf_overrides=overrides, enforce_eager=False) as llm:  # compiled
        lp, _ = _vllm_outputs(llm, ids_list)
        mem = llm.apply_model(sinq_weight_bytes)[0]
    diff = _max_logprob_diff(ids_list, lp, ref_lp)
    print(f"online SINQ vs offline quantization: max |logprob diff| = {diff:.3g}; {mem}")
    assert diff < 1e-3
    assert mem["sinq_layers"] == 8 and mem["sinq_bytes"] < 0.36 * mem["bf16_equivalent_bytes"]


def test_online_options_from_env(monkeypatch):
    monkeypatch.delenv("SINQ_VLLM_ONLINE", raising=False)
    assert options_from_env() is None
    monkeypatch.setenv("SINQ_VLLM_ONLINE", "1")
    assert options_from_env() == OnlineOptions()
    monkeypatch.setenv("SINQ_VLLM_ONLINE", "nbits=3,group_size=128,method=rtn,aux=1")
    assert options_from_env() == OnlineOptions(3, 128, "rtn", True)
    for bad, pattern in [("nbits=7", "valid values"), ("bits=4", "expected '1' or"), ("group_size=50", "multiple of 8"),
                         ("method=awq", "valid values")]:
        monkeypatch.setenv("SINQ_VLLM_ONLINE", bad)
        with pytest.raises(SinqConfigError, match=pattern):
            options_from_env()


def test_online_options_from_quantization_config():
    assert options_from_config({"quant_method": "sinq", "nbits": 4}) is None
    assert options_from_config({"quant_method": "sinq", "online": True, "group_size": 128}) == OnlineOptions(group_size=128)
