"""sinq_gptq: SINQ's stored form with codes chosen by error feedback on calibration inputs
(sinq_vllm/quantizer/sinq_gptq.py).

Checked here: the input Hessian; on a layer with anisotropic inputs the stored checkpoint
tensors (read back through quantAux, as a reader gets them) give a clearly lower output error
on those inputs than sinq_fit's, at 3 and 4 bits, with a group size that falls back to a half
(odd in_features); rank-deficient inputs and dead input columns; whole models (a SINQ
checkpoint, every decoder-block layer calibrated, lm_head not, inspect's verdict as for SINQ);
and the reference
implementation (sinq==0.2.0) dequantizes a sinq_gptq checkpoint to exactly our weights.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from sinq_vllm.format.decode import decode_module
from sinq_vllm.quantizer.layer import quantize_weight, quantize_weight_detailed
from sinq_vllm.quantizer.sinq_gptq import input_hessian

SIDECAR = "model.safetensors.index.json.meta.json"


def _layer(n=96, k=320, tokens=512, seed=0):
    """A weight with per-column spread and an outlier, and inputs whose channels differ in
    scale by ~30x (a few large ones, as LLM activations have)."""
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n, k, generator=gen) * torch.exp(0.5 * torch.randn(1, k, generator=gen))
    w[5, 9] = 0.4
    x = torch.randn(2, tokens // 2, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    x[..., :6] *= 8
    return w.bfloat16(), x.bfloat16()


def _dequant(tensors, meta) -> torch.Tensor:
    """float32 weight a reader reconstructs from the stored tensors."""
    d = decode_module(meta, tensors)
    n, k = d.codes.shape
    g = k // d.scales.shape[1]
    w = (d.codes.float().view(n, -1, g) - d.zeros.float()[..., None]) * d.scales.float()[..., None]
    return w.view(n, k) * d.col_scale.float()


def _output_error(w, x, tensors, meta) -> float:
    xf = x.float().reshape(-1, x.shape[-1])
    e = xf @ (w.float() - _dequant(tensors, meta)).T
    return float((e**2).sum() / (xf @ w.float().T).pow(2).sum())


def test_input_hessian():
    x = torch.randn(3, 7, 16)
    h = input_hessian(x.bfloat16())
    xf = x.bfloat16().float().reshape(-1, 16)
    assert h.dtype == torch.float64 and h.shape == (16, 16)
    assert torch.allclose(h, (xf.T @ xf).double() / 21, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nbits,group,aux", [(4, 64, True), (3, 64, True), (4, 128, False)])
def test_lower_output_error_than_sinq_fit(nbits, group, aux):
    w, x = _layer()  # k=320: group 128 falls back to 64 (the reference's halving)
    gptq = quantize_weight_detailed(w, nbits, group, method="sinq_gptq", aux=aux, activations=x)
    fit, fit_meta = quantize_weight(w, nbits, group, method="sinq_fit", aux=aux)
    assert gptq.calibrated
    assert gptq.meta == fit_meta  # the same sidecar entry: a SINQ layer
    assert {k: (v.dtype, v.shape) for k, v in gptq.tensors.items()} == {k: (v.dtype, v.shape) for k, v in fit.items()}
    ours, theirs = _output_error(w, x, gptq.tensors, gptq.meta), _output_error(w, x, fit, fit_meta)
    assert ours < 0.7 * theirs, (ours, theirs)


def test_coordinate_descent_reaches_a_coordinate_wise_optimum():
    """After enough passes no single code can move by one step (within its range) and lower
    tr(E H E^T), computed here directly; the first pass already never raises it. Odd K (72),
    groups of 24, 3-bit codes, blocks of 32 columns (so the lazy update crosses blocks)."""
    from sinq_vllm.quantizer.sinq_gptq import _coordinate_descent

    gen = torch.Generator().manual_seed(3)
    n, k, group, nbits = 5, 72, 24, 3
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(300, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    h = x.T @ x / 300
    s = 0.3 + torch.rand(k // group, n, generator=gen)
    z = 3.5 + torch.rand(k // group, n, generator=gen)
    sk, zk = s.T.repeat_interleave(group, 1), z.T.repeat_interleave(group, 1)
    start = (w / sk + zk).round().clamp(0, 7)

    def objective(codes):
        e = w.double() - ((codes - zk) * sk).double()
        return float(torch.einsum("ij,jk,ik->", e, h.double(), e))

    one = _coordinate_descent(w, start.clone(), (s, z), h, group, nbits, passes=1, block=32)
    assert objective(one) < objective(start)
    best = _coordinate_descent(w, start.clone(), (s, z), h, group, nbits, passes=30, block=32)
    assert best.min() >= 0 and best.max() <= 7 and torch.equal(best, best.round())
    f = objective(best)
    for i in range(n):
        for j in range(k):
            for step in (-1, 1):
                if 0 <= best[i, j] + step <= 7:
                    moved = best.clone()
                    moved[i, j] += step
                    assert objective(moved) >= f * (1 - 1e-6), (i, j, step)


def test_without_activations_it_is_sinq_fit():
    w, _ = _layer(seed=1)
    q = quantize_weight_detailed(w, 4, 64, method="sinq_gptq")
    fit, _ = quantize_weight(w, 4, 64, method="sinq_fit")
    assert not q.calibrated
    assert all(torch.equal(q.tensors[k], fit[k]) for k in fit)


def test_rank_deficient_inputs_and_dead_columns():
    """Fewer tokens than inputs and inputs that are always zero: the damping keeps the
    factorization finite; a dead column's codes are whatever the group fit gives (it never
    reaches the output), every other column is still fitted."""
    w, x = _layer(tokens=64, seed=2)
    x[..., 100:164] = 0
    q = quantize_weight_detailed(w, 4, 64, method="sinq_gptq", activations=x)
    deq = _dequant(q.tensors, q.meta)
    assert torch.isfinite(deq).all()
    fit, fit_meta = quantize_weight(w, 4, 64, method="sinq_fit")
    assert _output_error(w, x, q.tensors, q.meta) < _output_error(w, x, fit, fit_meta)


def test_activations_must_match_the_layer():
    from sinq_vllm.errors import SinqConfigError

    w, x = _layer()
    with pytest.raises(SinqConfigError, match=r"layer 'weight': activations \(2, 256, 320\) given to method 'sinq_fit' "
                                              r"\(only \['asinq', 'sinq_gptq'\] use them"):
        quantize_weight_detailed(w, 4, 64, method="sinq_fit", activations=x)
    with pytest.raises(SinqConfigError, match=r"with in_features=160 last"):
        quantize_weight_detailed(w[:, :160], 4, 64, method="sinq_gptq", activations=x)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river bank.\n"
                         for i in range(200)))
    return p


@pytest.fixture(scope="module")
def gptq_checkpoint(model_factory, tmp_path_factory, calib_text):
    from sinq_vllm.quantizer import quantize_model

    out = tmp_path_factory.mktemp("gptq")
    s = quantize_model(model_factory("llama"), out, method="sinq_gptq", calib_data=str(calib_text),
                       calib_samples=4, calib_seqlen=32, lm_head=True, progress=False)
    return out, s


def test_model_checkpoint_is_a_calibrated_sinq_checkpoint(gptq_checkpoint):
    out, s = gptq_checkpoint
    assert s.calibration == "calib.txt: 4 samples x 32 tokens"
    assert "lm_head" in s.quantized and "lm_head" not in s.calibrated_layers  # outside the blocks: sinq_fit
    assert len(s.calibrated_layers) == len(s.quantized) - 1 > 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "sinq" and cfg["method"] == "sinq"  # Transformers' SinqConfig accepts it
    side = json.loads((out / SIDECAR).read_text())
    assert {v["meta"]["method"] for v in side.values()} == {"sinq_quantAux"}


def test_inspect_serves_it_as_sinq(gptq_checkpoint, capsys):
    """Nothing new is needed to serve it: inspect's verdict and kinds are SINQ's."""
    from sinq_vllm.cli.main import main

    out, s = gptq_checkpoint
    rc = main(["inspect", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["servable"] and r["reasons"] == []
    assert r["kinds"] == {"4-bit g64 sinq_quantAux 1D": len(s.quantized)}


def test_cli_quantize_method_sinq_gptq(model_factory, tmp_path, calib_text, capsys):
    from sinq_vllm.cli.main import main

    rc = main(["quantize", str(model_factory("qwen3")), str(tmp_path / "o"), "--method", "sinq_gptq", "--nbits", "3",
               "--calib-data", str(calib_text), "--calib-samples", "2", "--calib-seqlen", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "sinq_gptq calibration on calib.txt: 2 samples x 32 tokens" in out, out


def test_reference_loader_reads_a_sinq_gptq_checkpoint(gptq_checkpoint, tmp_path):
    """The reference's own reader and ``SINQLinear.dequantize()`` give exactly the weights our
    loader decodes (float32), for every quantized layer."""
    from reference_checkpoints import reference_reads, skip_reason
    from reference_dequant import load_checkpoint_layer, quantized_modules

    if skip_reason():
        pytest.skip(skip_reason())
    from sinq_vllm.format.layer_meta import LayerMeta

    out, _ = gptq_checkpoint
    theirs = reference_reads(out, tmp_path / "reference.pt")["weights"]
    mods = [m for m in quantized_modules(out) if "layers." in m]
    by_layer = {name.split("layers.", 1)[-1]: w for name, w in theirs.items() if "layers." in name}
    assert len(by_layer) == len(mods) > 0
    for mod in mods:
        tensors, meta = load_checkpoint_layer(out, mod)
        ours = _dequant(tensors, LayerMeta.from_sidecar(mod, meta, "sidecar"))
        assert torch.equal(by_layer[mod.split("layers.", 1)[-1]], ours), mod


def _meta_model_and_tensors(src):
    """The architecture on the meta device (what the quantizer's collector gets) and the tensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), attn_implementation="sdpa")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        return model, {k: f.get_tensor(k) for k in f.keys()}


def test_shared_inputs_give_one_tensor_and_one_hessian(model_factory):
    """q/k/v (and gate/up) see the same input: the collector hands them one tensor and the
    Hessian is computed once for it; other inputs, even with equal values, get their own."""
    from sinq_vllm.quantizer import sinq_gptq
    from sinq_vllm.quantizer.activations import BlockActivations

    model, tensors = _meta_model_and_tensors(model_factory("llama"))
    samples = [torch.arange(1, 17).unsqueeze(0), torch.arange(3, 19).unsqueeze(0)]
    acts = BlockActivations(model, tensors.__getitem__, set(tensors), samples)
    p = "model.layers.0."
    q, k, v = (acts.for_module(p + f"self_attn.{n}_proj") for n in "qkv")
    gate, up = acts.for_module(p + "mlp.gate_proj"), acts.for_module(p + "mlp.up_proj")
    assert q is k is v and gate is up and q is not gate
    assert q.shape[:2] == (2, 16)
    h = sinq_gptq.input_hessian(q)
    assert sinq_gptq.input_hessian(k) is h
    copy = q.clone()
    assert sinq_gptq.input_hessian(copy) is not h and torch.equal(sinq_gptq.input_hessian(copy), h)


def test_sequential_inputs_come_through_the_quantized_blocks(model_factory):
    """sinq_gptq calibrates each block on what the quantized blocks before it produce (GPTQ's
    order). Block 0 with every weight recorded as zero adds nothing to the residual stream, so
    block 1's q/k/v inputs must be its input norm of the embeddings, computed here by the
    Transformers model itself; the reference's order (A-SINQ) ignores the recorded weights."""
    from transformers import AutoModelForCausalLM

    from sinq_vllm.quantizer.activations import BlockActivations

    src = model_factory("llama")
    meta, tensors = _meta_model_and_tensors(src)
    samples = [torch.arange(1, 17).unsqueeze(0), torch.arange(5, 21).unsqueeze(0)]
    block0 = [n for n in tensors if n.startswith("model.layers.0.") and n.endswith("_proj.weight")]
    assert len(block0) == 7

    def block1_inputs(sequential: bool) -> torch.Tensor:
        acts = BlockActivations(meta, tensors.__getitem__, set(tensors), samples, "sinq_gptq", sequential=sequential)
        for key in block0:
            module = key[: -len(".weight")]
            acts.for_module(module)
            acts.quantized(module, torch.zeros_like(tensors[key], dtype=torch.float32))
        return acts.for_module("model.layers.1.self_attn.q_proj")

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        expected = torch.cat([hf.model.layers[1].input_layernorm(hf.model.embed_tokens(ids)) for ids in samples])
        original = torch.cat([hf(ids, output_hidden_states=True).hidden_states[1] for ids in samples])
        original = hf.model.layers[1].input_layernorm(original)
    seq, blockwise = block1_inputs(True), block1_inputs(False)
    torch.testing.assert_close(seq, expected, atol=0, rtol=0)
    assert not torch.allclose(blockwise, expected, atol=1e-2)
    torch.testing.assert_close(blockwise.float(), original.float(), atol=3e-2, rtol=3e-2)  # bf16, other call path


def test_calibration_file_defaults_to_longer_samples(model_factory, tmp_path, calib_text):
    """--calib-data alone: sinq_gptq takes samples of 512 tokens (A-SINQ keeps the reference's
    128); the short test file gives fewer than the 32 samples asked for."""
    from sinq_vllm.quantizer import quantize_model

    s = quantize_model(model_factory("llama"), tmp_path / "o", method="sinq_gptq", calib_data=str(calib_text),
                       progress=False)
    m = re.fullmatch(r"calib\.txt: (\d+) samples x (\d+) tokens", s.calibration)
    assert m and int(m[2]) == 512 and 0 < int(m[1]) < 32, s.calibration
