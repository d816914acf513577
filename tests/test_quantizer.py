"""Tests of the SINQ quantizer and the ``sinq-vllm quantize`` command.

The oracles here are written from docs/format.md only: a float32 dequantizer (§2.10)
and a literal, unbatched port of the reference Sinkhorn + RTN of one tile (§1.2-§1.4).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sinq_vllm.cli import main as cli_main
from sinq_vllm.errors import SinqCheckpointError, SinqConfigError
from sinq_vllm.quantizer import quantize_model, quantize_weight, quantize_weight_detailed, quantized_layout
from sinq_vllm.quantizer.sinkhorn import imbalance, sinkhorn_log
from sinq_vllm.format.safetensors_io import PlannedTensor, ShardWriter
from sinq_vllm.quantizer.writer import parse_size, plan_shards

# ---------------------------------------------------------------------------------------------
# Independent oracles (docs/format.md §2.10 and §1.2-§1.4)

PACK = {"8bit_u8": (1, 8), "4bit_u8": (2, 4), "2bit_u8": (4, 2), "3bit_32": (10, 3), "5bit_32": (6, 5), "6bit_32": (5, 6)}


def ref_unpack(W_q, packing):
    p, b = PACK[packing]
    w = W_q.to(torch.int64)
    return torch.cat([(w >> (b * (p - 1 - i))) & ((1 << b) - 1) for i in range(p)], 0)


def ref_aux(t, pre, shape):
    if pre + ".x" in t:
        return (t[pre + ".x"] * t[pre + ".s"] + t[pre + ".m"]).view(shape)
    return t[pre]


def ref_dequant(t, meta):
    """float32 W from checkpoint tensors ``t`` (no module prefix) and a sidecar ``meta`` dict."""
    N, K = meta["shape"]
    g = t["W_q"].shape[1]
    R = N * K // g
    q = ref_unpack(t["W_q"], meta["packing"])[:R].float()
    s = ref_aux(t, "meta.scale", meta["scale.shape"]).float()
    z = ref_aux(t, "meta.zero", meta["zero.shape"]).float()
    return ((q - z.reshape(-1, 1)) * s).reshape(N, K) * t["meta.scale2"].float()


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def ref_sinkhorn_2d(m, order=16, clip_min=1e-3, clip_max=1e3, eps=1e-6):
    """Literal one-tile port of the reference sinkhorn_log."""
    def imb(c):
        s1, s2 = c.std(1), c.std(0)
        return torch.maximum(s1.max(), s2.max()) / torch.minimum(s1.min(), s2.min()).clamp_min(1e-12)

    tgt = torch.minimum(m.std(1).clamp(clip_min, clip_max).min(), m.std(0).clamp(clip_min, clip_max).min()) + eps
    l1, l2 = torch.zeros(m.shape[1]), torch.zeros(m.shape[0], 1)
    best, mu1s, mu2s, gate = imb(m), l1.exp(), l2.exp(), 0.0
    for _ in range(order):
        cur = (m / l1.exp()) / l2.exp()
        ib = imb(cur)
        if ib <= best:
            mu1s, mu2s = l1.exp(), l2.exp()
        best = torch.minimum(best, ib)
        if ib > best:
            gate = 1.0
        sc = (cur.std(0).clamp(clip_min, clip_max) / tgt).clamp(0.7, 2.0).log()
        sr = (cur.std(1).clamp(clip_min, clip_max)[:, None] / tgt).clamp(0.7, 2.0).log()
        l1 = (l1 + sc * (1 - gate)).clip(-0.3, 10.0)
        l2 = (l2 + sr * (1 - gate)).clip(-0.3, 10.0)
    return m / mu1s / mu2s, mu1s, mu2s


def ref_quantize_no_aux(W, nbits, g):
    """Reference 1D SINQ of W (codes [R, g], s [R,1], z [R,1], t [1,K]) by a plain loop over slabs."""
    w = W.to(torch.float16)
    N, K = w.shape
    max_int = 2**nbits - 1
    Q, S, Z, T = [], [], [], []
    for j in range(K // g):
        tile = w[:, j * g:(j + 1) * g].float()
        x, mu1, mu2 = ref_sinkhorn_2d(tile)
        mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
        sc = (mx - mn).clamp(min=1e-4) / max_int
        z = -torch.round(mn / sc)
        Q.append(torch.clamp(torch.round(x / sc + z), 0, max_int))
        S.append((sc * mu2).half())
        Z.append(z.half())
        T.append(mu1.half())
    codes = torch.stack(Q, 1).reshape(-1, g)  # row n*G + j
    return codes, torch.stack(S, 1).reshape(-1, 1), torch.stack(Z, 1).reshape(-1, 1), torch.cat(T).view(1, K)


def outlier_matrix(n=256, k=256, seed=0):
    """Uniform weights with 2x outlier columns and rows: kurtosis ~3, below the gate."""
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(n, k, generator=g) * 2 - 1
    W[:, 5::16] *= 2.0
    W[3::32] *= 2.0
    return W * 0.02


def gaussian(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def as_sidecar(meta):
    return meta.to_sidecar()["meta"]


# ---------------------------------------------------------------------------------------------
# quantize_weight


def test_shapes_and_dtypes_aux_match_spec_example():
    t, meta = quantize_weight(gaussian(256, 256).bfloat16(), 4, 64)
    got = {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    assert got == {
        "W_q": (torch.uint8, (512, 64)),
        "meta.scale2": (torch.float16, (1, 256)),
        "meta.scale.x": (torch.uint8, (32, 32)),
        "meta.scale.s": (torch.float16, (1, 32)),
        "meta.scale.m": (torch.float16, (1, 32)),
        "meta.zero.x": (torch.uint8, (1024, 1)),
        "meta.zero.s": (torch.float16, (1, 1)),
        "meta.zero.m": (torch.float16, (1, 1)),
    }
    side = as_sidecar(meta)
    assert side["method"] == "sinq_quantAux" and side["packing"] == "4bit_u8"
    assert side["shape"] == [256, 256] and side["scale.shape"] == [1024, 1] == side["zero.shape"]
    assert side["compute_dtype"] == "torch.bfloat16" and side["axis"] == 1 and side["view_as_float"] is False


def test_shapes_and_dtypes_no_aux():
    t, meta = quantize_weight(gaussian(96, 128), 3, 64, aux=False)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "W_q": (torch.int32, (20, 64)),  # R = 192 rows, 10 per int32 word
        "meta.scale2": (torch.float16, (1, 128)),
        "meta.scale": (torch.float16, (192, 1)),
        "meta.zero": (torch.float16, (192, 1)),
    }
    assert meta.method == "sinq" and not meta.aux


@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("nbits,bound", [(2, 0.6), (3, 0.3), (4, 0.14), (5, 0.07), (6, 0.035), (8, 0.01)])
def test_round_trip_every_nbits(nbits, bound, aux):
    W = gaussian(128, 256, seed=nbits)
    t, meta = quantize_weight(W, nbits, 64, aux=aux)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == quantized_layout(128, 256, nbits, 64, aux)
    side = as_sidecar(meta)
    assert side["nbits"] == nbits and ("quantAux" in side["method"]) == aux
    err = rel_err(ref_dequant(t, side), W)
    assert err < bound, err
    codes = ref_unpack(t["W_q"], side["packing"])
    assert int(codes.max()) <= 2**nbits - 1
    assert int(codes[128 * 4:].abs().sum()) == 0  # planar padding rows are zero


def test_matches_literal_reference_port_bit_exact():
    W = outlier_matrix(64, 192, seed=3).bfloat16()
    t, meta = quantize_weight(W, 4, 64, aux=False)
    codes, s, z, col = ref_quantize_no_aux(W, 4, 64)
    assert torch.equal(ref_unpack(t["W_q"], "4bit_u8")[: codes.shape[0]], codes.long())
    assert torch.equal(t["meta.scale"], s) and torch.equal(t["meta.zero"], z)
    assert torch.equal(t["meta.scale2"], col)


def test_aux_tensors_are_reference_rtn8_of_the_no_aux_values():
    W = gaussian(64, 128, seed=4)
    plain, _ = quantize_weight(W, 4, 64, aux=False)
    aux, _ = quantize_weight(W, 4, 64, aux=True)
    s = plain["meta.scale"].view(32, -1)  # strided columns: {c, c + R/32, ...}
    lo = s.min(0, keepdim=True).values
    step = (s - lo).max(0, keepdim=True).values / 255
    assert torch.equal(aux["meta.scale.m"], lo) and torch.equal(aux["meta.scale.s"], step)
    assert torch.equal(aux["meta.zero.m"], plain["meta.zero"].min().view(1, 1))
    assert torch.equal(aux["W_q"], plain["W_q"]) and torch.equal(aux["meta.scale2"], plain["meta.scale2"])
    # dequantized zeros are only near-integers; never rounded by the writer
    zq = aux["meta.zero.x"] * aux["meta.zero.s"] + aux["meta.zero.m"]
    assert float((zq.float() - plain["meta.zero"].float()).abs().max()) < 0.05


@pytest.mark.parametrize("nbits", [3, 4])
def test_sinq_beats_rtn_on_outlier_rows_and_columns(nbits):
    W = outlier_matrix()
    q_sinq = quantize_weight_detailed(W, nbits, 64, method="sinq")
    q_rtn = quantize_weight_detailed(W, nbits, 64, method="rtn")
    assert not q_sinq.kurtosis_gated
    e_sinq = rel_err(ref_dequant(q_sinq.tensors, as_sidecar(q_sinq.meta)), W)
    e_rtn = rel_err(ref_dequant(q_rtn.tensors, as_sidecar(q_rtn.meta)), W)
    assert e_sinq < 0.9 * e_rtn, (e_sinq, e_rtn)
    assert q_rtn.meta.method == "rtn_quantAux" and "sinq" not in q_rtn.meta.method
    assert torch.all(q_rtn.tensors["meta.scale2"] == 1)
    assert not torch.all(q_sinq.tensors["meta.scale2"] == 1)
    _, meta = quantize_weight(W, nbits, 64, method="rtn", aux=False)
    assert meta.method == "rtn"


def test_kurtosis_gate_gives_plain_rtn_with_unit_column_scales():
    W = (gaussian(128, 128) / 0.02) ** 3 * 0.01  # kurtosis ~46
    q = quantize_weight_detailed(W, 4, 64)
    assert q.kurtosis_gated
    assert torch.all(q.tensors["meta.scale2"] == 1)
    assert q.meta.method == "sinq_quantAux"  # the reference keeps the requested method string
    rtn, _ = quantize_weight(W, 4, 64, method="rtn")
    assert all(torch.equal(rtn[k], q.tensors[k]) for k in rtn)


def test_group_fallback_halves_until_it_divides_k():
    t, meta = quantize_weight(gaussian(64, 336), 4, 64)
    assert t["W_q"].shape[1] == 16 and meta.group_size == 16
    side = as_sidecar(meta)
    assert side["group_size"] == 64  # stale, as in the reference; readers use W_q.shape[1]
    assert side["scale.shape"] == [64 * 21, 1]
    assert rel_err(ref_dequant(t, side), gaussian(64, 336)) < 0.1


def test_group_fallback_failure_names_the_layer():
    with pytest.raises(SinqConfigError, match=r"model\.layers\.3\.mlp\.down_proj.*200"):
        quantize_weight(gaussian(64, 200), 4, 64, name="model.layers.3.mlp.down_proj")


def test_aux_needs_rows_multiple_of_32():
    W = gaussian(24, 64)  # R = 24
    with pytest.raises(SinqConfigError, match="multiple of 32.*--no-aux"):
        quantize_weight(W, 4, 64, name="x.proj")
    t, meta = quantize_weight(W, 4, 64, aux=False)
    assert t["W_q"].shape == (12, 64) and rel_err(ref_dequant(t, as_sidecar(meta)), W) < 0.14


def test_outlying_zero_point_warns_about_quant_aux(caplog):
    import logging

    W = gaussian(64, 128)
    W[0, :64] = 0.02  # a constant group: its zero-point lands far outside 0..15
    log = logging.getLogger("vllm.sinq.layer")  # vLLM may stop propagation to the root logger
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.sinq.layer"):
            quantize_weight(W, 4, 64, method="rtn", name="odd.proj")
    finally:
        log.removeHandler(caplog.handler)
    assert "odd.proj" in caplog.text and "--no-aux" in caplog.text


@pytest.mark.parametrize("kw", [{"nbits": 7}, {"nbits": 1}, {"group_size": 12}, {"group_size": 8},
                                {"group_size": 20}, {"method": "nf4"}])
def test_invalid_options(kw):
    args = {"nbits": 4, "group_size": 64, "method": "sinq"} | kw
    with pytest.raises(SinqConfigError):
        quantize_weight(gaussian(64, 64), **args)


def test_non_finite_fp16_weight_is_rejected():
    W = gaussian(64, 64)
    W[0, 0] = 1e6  # overflows fp16, where the reference quantizes
    with pytest.raises(SinqConfigError, match="not finite"):
        quantize_weight(W, 4, 64, name="big")


# ---------------------------------------------------------------------------------------------
# Sinkhorn


@pytest.mark.parametrize("seed", range(4))
def test_sinkhorn_never_worse_than_identity_and_scales_bounded(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(6, 48, 32, generator=g) * torch.exp(torch.randn(6, 48, 1, generator=g)) * torch.exp(
        torch.randn(6, 1, 32, generator=g)
    )
    scaled, mu1, mu2 = sinkhorn_log(m)
    assert mu1.shape == (6, 32) and mu2.shape == (6, 48, 1)
    assert torch.all(imbalance(scaled) <= imbalance(m))
    for mu in (mu1, mu2):
        assert float(mu.min()) >= math.exp(-0.3) * (1 - 1e-6) and float(mu.max()) <= math.exp(10) * (1 + 1e-6)
    assert torch.equal(scaled, m / mu1[:, None, :] / mu2)
    # batching is per slab: identical to running each slab alone, and to the literal port
    for i in (0, 5):
        s_i, a_i, b_i = sinkhorn_log(m[i])
        assert torch.equal(s_i, scaled[i]) and torch.equal(a_i, mu1[i]) and torch.equal(b_i, mu2[i])
        r_s, r_a, r_b = ref_sinkhorn_2d(m[i])
        assert torch.equal(r_a, a_i) and torch.equal(r_b, b_i)


def test_sinkhorn_reduces_imbalance_of_scaled_rows_and_columns():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(64, 64, generator=g) * torch.linspace(0.2, 5, 64)[:, None] * torch.linspace(0.2, 5, 64)
    scaled, _, _ = sinkhorn_log(m)
    assert float(imbalance(scaled)) < 0.5 * float(imbalance(m))


# ---------------------------------------------------------------------------------------------
# Writer


def test_shard_writer_round_trips_through_safetensors(tmp_path):
    tensors = {
        "a": torch.arange(10, dtype=torch.uint8).view(2, 5),
        "b": torch.randn(3, 4).bfloat16(),
        "c": torch.tensor(7, dtype=torch.int32),
        "d": torch.randn(5).half(),
    }
    items = list(tensors)
    specs = {k: [PlannedTensor(k, {torch.uint8: "U8", torch.bfloat16: "BF16", torch.int32: "I32",
                                torch.float16: "F16"}[v.dtype], tuple(v.shape))] for k, v in tensors.items()}
    shards = plan_shards(items, specs.__getitem__, max_shard_size=34)  # 10 + 24 | 4 + 10
    assert [s.items for s in shards] == [["a", "b"], ["c", "d"]]
    assert [s.filename for s in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for shard in shards:
        with ShardWriter(tmp_path / shard.filename, shard.specs, {"format": "pt"}) as w:
            for k in shard.items:
                w.write(k, tensors[k])
        back = load_file(tmp_path / shard.filename)
        assert all(torch.equal(back[k], tensors[k]) for k in shard.items)
    with pytest.raises(RuntimeError, match="expected"):
        with ShardWriter(tmp_path / "x.safetensors", specs["a"]) as w:
            w.write("a", tensors["b"])


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(SinqConfigError):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------
# quantize_model on tiny random models


def _save_tiny(path, arch="llama", tie=True, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("src") / "llama_tied", tie=True)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("src") / "llama_untied", tie=False, seed=1)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("src") / "qwen2", arch="qwen2", tie=False, seed=2)


def _source(src):
    return load_file(src / "model.safetensors")


def _read_out(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sidecar = json.loads((out / "model.safetensors.index.json.meta.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                tensors[k] = f.get_tensor(k)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return index, sidecar, tensors


def _layer(tensors, name):
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and not k.endswith(".bias")}


LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_quantize_model_tied_llama(tiny_tied, tmp_path):
    out = tmp_path / "q"
    summary = quantize_model(tiny_tied, out, nbits=4, group_size=64, progress=False)
    assert (out / "model-00001-of-00001.safetensors").is_file()
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    index, sidecar, tensors = _read_out(out)
    src = _source(tiny_tied)

    assert sorted(sidecar) == sorted(LINEARS) == sorted(summary.quantized)
    assert all(e["meta"]["method"] == "sinq_quantAux" and e["meta"]["packing"] == "4bit_u8" for e in sidecar.values())
    assert "lm_head.weight" not in tensors  # tied: re-tied at load
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], src[k])
    assert not any(k.endswith("inv_freq") for k in tensors)
    for name in LINEARS:
        assert f"{name}.weight" not in tensors
        W = src[f"{name}.weight"]
        assert rel_err(ref_dequant(_layer(tensors, name), sidecar[name]["meta"]), W) < 0.14

    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((tiny_tied / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "sinq", "nbits": 4, "group_size": 64, "tiling_mode": "1D", "method": "sinq",
        "modules_to_not_convert": ["lm_head"], "aux": True,
    }
    assert cfg.get("dtype") == src_cfg.get("dtype") and cfg.get("torch_dtype") == src_cfg.get("torch_dtype")
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    assert summary.total_size < 0.6 * summary.source_size


def test_quantize_model_untied_rtn_no_aux_sharded(tiny_untied, tmp_path):
    out = tmp_path / "q"
    summary = quantize_model(tiny_untied, out, nbits=3, group_size=32, method="rtn", aux=False,
                             max_shard_size=20_000, progress=False)
    assert len(summary.shards) > 1
    names = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    index, sidecar, tensors = _read_out(out)
    src = _source(tiny_untied)
    assert torch.equal(tensors["lm_head.weight"], src["lm_head.weight"])  # untied head kept, unquantized
    for name in LINEARS:
        meta = sidecar[name]["meta"]
        assert meta["method"] == "rtn" and meta["nbits"] == 3 and meta["group_size"] == 32
        assert torch.all(tensors[f"{name}.meta.scale2"] == 1)
        assert tensors[f"{name}.meta.scale"].dtype == torch.float16
        # a layer never straddles two shards
        assert len({index["weight_map"][k] for k in index["weight_map"] if k.startswith(name + ".")}) == 1
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "rtn" and cfg["aux"] is False and cfg["nbits"] == 3


def test_quantize_model_keeps_biases_and_honours_skip(tiny_qwen2, tmp_path):
    out = tmp_path / "q"
    summary = quantize_model(tiny_qwen2, out, skip=["*.mlp.down_proj", "layers.1.self_attn.o_proj"], progress=False)
    index, sidecar, tensors = _read_out(out)
    src = _source(tiny_qwen2)
    biases = [k for k in src if k.endswith(".bias")]
    assert len(biases) == 6  # q/k/v biases of 2 layers
    for k in biases:
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], src[k])
        assert k[: -len(".bias")] in sidecar  # the Linear itself is quantized
    skipped = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    for name in skipped:
        assert name not in sidecar and torch.equal(tensors[f"{name}.weight"], src[f"{name}.weight"])
    assert len(sidecar) == 14 - 3 and sorted(summary.not_converted) == skipped
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["modules_to_not_convert"] == ["lm_head"] + skipped


def test_quantize_model_refuses_bad_inputs(tiny_tied, tmp_path):
    with pytest.raises(SinqConfigError, match="differ"):
        quantize_model(tiny_tied, tiny_tied, progress=False)
    with pytest.raises(SinqConfigError, match="config.json"):
        quantize_model(tmp_path, tmp_path / "o", progress=False)
    out = tmp_path / "q"
    quantize_model(tiny_tied, out, nbits=8, progress=False)
    with pytest.raises(SinqConfigError, match="already holds"):
        quantize_model(tiny_tied, out, progress=False)
    with pytest.raises(SinqConfigError, match="already quantized"):
        quantize_model(out, tmp_path / "qq", progress=False)
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((tiny_tied / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SinqCheckpointError, match="safetensors"):
        quantize_model(bin_only, tmp_path / "o2", progress=False)
    quantize_model(tiny_tied, out, nbits=2, overwrite=True, progress=False)
    assert {e["meta"]["nbits"] for e in json.loads((out / "model.safetensors.index.json.meta.json").read_text()).values()} == {2}


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("extra,msg", [
    (["--group-size", "12"], "multiple of 8"),
    (["--group-size", "60"], "multiple of 8"),
    (["--nbits", "7"], "nbits=7"),
    (["--method", "awq"], "method"),
])
def test_cli_bad_options_exit_2_without_traceback(tiny_tied, tmp_path, capsys, extra, msg):
    assert cli_main(["quantize", str(tiny_tied), str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_folders_exit_2(tiny_tied, tmp_path, capsys):
    assert cli_main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["quantize", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli_main(["quantize", str(tiny_tied), str(tiny_tied)]) == 2
    assert "differ" in capsys.readouterr().err


def test_cli_quantize(tiny_tied, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli_main(["quantize", str(tiny_tied), str(out), "--nbits", "5", "--group-size", "32", "--no-aux",
                   "--skip", "lm_head", "q_proj", "--no-progress"])
    assert rc == 0 and "12 quantized Linear layers" in capsys.readouterr().out
    side = json.loads((out / "model.safetensors.index.json.meta.json").read_text())
    assert len(side) == 12 and all(e["meta"]["method"] == "sinq" and e["meta"]["packing"] == "5bit_32" for e in side.values())


# ---------------------------------------------------------------------------------------------
# The CPU extension's Sinkhorn stds (the quantizer's hot spot) against torch.std


def _native_or_skip():
    from sinq_vllm.quantizer.native_ops import native_op

    op = native_op("sinkhorn_stds")
    if op is None:
        pytest.skip("the CPU extension (sinkhorn_stds) is not built")
    return op


@pytest.mark.parametrize("shape", [(1, 2, 16), (3, 97, 64), (9, 1536, 64), (2, 576, 128), (4, 333, 24)])
def test_native_sinkhorn_stds_equal_torch_std(shape):
    """Bit-equal to torch.std (fp32 results), with and without the iterate's divisions."""
    op = _native_or_skip()
    gen = torch.Generator().manual_seed(sum(shape))
    s, h, b = shape
    m = 0.03 * torch.randn(shape, generator=gen) * torch.exp(torch.randn(s, 1, b, generator=gen)) + 0.01
    mu1 = torch.exp(0.3 * torch.randn(s, b, generator=gen))
    mu2 = torch.exp(0.3 * torch.randn(s, h, 1, generator=gen))
    cur = (m / mu1[:, None, :]) / mu2
    rows, cols = op(m, mu1, mu2)
    assert torch.equal(rows, cur.std(dim=-1)) and torch.equal(cols, cur.std(dim=-2))
    rows, cols = op(m, None, None)
    assert torch.equal(rows, m.std(dim=-1)) and torch.equal(cols, m.std(dim=-2))


def test_quantize_weight_same_with_torch_std(monkeypatch):
    """The whole layer quantization is unchanged when the native stds are switched off."""
    from sinq_vllm.quantizer import sinkhorn

    _native_or_skip()
    gen = torch.Generator().manual_seed(3)
    w = (0.05 * torch.randn(320, 448, generator=gen) * torch.exp(0.4 * torch.randn(1, 448, generator=gen)))
    native, _ = quantize_weight(w.bfloat16(), 4, 64)
    monkeypatch.setattr(sinkhorn, "native_op", lambda name: None)
    plain, _ = quantize_weight(w.bfloat16(), 4, 64)
    assert native.keys() == plain.keys()
    for k in native:
        assert torch.equal(native[k], plain[k]), k
