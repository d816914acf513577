"""The CUDA backend on a GPU: ``torch.ops.sinq_vllm.cuda_gemv`` (decode kernel, M <= 64),
``cuda_dequant_`` (prefill dequantizer) and ``torch.ops.sinq_vllm.cuda_linear`` (decode
kernel, Triton or dequant + cuBLAS by M) against the independent float32 reference
(tests/kernel_reference.py, docs/design.md §1):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k // g]) * s[n, k // g] + bias[n]

plus split-K determinism and counter reset, CUDA-graph capture and replay,
``torch.library.opcheck`` and ``torch.compile``. Skipped without a CUDA device; with
``SINQ_VLLM_REQUIRE_CUDA=1`` (scripts/gpu_check.sh) a missing GPU or extension fails with
the build log instead (tests/gpu_required.py).

Tolerances (max |y - ref| / max |ref|): bfloat16 1e-2, float16 2e-3 (x * t is rounded to
the activation dtype once; codes are exact; fp32 accumulation; output rounding).
"""

from __future__ import annotations

import pytest
import torch
from gpu_required import cuda_extension, needs_gpu
from kernel_reference import make_weights, reference, rel_err

pytestmark = needs_gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ext():
    return cuda_extension()


def resident(w):
    from sinq_vllm.kernels import gpu_layout

    return {k: v.cuda() for k, v in gpu_layout.repack(w).items()}


def gemv(t, w, x, bias, split_k=0):
    y = torch.ops.sinq_vllm.cuda_gemv(x, t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], t["counters"],
                                      t.get("codebook"), bias, w.nbits, w.group_size, w.out_features, split_k)
    assert not t["counters"].any(), "split-K counters must be zero after every launch"
    return y


def linear(t, w, x, bias):
    from sinq_vllm.kernels import gpu_layout
    from sinq_vllm.kernels.contract import spec_of

    return torch.ops.sinq_vllm.cuda_linear(*gpu_layout.op_args(t, spec_of(w), x, bias))


