"""The compiled Triton kernels on a GPU (the interpreter runs the same cases on CPU in
test_triton_kernels.py and test_triton_moe.py): every dense path, NF4/NF3 tables, the
one-launch split-K at real decode shapes (many CTAs racing on the arrival counters), the
prefill path (dequantize_shard + torch.matmul) and the fused MoE kernel, each against the
float32 reference (tests/kernel_reference.py; test_triton_moe.py's float64 MoE reference).
Skipped without a GPU; scripts/gpu_check.sh runs it with ``SINQ_VLLM_REQUIRE_CUDA=1``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from gpu_required import gpu_or_fail, needs_gpu
from kernel_reference import make_weights, reference, rel_err

pytest.importorskip("triton")

from sinq_vllm.kernels import gpu_layout  # noqa: E402
from sinq_vllm.triton_kernels import sinq_gemm  # noqa: E402
from test_triton_kernels import TOL, run  # noqa: E402
from test_triton_moe import _check, _problem, dense_weight, reference_moe  # noqa: E402

pytestmark = needs_gpu


@pytest.fixture(scope="module", autouse=True)
def gpu():
    gpu_or_fail()
    assert not sinq_gemm.interpreting()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("nbits,codebook", [(4, None), (8, None), (4, "nf4"), (3, "nf3")])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_every_path_matches_reference(m, nbits, codebook, dtype):
    w = make_weights((300, 77, 77), 256, nbits, 64, seed=m + nbits, codebook=codebook)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(dtype)
    bias = torch.randn(w.out_features, generator=gen).to(dtype)
    ref = reference(w, x, bias)
    for path in sinq_gemm.PATHS:
        y = run(w, x, bias, "cuda", align=gpu_layout.DEFAULT_ALIGN, kernels=sinq_gemm, path=path)
        err = rel_err(y.cpu(), ref)
        assert err < TOL[dtype], f"path {path}: rel err {err:.2e}"


@pytest.mark.parametrize("path,m", [("gemv", 1), ("factored", 16)])
def test_split_k_at_decode_shapes_is_deterministic(path, m):
    """4096 x 4096: the planner splits K over hundreds of programs that race on the counters."""
    w = make_weights((4096,), 4096, 4, 64, seed=2)
    t = {k: v.cuda() for k, v in gpu_layout.repack(w).items()}
    x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
    cfg = sinq_gemm.default_config(path, m, 64, 128, 4096)
    assert sinq_gemm.choose_split_k(path, m, 4096, 4096, 4, cfg, x.device) > 1
    first = run(w, x, None, tensors=t, kernels=sinq_gemm, path=path)
    assert rel_err(first, reference(w, x, None)) < TOL[torch.bfloat16]
    for _ in range(5):
        assert torch.equal(run(w, x, None, tensors=t, kernels=sinq_gemm, path=path), first)


@pytest.mark.parametrize("codebook", [None, "nf4"])
def test_prefill_path(codebook):
    from sinq_vllm.kernels.contract import spec_of
    from sinq_vllm.kernels.triton_backend import TritonBackend

    w = make_weights((300, 77, 77), 256, 4, 64, seed=8, codebook=codebook)
    backend = TritonBackend()
    tensors = {k: v.cuda() for k, v in backend.prepare(w).items()}
    x = torch.randn(300, 256, device="cuda").to(torch.bfloat16)
    bias = torch.randn(w.out_features, device="cuda").to(torch.bfloat16)
    assert rel_err(backend.apply(tensors, spec_of(w), x, bias), reference(w, x, bias)) < TOL[torch.bfloat16]


@pytest.fixture(scope="module")
def moe():
    module = importlib.import_module("sinq_vllm.triton_kernels.sinq_moe")
    if type(module._sinq_moe_gemm_kernel).__name__ == "InterpretedFunction":
        module = importlib.reload(module)  # an interpreter test left its instance behind
    return module


@pytest.mark.parametrize("m,nbits,codebook,dtype", [(1, 4, None, torch.bfloat16), (33, 4, None, torch.float16),
                                                     (9, 3, None, torch.bfloat16), (5, 8, None, torch.bfloat16),
                                                     (17, 4, "nf4", torch.bfloat16), (7, 3, "nf3", torch.float16)])
def test_fused_moe(moe, m, nbits, codebook, dtype):
    x, topk_w, topk_ids, (c13, r13), (c2, r2) = _problem(m, 2, 6, 256, 128, nbits=nbits, group=64, seed=m)
    if codebook:
        for r in (r13, r2):
            r["zeros"] = (torch.rand(r["zeros"].shape) * 2 - 1).half()
    ref = reference_moe(x.to(dtype), topk_w, topk_ids, dense_weight(c13, r13, 64, codebook),
                        dense_weight(c2, r2, 64, codebook))
    cuda = lambda r: {k: v.cuda() for k, v in r.items()}  # noqa: E731
    out = moe.sinq_fused_moe(x.to(dtype).cuda(), topk_w.cuda(), topk_ids.cuda(), cuda(r13), cuda(r2), nbits13=nbits,
                             nbits2=nbits, group13=64, group2=64, codebook13=codebook, codebook2=codebook)
    _check(out.cpu(), ref, dtype)
