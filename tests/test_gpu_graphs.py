"""Both GPU backends as vLLM runs them: the linear op under ``torch.compile(dynamic=True)``,
captured in a CUDA graph and replayed with new activations, at M in {1, 2, 4, ..., 512}, on
Llama-3-8B layer shapes with merged q/k/v and gate/up (4-bit, group 64, bf16, with a bias),
against the float32 reference (tests/kernel_reference.py). One compiled function per
backend and layer serves every M (the choice by M happens inside the opaque op), and the
split-K counters are zero after every replay. Needs a GPU (scripts/gpu_check.sh runs it with
``SINQ_VLLM_REQUIRE_CUDA=1``: no silent skip there).
"""

from __future__ import annotations

import pytest
import torch
from gpu_required import cuda_extension, gpu_or_fail, needs_gpu
from kernel_reference import make_weights, reference, rel_err

pytestmark = needs_gpu

TOL = 1e-2  # bf16
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: name -> (merged shard sizes, in_features): Llama-3-8B, tensor parallel 1
LLAMA3_8B = {"qkv_proj": ((4096, 1024, 1024), 4096), "gate_up_proj": ((14336, 14336), 4096)}


@pytest.fixture(scope="module")
def layers():
    gpu_or_fail()
    out = {}
    for name, (shards, k) in LLAMA3_8B.items():
        w = make_weights(shards, k, 4, 64, seed=len(name))
        for field in ("codes", "scales", "zeros", "col_scales"):
            setattr(w, field, getattr(w, field).cuda())
        out[name] = w
    return out


def _backend(name):
    if name == "cuda":
        from sinq_vllm.kernels.cuda_backend import CudaBackend

        cuda_extension()
        return CudaBackend()
    from sinq_vllm.kernels.triton_backend import TritonBackend

    return TritonBackend()


@pytest.mark.parametrize("layer", list(LLAMA3_8B))
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_compiled_op_in_cuda_graphs(layers, backend_name, layer):
    from sinq_vllm.kernels.contract import spec_of

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = _backend(backend_name)
    w = layers[layer]
    spec = spec_of(w)
    tensors = backend.prepare(w)
    gen = torch.Generator("cuda").manual_seed(0)
    bias = torch.randn(spec.out_features, device="cuda", generator=gen).to(torch.bfloat16)
    fn = torch.compile(lambda x: backend.apply(tensors, spec, x, bias), dynamic=True, fullgraph=True)
    for m in MS:
        static_x = torch.randn(m, spec.in_features, device="cuda", generator=gen).to(torch.bfloat16)
        fn(static_x)  # compile / Triton JIT outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fn(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn(m, spec.in_features, device="cuda", generator=gen).to(torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            err = rel_err(static_y, reference(w, static_x, bias))
            assert err < TOL, f"{backend_name} {layer} M={m}: rel err {err:.2e}"
            assert not tensors["counters"].any(), f"{backend_name} {layer} M={m}: split-K counters not reset"
        del graph
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} compiled graphs for {len(MS)} batch sizes (dynamic shapes expected)"
