"""The C++ CPU kernel (``torch.ops.sinq_vllm.cpu_linear``) against an independent float32
reference written here from the op's math (docs/design.md §1; tests/kernel_reference.py):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (Q[n, k] - z[n, k // g]) * s[n, k // g] + bias[n]

Tolerances (max |y - ref| / max |ref|, i.e. relative to the output scale):
  * bfloat16 activations: 1e-2 (x * t is rounded to bf16 once, the output to bf16)
  * float16 activations:  2e-3 (hi/lo bf16 split of x * t, fp16 output rounding)
  * float32 activations:  1e-4 (hi/lo split keeps ~16 mantissa bits; fp32 accumulation)
Every ISA this CPU can run (avx512bf16, avx2, scalar) is checked, not just the default.
"""

from __future__ import annotations

import pytest
import torch

cpu_backend = pytest.importorskip("sinq_vllm.kernels.cpu_backend")
from sinq_vllm.kernels.contract import spec_of  # noqa: E402
from kernel_reference import make_weights, reference, rel_err  # noqa: E402

EXT = cpu_backend.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason=f"CPU kernel unavailable: {cpu_backend.extension_error()}")

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MS = (1, 3, 16, 33, 128)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    EXT.set_isa("auto")


def run(tensors, w, x, bias):
    return cpu_backend.cpu_linear(tensors, spec_of(w), x, bias)


# layers: (shard sizes, K); odd N, K = 3 * group, merged layers with 2 and 3 shards
def layers_for(group):
    return [
        ((97,), 3 * group),
        ((40, 57), 2 * group),
        ((64, 24, 33), 4 * group),
        ((128, 64), 1 * group),
    ]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 6, 8])
def test_matches_reference(nbits, group):
    """Default ISA: every nbits x group, odd shapes, merged layers, all M, dtypes, bias on/off."""
    for li, (shards, k) in enumerate(layers_for(group)):
        w = make_weights(shards, k, nbits, group, seed=nbits * 1000 + group + li)
        tensors = cpu_backend.repack(w)
        gen = torch.Generator().manual_seed(li)
        for mi, m in enumerate(MS):
            x32 = torch.randn(m, k, generator=gen)
            b32 = torch.randn(sum(shards), generator=gen)
            for di, dtype in enumerate(DTYPES):
                x = x32.to(dtype)
                bias = b32.to(dtype) if (mi + di + li) % 2 == 0 else None
                y = run(tensors, w, x, bias)
                assert y.dtype == dtype and y.shape == (m, sum(shards))
                err = rel_err(y, reference(w, x, bias))
                assert err <= TOL[dtype], (
                    f"{nbits}-bit g{group} shards {shards} K={k} M={m} {dtype} bias={bias is not None}: "
                    f"rel err {err:.2e} > {TOL[dtype]:.0e} (ISA {EXT.isa()})"
                )


@pytest.mark.parametrize("isa", ["avx512bf16", "avx2", "scalar"])
@pytest.mark.parametrize("nbits", [3, 4, 6, 8])
def test_every_isa(isa, nbits):
    if isa not in EXT.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    assert EXT.set_isa(isa) == isa
    group = 64
    for li, (shards, k) in enumerate([((97,), 3 * group), ((40, 57, 30), 2 * group)]):
        w = make_weights(shards, k, nbits, group, seed=li)
        tensors = cpu_backend.repack(w)
        for m in (1, 3, 16, 33):
            for dtype in DTYPES:
                x = torch.randn(m, k).to(dtype)
                bias = torch.randn(sum(shards)).to(dtype) if m % 2 else None
                err = rel_err(run(tensors, w, x, bias), reference(w, x, bias))
                assert err <= TOL[dtype], f"{isa} {nbits}-bit {shards} M={m} {dtype}: {err:.2e}"


def test_isas_agree_bitwise_on_codes():
    """All ISAs compute the same thing: results agree to rounding of the output."""
    w = make_weights((40, 57), 128, 4, 64, seed=3)
    tensors = cpu_backend.repack(w)
    x = torch.randn(5, 128, dtype=torch.float32)
    outs = {}
    for isa in EXT.supported_isas():
        EXT.set_isa(isa)
        outs[isa] = run(tensors, w, x, None)
    ref = reference(w, x, None)
    for isa, y in outs.items():
        assert rel_err(y, ref) <= 1e-4, isa


