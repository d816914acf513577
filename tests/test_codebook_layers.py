"""NF4/NF3 (codebook) layers: parsing, assembly and every backend that declares the codebook.

``W = (CB[Q] - z) * s * t`` (docs/format.md §1.4, §1.7). A backend computes a codebook when
its ``codebooks`` set names it; ``kernels/selection.py`` never hands it another one. Here:

* kernel level: each backend that declares NF4/NF3 against the float32 oracle of
  ``tests/kernel_reference.py`` (codebook values rounded to fp16, as the reference computes),
  odd N and K, merged layers with a column-scale row per shard, bias, M in {1, 3, 33};
* loading level: NF tensors written by our quantizer, through ``assembly`` (quantAux, planar
  unpack, merged shards, tensor-parallel cuts), equal the independent oracle
  ``tests/reference_dequant.py`` to 1e-6 and run through the backends;
* selection: a forced backend without the codebook is an error naming the layer; ``auto``
  falls back to one that has it, with a log line;
* sidecar parsing: NF4 needs 4-bit codes, NF3 3-bit.

Tolerance as max |y - ref| / max |ref|: fp32 1e-4, fp16 2e-3, bf16 1e-2 (docs/design.md §5).
"""

from __future__ import annotations

import logging

import pytest
import torch

from kernel_reference import make_weights, reference, rel_err
from reference_dequant import dequant_layer
from sinq_vllm.errors import SinqCheckpointError, SinqConfigError
from sinq_vllm.format.layer_meta import LayerMeta
from sinq_vllm.kernels.contract import spec_of
from sinq_vllm.kernels.selection import available_backends, load_backend, select_backend
from sinq_vllm.quantizer import quantize_weight
from sinq_vllm.vllm.assembly import ShardSlice, assemble

CODEBOOKS = {"nf4": 4, "nf3": 3}
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _backends(codebook):
    out = []
    for name in available_backends():
        backend = load_backend(name)[0]
        if codebook in backend.codebooks:
            out.append(name)
    return out


CASES = [(cb, b) for cb in CODEBOOKS for b in _backends(cb)]


def test_torch_backend_computes_both_codebooks():
    assert set(CODEBOOKS) <= load_backend("torch")[0].codebooks