LAYERS = {32: ((300, 77, 77), 256), 64: ((129, 45), 384), 128: ((200,), 512)}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("nbits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 40, 64])
def test_gemv_matches_reference(ext, m, nbits, group, dtype):
    shards, k = LAYERS[group]
    w = make_weights(shards, k, nbits, group, seed=m * 7 + nbits + group)
    t = resident(w)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(w.out_features, device="cuda").to(dtype) if m % 2 else None
    ref = reference(w, x, bias)
    ys = {}
    for split in (0, 1, 3):
        ys[split] = gemv(t, w, x, bias, split)
        assert ys[split].dtype == dtype and ys[split].shape == (m, w.out_features)
        err = rel_err(ys[split], ref)
        assert err < TOL[dtype], f"split_k={split}: rel err {err:.2e}"
    for _ in range(3):  # one-launch split-K: deterministic, counters reused
        torch.testing.assert_close(gemv(t, w, x, bias, 3), ys[3], rtol=0, atol=0)


@pytest.mark.parametrize("codebook,nbits", [("nf4", 4), ("nf3", 3)])
@pytest.mark.parametrize("m", [1, 12, 33])
def test_gemv_codebooks(ext, codebook, nbits, m):
    w = make_weights((300, 77, 77), 256, nbits, 64, seed=m, codebook=codebook)
    t = resident(w)
    x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
    bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
    for split in (1, 2):
        assert rel_err(gemv(t, w, x, bias, split), reference(w, x, bias)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("nbits", [2, 3, 5, 6])
def test_other_bit_widths_use_4_and_8_bit_containers(ext, nbits):
    w = make_weights((150, 70), 256, nbits, 64, seed=nbits)
    t = resident(w)
    x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
    assert rel_err(gemv(t, w, x, None), reference(w, x, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(4096, 4096, 128), (6144, 4096, 64), (4096, 14336, 64)], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64])
def test_real_layer_shapes(ext, shape, m):
    n, k, g = shape
    shards = (4096, 1024, 1024) if n == 6144 else (n,)
    w = make_weights(shards, k, 4, g, seed=1)
    t = resident(w)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = gemv(t, w, x, None)
    assert rel_err(y, reference(w, x, None)) < TOL[torch.bfloat16]
    torch.testing.assert_close(gemv(t, w, x, None), y, rtol=0, atol=0)  # planned split-K: deterministic


def test_planner_fills_the_gpu(ext):
    """>= 3 resident CTAs per SM worth of CTAs on the 4096-wide layers (docs/design.md §4.2)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m, n_pad, k in ((1, 4096, 4096), (16, 4096, 4096), (1, 4096, 14336), (64, 6144, 4096)):
        split = ext.planned_split_k(m, n_pad, k, 64, 4, sms, 4)
        blocks = 1 if m <= 8 else -(-m // 16)
        ctas = (n_pad // 128) * blocks * split
        assert ctas >= 3 * sms, (m, n_pad, k, split, ctas)


@pytest.mark.parametrize("codebook", [None, "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [65, 100, 256, 300])
def test_linear_dispatches_large_m(ext, m, dtype, codebook):
    """65..255: the Triton GEMM; >= 256 (SINQ_VLLM_PREFILL_MIN_M): cuda_dequant_ per shard + cuBLAS."""
    w = make_weights((129, 45), 384, 4, 64, seed=m, codebook=codebook)
    t = resident(w)
    x = torch.randn(m, 384, device="cuda").to(dtype)
    bias = torch.randn(w.out_features, device="cuda").to(dtype)
    assert rel_err(linear(t, w, x, bias), reference(w, x, bias)) < TOL[dtype]


def test_dequant_matches_reference(ext):
    from sinq_vllm.kernels import gpu_layout

    w = make_weights((129, 45, 70), 256, 4, 32, seed=4)
    t = resident(w)
    dense = reference(w, torch.eye(256, device="cuda")).T
    starts = gpu_layout.padded_shard_starts(w.shard_offsets, gpu_layout.DEFAULT_ALIGN)
    for s, (a, b) in enumerate(zip(w.shard_offsets[:-1], w.shard_offsets[1:])):
        out = torch.empty(b - a, 256, device="cuda", dtype=torch.bfloat16)
        torch.ops.sinq_vllm.cuda_dequant_(out, t["qweight"], t["scales_zeros"], t["col_scales"], None, 4, 32, s,
                                          starts[s])
        assert rel_err(out, dense[a:b]) < TOL[torch.bfloat16]


def test_misaligned_and_strided_activations(ext):
    w = make_weights((129, 45), 384, 4, 64, seed=3)
    t = resident(w)
    base = torch.randn(4, 384 + 3, device="cuda").to(torch.bfloat16)
    x = base[:, 3:]  # rows not 16-byte aligned
    assert rel_err(gemv(t, w, x, None), reference(w, x, None)) < TOL[torch.bfloat16]


def test_rejects_bad_input(ext):
    w = make_weights((129,), 384, 4, 64)
    t = resident(w)
    with pytest.raises(RuntimeError, match="M must be at most 64"):
        gemv(t, w, torch.randn(65, 384, device="cuda").half(), None)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        gemv(t, w, torch.randn(1, 384, device="cuda"), None)


@pytest.mark.parametrize("m", [1, 16, 64, 100, 300])
def test_cuda_graph_capture_and_replay(ext, m):
    w = make_weights((300, 77, 77), 256, 4, 32, seed=5)
    t = resident(w)
    bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
    static_x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
    linear(t, w, static_x, bias)  # warm-up outside the graph (Triton compiles here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = linear(t, w, static_x, bias)
    for seed in range(3):
        static_x.copy_(torch.randn(m, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, reference(w, static_x, bias)) < TOL[torch.bfloat16]
        assert not t["counters"].any()


def test_opcheck(ext):
    from sinq_vllm.kernels import gpu_layout
    from sinq_vllm.kernels.contract import spec_of

    w = make_weights((129, 45), 384, 4, 64, seed=9)
    t = resident(w)
    for m in (3, 20, 70):
        x = torch.randn(m, 384, device="cuda").to(torch.bfloat16)
        bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
        args = gpu_layout.op_args(t, spec_of(w), x, bias)
        torch.library.opcheck(torch.ops.sinq_vllm.cuda_linear.default, args)
        if m <= 64:
            torch.library.opcheck(torch.ops.sinq_vllm.cuda_gemv.default, (*args[:-1], 0))


def test_torch_compile_dynamic_batch(ext):
    from sinq_vllm.kernels.contract import spec_of
    from sinq_vllm.kernels.cuda_backend import CudaBackend

    w = make_weights((129, 45), 384, 4, 64, seed=11)
    backend = CudaBackend()
    spec = spec_of(w)
    tensors = {k: v.cuda() for k, v in backend.prepare(w).items()}
    fn = torch.compile(lambda x: backend.apply(tensors, spec, x, None), fullgraph=True, dynamic=True)
    for m in (1, 5, 40, 70, 260):
        x = torch.randn(m, 384, device="cuda").to(torch.bfloat16)
        assert rel_err(fn(x), reference(w, x, None)) < TOL[torch.bfloat16]


def test_selection_prefers_cuda_and_honours_override(ext, monkeypatch):
    from sinq_vllm.kernels import selection
    from sinq_vllm.kernels.contract import spec_of

    spec = spec_of(make_weights((129,), 384, 4, 64))
    dev = torch.device("cuda")
    monkeypatch.setattr(selection, "_instances", {})
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")
    assert selection.select_backend(spec, torch.bfloat16, dev, "layer").name == "cuda"
    nf4 = spec_of(make_weights((129,), 384, 4, 64, codebook="nf4"))
    assert selection.select_backend(nf4, torch.bfloat16, dev, "nf4 layer").name == "cuda"
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "triton")
    assert selection.select_backend(spec, torch.bfloat16, dev, "layer").name == "triton"
    # group 16 with 4-bit codes: the decode kernel's 32-wide K chunk does not fit -> triton
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")
    spec16 = spec_of(make_weights((64,), 48, 4, 16))
    assert selection.select_backend(spec16, torch.bfloat16, dev, "layer16").name == "triton"