def test_leading_dims_noncontiguous_and_empty():
    w = make_weights((48, 80), 192, 4, 64, seed=1)
    tensors = cpu_backend.repack(w)
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    y = run(tensors, w, x, None)
    assert y.shape == (2, 3, 128)
    assert rel_err(y, reference(w, x, None)) <= TOL[torch.bfloat16]
    xt = torch.randn(192, 7, dtype=torch.bfloat16).T  # non-contiguous rows
    assert rel_err(run(tensors, w, xt, None), reference(w, xt, None)) <= TOL[torch.bfloat16]
    x0 = torch.randn(0, 192, dtype=torch.bfloat16)
    assert run(tensors, w, x0, None).shape == (0, 128)


def test_large_m_prefill():
    w = make_weights((256, 128), 512, 4, 128, seed=2)
    tensors = cpu_backend.repack(w)
    x = torch.randn(300, 512, dtype=torch.bfloat16)
    assert rel_err(run(tensors, w, x, None), reference(w, x, None)) <= TOL[torch.bfloat16]


def test_bad_arguments_raise():
    w = make_weights((64,), 128, 4, 64)
    tensors = cpu_backend.repack(w)
    spec = spec_of(w)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of group size"):
        torch.ops.sinq_vllm.cpu_linear(torch.randn(1, 96, dtype=torch.bfloat16), tensors["qweight"],
                                       tensors["scales_zeros"], tensors["col_scales"], [0, 64], None, 4, 64)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.sinq_vllm.cpu_linear(x, tensors["qweight"][:-1], tensors["scales_zeros"], tensors["col_scales"],
                                       list(spec.shard_offsets), None, 4, 64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpu_backend.cpu_linear(tensors, spec, x.to(torch.float64), None)


def test_unsupported_reasons():
    be = cpu_backend.CpuBackend()
    spec = spec_of(make_weights((64,), 128, 4, 64))
    cpu = torch.device("cpu")
    assert be.unsupported_reason(spec, torch.bfloat16, cpu) is None
    assert "float64" in be.unsupported_reason(spec, torch.float64, cpu)
    assert "CPU only" in be.unsupported_reason(spec, torch.bfloat16, torch.device("cuda"))
    bad_group = spec.__class__(4, 36, 64, 144, (0, 64))
    assert "multiple of 8" in be.unsupported_reason(bad_group, torch.bfloat16, cpu)
    bad_bits = spec.__class__(7, 64, 64, 128, (0, 64))
    assert "7-bit" in be.unsupported_reason(bad_bits, torch.bfloat16, cpu)


def test_backend_apply_and_selection():
    from sinq_vllm.kernels.selection import select_backend

    w = make_weights((40, 57), 128, 4, 64)
    spec = spec_of(w)
    be = select_backend(spec, torch.bfloat16, torch.device("cpu"), "test.layer")
    assert be.name == "cpu"
    tensors = be.prepare(w)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    bias = torch.randn(97, dtype=torch.bfloat16)
    assert rel_err(be.apply(tensors, spec, x, bias), reference(w, x, bias)) <= TOL[torch.bfloat16]


def test_opcheck():
    w = make_weights((40, 57), 128, 4, 64)
    t = cpu_backend.repack(w)
    for dtype, bias in ((torch.bfloat16, None), (torch.float16, torch.randn(97, dtype=torch.float16))):
        args = (torch.randn(3, 128, dtype=dtype), t["qweight"], t["scales_zeros"], t["col_scales"], [0, 40, 97], bias, 4, 64)
        torch.library.opcheck(torch.ops.sinq_vllm.cpu_linear.default, args)


def test_torch_compile_fullgraph():
    w = make_weights((64, 33), 128, 4, 64)
    spec = spec_of(w)
    t = cpu_backend.repack(w)
    be = cpu_backend.CpuBackend()

    def f(x):
        return be.apply(t, spec, x, None) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), f(x))
