"""Bad checkpoints and options fail with one clear error naming the file, layer or option."""

from __future__ import annotations

import pytest
import torch

from ckpt_mutation import copy_checkpoint, edit_config, edit_sidecar, edit_tensors, first_module
from sinq_vllm.errors import SinqCheckpointError, SinqConfigError


@pytest.fixture(scope="module")
def good(sinq_factory):
    return sinq_factory("llama", nbits=4, group_size=64)


@pytest.fixture
def broken(good, tmp_path):
    return copy_checkpoint(good, tmp_path / "ckpt")


def _load_config(ckpt):
    """What vLLM does in the front-end process before any engine starts."""
    from sinq_vllm.vllm.config import SinqConfig

    cfg = SinqConfig()
    cfg.maybe_update_config(str(ckpt))
    return cfg


def test_valid_checkpoint_parses(good):
    cfg = _load_config(good)
    assert len(cfg.layer_metas) == 2 * 7
    assert {m.nbits for m in cfg.layer_metas.values()} == {4}


@pytest.mark.parametrize("nbits, packing", [(1, "1bit_u8"), (7, None)])
def test_unsupported_nbits(broken, nbits, packing):
    name = first_module(broken, "q_proj")

    def mutate(side):
        side[name]["meta"]["nbits"] = nbits
        side[name]["meta"]["packing"] = packing

    edit_sidecar(broken, mutate)
    with pytest.raises(SinqCheckpointError, match=rf"{name}.*(nbits=|packing)"):
        _load_config(broken)


