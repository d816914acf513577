"""The CUDA backend on a GPU: ``torch.ops.sinq_vllm.cuda_gemv`` (decode kernel, M <= 16)
and ``torch.ops.sinq_vllm.cuda_linear`` (decode kernel or Triton by M) against an
independent float32 reference written here from the op's math (docs/design.md §1; tests/kernel_reference.py):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (Q[n, k] - z[n, k // g]) * s[n, k // g] + bias[n]

plus CUDA-graph capture and replay, ``torch.library.opcheck`` and ``torch.compile``.
Skipped without a CUDA device (and reported as skipped, with the build error, when the
extension cannot be built or loaded).

Tolerances (max |y - ref| / max |ref|): bfloat16 1e-2, float16 2e-3 (x * t is rounded
to the activation dtype once; codes are exact; fp32 accumulation; output rounding).
"""

from __future__ import annotations

import pytest
import torch
from kernel_reference import make_weights, reference, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ext():
    from sinq_vllm.kernels import cuda_backend

    module = cuda_backend.load_extension()
    if module is None:
        pytest.skip(f"CUDA extension unavailable: {cuda_backend.extension_error()}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the decode kernel needs compute capability 8.0+")
    return module


def resident(w):
    from sinq_vllm.kernels import gpu_layout

    return {k: v.cuda() for k, v in gpu_layout.repack(w).items()}


def gemv(t, w, x, bias, split_k=0):
    return torch.ops.sinq_vllm.cuda_gemv(x, t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], bias,
                                         w.nbits, w.group_size, w.out_features, split_k)


def linear(t, w, x, bias):
    return torch.ops.sinq_vllm.cuda_linear(x, t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], bias,
                                           w.nbits, w.group_size, w.out_features)


LAYERS = {32: ((300, 77, 77), 256), 64: ((129, 45), 384), 128: ((200,), 512)}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("nbits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_gemv_matches_reference(ext, m, nbits, group, dtype):
    shards, k = LAYERS[group]
    w = make_weights(shards, k, nbits, group, seed=m * 7 + nbits + group)
    t = resident(w)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(w.out_features, device="cuda").to(dtype) if m % 2 else None
    ref = reference(w, x, bias)
    for split in (0, 1, 3):
        y = gemv(t, w, x, bias, split)
        assert y.dtype == dtype and y.shape == (m, w.out_features)
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"split_k={split}: rel err {err:.2e}"
    torch.testing.assert_close(gemv(t, w, x, bias, 3), gemv(t, w, x, bias, 3), rtol=0, atol=0)  # deterministic


@pytest.mark.parametrize("nbits", [2, 3, 5, 6])
def test_other_bit_widths_use_4_and_8_bit_containers(ext, nbits):
    w = make_weights((150, 70), 256, nbits, 64, seed=nbits)
    t = resident(w)
    x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
    assert rel_err(gemv(t, w, x, None), reference(w, x, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(4096, 4096, 128), (6144, 4096, 64), (4096, 14336, 64)], ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_real_layer_shapes(ext, shape, m):
    n, k, g = shape
    shards = (4096, 1024, 1024) if n == 6144 else (n,)
    w = make_weights(shards, k, 4, g, seed=1)
    t = resident(w)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    assert rel_err(gemv(t, w, x, None), reference(w, x, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [17, 33, 128])
def test_linear_dispatches_large_m(ext, m):
    w = make_weights((129, 45), 384, 4, 64, seed=m)
    t = resident(w)
    x = torch.randn(m, 384, device="cuda").to(torch.float16)
    bias = torch.randn(w.out_features, device="cuda").to(torch.float16)
    assert rel_err(linear(t, w, x, bias), reference(w, x, bias)) < TOL[torch.float16]


def test_misaligned_and_strided_activations(ext):
    w = make_weights((129, 45), 384, 4, 64, seed=3)
    t = resident(w)
    base = torch.randn(4, 384 + 3, device="cuda").to(torch.bfloat16)
    x = base[:, 3:]  # rows not 16-byte aligned
    assert rel_err(gemv(t, w, x, None), reference(w, x, None)) < TOL[torch.bfloat16]


def test_rejects_bad_input(ext):
    w = make_weights((129,), 384, 4, 64)
    t = resident(w)
    with pytest.raises(RuntimeError, match="M must be at most 16"):
        gemv(t, w, torch.randn(17, 384, device="cuda").half(), None)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        gemv(t, w, torch.randn(1, 384, device="cuda"), None)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_cuda_graph_capture_and_replay(ext, m):
    w = make_weights((300, 77, 77), 256, 4, 32, seed=5)
    t = resident(w)
    bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
    static_x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
    linear(t, w, static_x, bias)  # warm-up outside the graph (Triton compiles/autotunes here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = linear(t, w, static_x, bias)
    for seed in range(3):
        static_x.copy_(torch.randn(m, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, reference(w, static_x, bias)) < TOL[torch.bfloat16]


def test_opcheck(ext):
    w = make_weights((129, 45), 384, 4, 64, seed=9)
    t = resident(w)
    for m in (3, 20):
        x = torch.randn(m, 384, device="cuda").to(torch.bfloat16)
        bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
        args = (x, t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], bias, 4, 64, w.out_features)
        torch.library.opcheck(torch.ops.sinq_vllm.cuda_linear.default, args)
        if m <= 16:
            torch.library.opcheck(torch.ops.sinq_vllm.cuda_gemv.default, (*args, 0))


def test_torch_compile_dynamic_batch(ext):
    from sinq_vllm.kernels.contract import spec_of
    from sinq_vllm.kernels.cuda_backend import CudaBackend

    w = make_weights((129, 45), 384, 4, 64, seed=11)
    backend = CudaBackend()
    spec = spec_of(w)
    tensors = {k: v.cuda() for k, v in backend.prepare(w).items()}
    fn = torch.compile(lambda x: backend.apply(tensors, spec, x, None), fullgraph=True, dynamic=True)
    for m in (1, 5, 40):
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
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "triton")
    assert selection.select_backend(spec, torch.bfloat16, dev, "layer").name == "triton"
    # group 16 with 4-bit codes: the decode kernel's 32-wide K chunk does not fit -> triton
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")
    spec16 = spec_of(make_weights((64,), 48, 4, 16))
    assert selection.select_backend(spec16, torch.bfloat16, dev, "layer16").name == "triton"
