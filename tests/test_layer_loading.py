"""Layer level: what the loader builds from checkpoint tensors computes the SINQ layer.

For each bit width, two group sizes and odd shapes, checkpoint tensors are decoded by
``assembly`` (aux dequant, planar unpack, TP slicing, merged shards) and run through
every available kernel backend; the result is compared with the independent float32
oracle in ``reference_dequant`` (docs/format.md §2.10).

Tolerance: activations in float32 make the backend and the oracle differ only by
summation order and by where ``t`` is multiplied: max error <= 2e-4 of the output's
magnitude. bf16 activations: <= 2e-2 (8 mantissa bits on x*t and on the dequantized
weight).
"""

from __future__ import annotations

import pytest
import torch

from reference_dequant import dequant_layer, reference_linear
from sinq_vllm.vllm.assembly import ShardSlice, assemble
from sinq_vllm.kernels.contract import spec_of
from sinq_vllm.kernels.selection import available_backends, load_backend
from sinq_vllm.quantizer import quantize_weight

BACKENDS = available_backends()
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    # uneven input columns (what SINQ's t absorbs), mild enough to stay under the kurtosis gate
    w = w * torch.exp(0.3 * torch.randn(1, k, generator=gen))
    return w.to(torch.bfloat16)


def _sidecar_dict(meta):
    return meta.to_sidecar()["meta"]


def _run(backend_name, metas, tensors_list, parts, x):
    weights = assemble(metas, tensors_list, parts, torch.device("cpu"))
    backend = load_backend(backend_name)[0]
    spec = spec_of(weights)
    assert backend.unsupported_reason(spec, x.dtype, x.device) is None
    return backend.apply(backend.prepare(weights), spec, x, None)


def _close(y, ref, dtype):
    err = (y.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [64, 128])
def test_single_layer_matches_oracle(backend, nbits, group):
    n, k = 96 + 1 * (nbits % 2) * 32, 3 * 128  # odd-ish N (96 or 128 rows), K with 3 groups of 128
    w = _weight(n, k, seed=nbits * 1000 + group)
    tensors, meta = quantize_weight(w, nbits, group, name="layer")
    for m in (1, 3, 16, 33):
        x = torch.randn(m, k)
        ref = reference_linear(x, tensors, _sidecar_dict(meta))
        y = _run(backend, [meta], [tensors], [ShardSlice(0, n, 0, k)], x)
        _close(y, ref, torch.float32)
    xb = torch.randn(5, k).to(torch.bfloat16)
    ref = reference_linear(xb.float(), tensors, _sidecar_dict(meta))
    _close(_run(backend, [meta], [tensors], [ShardSlice(0, n, 0, k)], xb), ref, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aux", [True, False])
def test_odd_k_group_fallback(backend, aux):
    """K=336 with group 64 falls back to 16-wide groups; W_q.shape[1] is the truth."""
    n, k = 64, 336
    tensors, meta = quantize_weight(_weight(n, k, 7), 4, 64, aux=aux, name="odd")
    assert tensors["W_q"].shape[1] == 16 and meta.group_size == 16
    x = torch.randn(3, k)
    _close(_run(backend, [meta], [tensors], [ShardSlice(0, n, 0, k)], x),
           reference_linear(x, tensors, _sidecar_dict(meta)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_qkv_with_distinct_column_scales(backend, dtype):
    """q, k, v keep their own t; one layer computes all three."""
    k = 128
    shards = [quantize_weight(_weight(n, k, 10 + i), 4, 64, name=f"{p}_proj")
              for i, (p, n) in enumerate([("q", 128), ("k", 64), ("v", 64)])]
    ts = [t["meta.scale2"] for t, _ in shards]
    assert not torch.equal(ts[0], ts[1]) and not torch.equal(ts[1], ts[2])
    x = torch.randn(16, k)
    ref = torch.cat([reference_linear(x, t, _sidecar_dict(m)) for t, m in shards], dim=1)
    parts = [ShardSlice(0, m.out_features, 0, k) for _, m in shards]
    y = _run(backend, [m for _, m in shards], [t for t, _ in shards], parts, x.to(dtype))
    _close(y, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_slices_recompose_the_layer(backend):
    """Column-parallel rank slices concatenate to the full output; row-parallel rank
    slices (K split on group boundaries, t sliced alike) sum to it."""
    n, k, tp = 128, 256, 2
    tensors, meta = quantize_weight(_weight(n, k, 3), 4, 64, name="layer")
    x = torch.randn(4, k)
    ref = reference_linear(x, tensors, _sidecar_dict(meta))
    cols = [_run(backend, [meta], [tensors], [ShardSlice(r * n // tp, (r + 1) * n // tp, 0, k)], x) for r in range(tp)]
    _close(torch.cat(cols, 1), ref, torch.float32)
    kk = k // tp
    rows = [_run(backend, [meta], [tensors], [ShardSlice(0, n, r * kk, (r + 1) * kk)], x[:, r * kk:(r + 1) * kk])
            for r in range(tp)]
    _close(sum(rows), ref, torch.float32)


def test_oracle_agrees_with_loader_decode():
    """The decoded codes/scales/zeros/t rebuild exactly the oracle's weight (fp32)."""
    tensors, meta = quantize_weight(_weight(64, 192, 5), 3, 64, name="layer")
    w = assemble([meta], [tensors], [ShardSlice(0, 64, 0, 192)], torch.device("cpu"))
    assert torch.allclose(w.dequantize(), dequant_layer(tensors, _sidecar_dict(meta)), rtol=0, atol=1e-6)