@pytest.mark.parametrize("codebook,backend", CASES)
@pytest.mark.parametrize("shards,k,group", [((96,), 384, 64), ((61, 19, 19), 320, 64), ((200, 200), 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_matches_oracle(codebook, backend, shards, k, group, dtype):
    w = make_weights(shards, k, CODEBOOKS[codebook], group, seed=len(shards) * 7 + k, codebook=codebook)
    be = load_backend(backend)[0]
    spec = spec_of(w)
    if be.unsupported_reason(spec, dtype, torch.device("cpu")):
        pytest.skip(f"{backend}: {be.unsupported_reason(spec, dtype, torch.device('cpu'))}")
    resident = be.prepare(w)
    gen = torch.Generator().manual_seed(k)
    bias = torch.randn(sum(shards), generator=gen)
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = be.apply(resident, spec, x, bias.to(dtype))
        assert y.dtype == dtype and y.shape == (m, sum(shards))
        err = rel_err(y, reference(w, x, bias))
        assert err <= TOL[dtype], f"{backend} {codebook} M={m} {dtype}: rel err {err:.3g}"


@pytest.mark.parametrize("codebook", list(CODEBOOKS))
def test_dequantize_uses_the_codebook(codebook):
    w = make_weights((40, 24), 128, CODEBOOKS[codebook], 64, seed=3, codebook=codebook)
    eye = torch.eye(128)
    assert torch.allclose(w.dequantize(), reference(w, eye).T, rtol=0, atol=1e-6)


def _nf_weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * 0.05 * torch.exp(0.3 * torch.randn(1, k, generator=gen))).bfloat16()


@pytest.mark.parametrize("codebook,aux", [("nf4", True), ("nf3", True), ("nf4", False)])
def test_loaded_merged_layer_equals_oracle(codebook, aux):
    """q/k/v-like shards (odd row counts), quantized by us with the codebook, decoded and
    merged by the loader, with a tensor-parallel cut of rank 1 of 2 on the rows."""
    nbits = CODEBOOKS[codebook]
    sizes, k = (96, 32, 32), 192
    metas, tensors, dense = [], [], []
    for i, n in enumerate(sizes):
        t, meta = quantize_weight(_nf_weight(n, k, 10 + i), nbits, 64, method=f"sinq_{codebook}", aux=aux,
                                  name=f"l.{i}")
        assert meta.codebook == codebook and meta.unsupported_reason() is None
        metas.append(meta)
        tensors.append(t)
        dense.append(dequant_layer(t, meta.to_sidecar()))
    parts = [ShardSlice(n // 2, n, 0, k) for n in sizes]
    w = assemble(metas, tensors, parts, torch.device("cpu"))
    assert w.codebook == codebook and w.shard_offsets == (0, 48, 64, 80)
    want = torch.cat([d[p.row0:p.row1] for d, p in zip(dense, parts)])
    assert torch.allclose(w.dequantize(), want, rtol=0, atol=1e-6)
    x = torch.randn(5, k)
    for name in _backends(codebook):
        be = load_backend(name)[0]
        y = be.apply(be.prepare(w), spec_of(w), x, None)
        assert rel_err(y, x @ want.T) <= 2e-4, name


def test_merged_modules_with_different_codebooks_are_refused():
    w = _nf_weight(64, 128, 1)
    t4, m4 = quantize_weight(w, 4, 64, method="sinq_nf4", name="mlp.gate_proj")
    tu, mu = quantize_weight(w, 4, 64, method="sinq", name="mlp.up_proj")
    parts = [ShardSlice(0, 64, 0, 128)] * 2
    with pytest.raises(SinqCheckpointError, match=r"mlp.gate_proj.*mlp.up_proj.*NF4 codes vs 4-bit g64 uniform"):
        assemble([m4, mu], [t4, tu], parts, torch.device("cpu"))


def _meta(method, nbits):
    entry = {"meta": {"nbits": nbits, "group_size": 64, "shape": [64, 128], "method": method}}
    return LayerMeta.from_sidecar("model.layers.0.mlp.up_proj", entry, "sidecar.json")


def test_sidecar_codebook_parsing():
    assert _meta("sinq_nf4_quantAux", 4).codebook == "nf4"
    assert _meta("sinq_NF3", 3).codebook == "nf3"  # the reference lower-cases the method string
    assert _meta("sinq_quantAux", 4).codebook is None
    with pytest.raises(SinqCheckpointError, match=r"up_proj.*NF4 codes, which are 4-bit, but nbits=3"):
        _meta("sinq_nf4", 3)
    with pytest.raises(SinqCheckpointError, match=r"up_proj.*several codebooks"):
        _meta("sinq_nf4_nf3", 4)


def test_forced_backend_without_the_codebook_is_an_error(monkeypatch):
    lacking = [n for n in available_backends() if "nf3" not in load_backend(n)[0].codebooks]
    if not lacking:
        pytest.skip("every available backend computes NF3")
    monkeypatch.setenv("SINQ_VLLM_BACKEND", lacking[0])
    spec = spec_of(make_weights((64,), 128, 3, 64, codebook="nf3"))
    with pytest.raises(SinqConfigError, match=r"layer 'model.x'.*NF3 codebook layers are not implemented.*torch"):
        select_backend(spec, torch.float32, torch.device("cpu"), "model.x")


def test_auto_selection_picks_a_backend_with_the_codebook(monkeypatch, caplog):
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")
    spec = spec_of(make_weights((64,), 192, 4, 64, codebook="nf4"))
    log = logging.getLogger("vllm.sinq.selection")  # vLLM may stop propagation to the root logger
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="vllm.sinq.selection"):
            backend = select_backend(spec, torch.bfloat16, torch.device("cpu"), "model.y")
    finally:
        log.removeHandler(caplog.handler)
    assert "nf4" in backend.codebooks
    skipped = [n for n in ("cpu",) if n in available_backends() and "nf4" not in load_backend(n)[0].codebooks]
    if skipped:  # the fallback is said, never silent
        assert any("NF4 codebook layers are not implemented" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)


def test_moe_experts_with_a_codebook_run_per_expert():
    from sinq_vllm.vllm.moe import _choose_kernel

    assert _choose_kernel(torch.device("cpu"), ["nf4"]) == "loop"