def test_two_d_tiling_rejected(broken):
    name = first_module(broken, "o_proj")

    def mutate(side):
        rows = side[name]["meta"]["scale.shape"][0]
        side[name]["meta"]["scale.shape"] = [rows // 64, 64, 1]

    edit_sidecar(broken, mutate)
    with pytest.raises(SinqCheckpointError, match=rf"{name}.*2D tiling"):
        _load_config(broken)


def test_two_d_tiling_in_quantization_config_rejected():
    from sinq_vllm.vllm.config import SinqConfig

    with pytest.raises(SinqCheckpointError, match="tiling_mode='2D'"):
        SinqConfig.from_config({"quant_method": "sinq", "nbits": 4, "group_size": 64, "tiling_mode": "2D"})


def test_codebook_with_wrong_bit_width_rejected(broken):
    """NF3 indexes 8 levels: a 4-bit layer labelled NF3 cannot be decoded (docs/format.md §1.4)."""
    name = first_module(broken, "gate_proj")
    edit_sidecar(broken, lambda side: side[name]["meta"].update(method="sinq_nf3_quantAux"))
    with pytest.raises(SinqCheckpointError, match=rf"{name}.*NF3 codes, which are 3-bit, but nbits=4"):
        _load_config(broken)


def test_group_size_not_dividing_k(broken):
    name = first_module(broken, "down_proj")

    def mutate(side):
        n, k = side[name]["meta"]["shape"]
        side[name]["meta"]["scale.shape"] = [n * k // 128, 1]  # group 128 does not divide K=192

    edit_sidecar(broken, mutate)
    with pytest.raises(SinqCheckpointError, match=rf"{name}.*does not divide"):
        _load_config(broken)


def test_corrupted_sidecar_json(broken):
    (broken / "model.safetensors.index.json.meta.json").write_text("{not json")
    with pytest.raises(SinqCheckpointError, match="meta.json: cannot read"):
        _load_config(broken)


def test_sidecar_missing_a_module(broken):
    name = first_module(broken, "v_proj")
    edit_sidecar(broken, lambda side: side.pop(name))
    with pytest.raises(SinqCheckpointError, match=rf"inconsistent.*{name}"):
        _load_config(broken)


def test_sidecar_lists_module_without_codes(broken):
    name = first_module(broken, "up_proj")
    edit_tensors(broken, lambda t: t.pop(name + ".W_q"))
    with pytest.raises(SinqCheckpointError, match=rf"inconsistent.*{name}.W_q"):
        _load_config(broken)


def test_not_a_sinq_checkpoint(model_factory):
    with pytest.raises(SinqCheckpointError, match="is not a SINQ checkpoint"):
        _load_config(model_factory("llama"))


def test_bad_quantization_config_options():
    from sinq_vllm.vllm.config import SinqConfig

    with pytest.raises(SinqConfigError, match=r"nbits=7 .*valid values"):
        SinqConfig.from_config({"quant_method": "sinq", "nbits": 7})
    with pytest.raises(SinqConfigError, match="group_size=50"):
        SinqConfig.from_config({"quant_method": "sinq", "group_size": 50})
    with pytest.raises(SinqConfigError, match="method='awq'"):
        SinqConfig.from_config({"quant_method": "sinq", "method": "awq"})


def test_unknown_backend_env(monkeypatch):
    from sinq_vllm.kernels.selection import requested_backend

    monkeypatch.setenv("SINQ_VLLM_BACKEND", "magic")
    with pytest.raises(SinqConfigError, match="SINQ_VLLM_BACKEND='magic'.*valid values: auto"):
        requested_backend()


# ---- tensor-level errors, raised while a layer is assembled -------------------------------
def _layer(ckpt, suffix):
    from safetensors import safe_open

    from sinq_vllm.format.checkpoint import read_layer_metas

    meta = next(m for n, m in read_layer_metas(str(ckpt)).items() if n.endswith(suffix))
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if k.startswith(meta.name + "."):
                    tensors[k[len(meta.name) + 1:]] = h.get_tensor(k)
    return meta, tensors


def _decode(meta, tensors):
    from sinq_vllm.vllm.assembly import ShardSlice, decode_shard

    return decode_shard(meta, tensors, ShardSlice(0, meta.out_features, 0, meta.in_features))


def test_decode_valid_layer(good):
    meta, tensors = _layer(good, "layers.0.self_attn.q_proj")
    codes, scales, zeros, t = _decode(meta, tensors)
    assert codes.shape == (meta.out_features, meta.in_features) and scales.shape == zeros.shape


@pytest.mark.parametrize("mutation, pattern", [
    (lambda t: t.pop("meta.zero.x"), r"meta\.zero\.x are missing"),
    (lambda t: t.update({"W_q": t["W_q"].t().contiguous()}), r"W_q has shape"),
    (lambda t: t.update({"W_q": t["W_q"].to(torch.int32)}), r"W_q has dtype torch.int32"),
    (lambda t: t.update({"meta.scale2": t["meta.scale2"][:, :-1]}), r"meta.scale2 has shape"),
    (lambda t: t.update({"meta.scale.s": torch.full_like(t["meta.scale.s"], float("nan"))}), r"NaN or Inf"),
    (lambda t: t.update({"meta.scale2": -t["meta.scale2"]}), r"finite and positive"),
    (lambda t: t.update({"meta.zero.x": t["meta.zero.x"].float()}), r"expected torch.uint8"),
])
def test_tensor_level_errors_name_the_layer(good, mutation, pattern):
    meta, tensors = _layer(good, "layers.1.self_attn.q_proj")
    mutation(tensors)
    with pytest.raises(SinqCheckpointError, match=rf"layers\.1\.self_attn\.q_proj.*{pattern}"):
        _decode(meta, tensors)


def test_engine_reports_missing_tensor_and_serves_nothing(broken, monkeypatch):
    """Through vLLM itself (engine in-process so any exception reaches the caller)."""
    name = first_module(broken, "k_proj")
    edit_tensors(broken, lambda t: t.pop(name + ".meta.scale2"))
    edit_sidecar(broken, lambda side: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    with pytest.raises(Exception) as info:
        LLM(model=str(broken), dtype="float32", max_model_len=128, enforce_eager=True)
    chain = []
    e = info.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    # caught by the front-end validation (vLLM wraps it in its config ValidationError) or at load
    assert any(f"{name}.meta.scale2" in c for c in chain), chain


def test_quantization_flag_on_plain_checkpoint_fails_before_engine(model_factory):
    from vllm import LLM

    # vLLM's pydantic config validation wraps our SinqCheckpointError; the message survives.
    with pytest.raises(ValueError, match="is not a SINQ checkpoint"):
        LLM(model=str(model_factory("llama")), quantization="sinq", dtype="float32", max_model_len=128,
            enforce_eager=True)


def test_sidecar_shape_inconsistent_with_model_config(broken, monkeypatch):
    """The sidecar says [128, 128] but this config.json builds a model of hidden size 64."""
    edit_config(broken, lambda cfg: cfg.update(hidden_size=64, head_dim=16))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    with pytest.raises(Exception) as info:
        LLM(model=str(broken), dtype="float32", max_model_len=128, enforce_eager=True)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("sidecar shape" in c and "does not match the model config" in c for c in chain), chain
