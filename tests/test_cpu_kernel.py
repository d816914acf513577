"""The C++ CPU kernel (``torch.ops.sinq_vllm.cpu_linear``) against an independent float32
reference written here from the op's math (docs/design.md §1; tests/kernel_reference.py):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k // g]) * s[n, k // g] + bias[n]

with V(q) = q (uniform) or the fp16-rounded NF4/NF3 codebook value.

Tolerances (max |y - ref| / max |ref|, i.e. relative to the output scale), exact activations:
  * bfloat16 activations: 1e-2 (x * t is rounded to bf16 once, the output to bf16; NF values
    are rounded to bf16 too, like x * t)
  * float16 activations:  2e-3 (hi/lo bf16 split of x * t, exact NF values, fp16 output rounding)
  * float32 activations:  1e-4 (hi/lo split keeps ~16 mantissa bits; fp32 accumulation)
int8 activations (``int8_act=True``, opt-in): 3e-2 against the float32 reference (the
activations are rounded to int8 per (row, group), up to max|x t| / 254), and against an
oracle of that exact int8 arithmetic (written here) to the output's own rounding.
Decoded-weight mode (the default ``auto`` mode's path for bf16 batches of >= 256 rows of
<= 4-bit layers on AVX-512, csrc/cpu/sinq_cpu_kernel.h): the same 1e-2 against the float32
reference, and against an oracle of its own arithmetic (bf16 x * t times bf16((V - z) * s),
float64 sums) to the output's rounding; ``exact=True`` keeps exact products at every M.
Every ISA this CPU can run (avx512bf16, avx2, scalar) is checked, not just the default, on
odd shapes and merged layers, M in {1, 16, 17, 64, 512, 2048} (the large M cross the
kernel's row chunks and take the decoded-weight mode where the ISA has it).
"""

from __future__ import annotations

import pytest
import torch

cpu_backend = pytest.importorskip("sinq_vllm.kernels.cpu_backend")
from sinq_vllm.errors import SinqConfigError  # noqa: E402
from sinq_vllm.kernels.contract import spec_of  # noqa: E402
from kernel_reference import code_values, make_weights, reference, rel_err  # noqa: E402

EXT = cpu_backend.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason=f"CPU kernel unavailable: {cpu_backend.extension_error()}")

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
INT8_TOL = 3e-2
# the output's own rounding, for results compared with an oracle of the same arithmetic
OUT_TOL = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-5}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MS = (1, 3, 16, 17, 33, 64, 128)
ISSUE_MS = (1, 16, 17, 64, 512, 2048)
ISAS = ("avx512bf16", "avx2", "scalar")
# (codebook, nbits) of the code-value variants
VALUES = ((None, 4), (None, 3), (None, 6), (None, 8), ("nf4", 4), ("nf3", 3))


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    EXT.set_isa("auto")


def use_isa(isa):
    if isa not in EXT.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    assert EXT.set_isa(isa) == isa


def run(tensors, w, x, bias, int8=False, exact=False):
    return cpu_backend.cpu_linear(tensors, spec_of(w), x, bias, int8_act=int8, exact=exact)


def int8_oracle(w, x, bias=None):
    """float64 result of the documented int8 arithmetic (csrc/cpu/sinq_cpu_kernel.h): x * t in
    fp32 per shard, per (row, group) d = max|x t| / 127 and xq = round_half_even(x t * (127 / max)),
    y = sum_g s * d * sum_k xq * (Q - z)."""
    n, k = w.codes.shape
    g = w.group_size
    xf = x.reshape(-1, k).float()
    codes = w.codes.double().view(n, k // g, g)
    deq = (codes - w.zeros.double()[..., None]) * w.scales.double()[..., None]  # [n, G, g]
    outs = []
    offs = w.shard_offsets
    for s in range(len(offs) - 1):
        v = (xf * w.col_scales[s].float()).view(-1, k // g, g)
        amax = v.abs().amax(-1, keepdim=True)
        # fp32 127 / max as the kernel divides (Python's 127.0 / tensor would be reciprocal * 127)
        inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        q = torch.round(v * inv).double()
        d = (amax / 127.0).double()
        outs.append(torch.einsum("mGg,nGg->mn", q * d, deq[offs[s] : offs[s + 1]]))
    y = torch.cat(outs, 1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], n)


DECODED_MIN_ROWS = 256  # kDecodedMinRows, csrc/cpu/sinq_cpu_kernel.h


def decoded_oracle(w, x, bias=None):
    """(float64 result, float64 sum of |terms|) of the decoded-weight arithmetic: bf16(x * t) per
    shard (x * t in fp32) times W = bf16((V(Q) - z) * s) (fp32 product, one rounding), + bias."""
    n, k = w.codes.shape
    g = w.group_size
    v = code_values(w).view(n, k // g, g)
    deq = torch.addcmul(-(w.zeros.float() * w.scales.float())[..., None], v, w.scales.float()[..., None])
    deq = deq.view(n, k).bfloat16().double()
    xf = x.reshape(-1, k).float()
    offs = w.shard_offsets
    xs = [(xf * w.col_scales[s].float()).bfloat16().double() for s in range(len(offs) - 1)]
    y = torch.cat([xs[s] @ deq[offs[s] : offs[s + 1]].T for s in range(len(offs) - 1)], 1)
    mag = torch.cat([xs[s].abs() @ deq[offs[s] : offs[s + 1]].abs().T for s in range(len(offs) - 1)], 1)
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y.reshape(*x.shape[:-1], n), mag.reshape(*x.shape[:-1], n)


def assert_decoded_arithmetic(y, w, x, bias, case):
    """y is the decoded-weight arithmetic: the oracle within half a bf16 ulp of y (the output's
    rounding) plus fp32 accumulation error (2e-5 of the sum of |terms|, for outputs near
    cancellation)."""
    exact, mag = decoded_oracle(w, x, bias)
    half_ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(y.double())[1] - 9)
    excess = (y.double() - exact).abs() - (half_ulp + 2e-5 * mag)
    assert (excess <= 0).all(), f"{case}: {int((excess > 0).sum())} outputs off the decoded-weight arithmetic"


# layers: (shard sizes, K); odd N, K = 3 * group, merged layers with 2 and 3 shards
def layers_for(group):
    return [
        ((97,), 3 * group),
        ((40, 57), 2 * group),
        ((64, 24, 33), 4 * group),
        ((128, 64), 1 * group),
    ]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("codebook,nbits", [(None, 2), (None, 3), (None, 4), (None, 5), (None, 6), (None, 8),
                                            ("nf4", 4), ("nf3", 3)])
def test_matches_reference(codebook, nbits, group):
    """Default ISA: every nbits (and codebook) x group, odd shapes, merged layers, all M, dtypes, bias on/off."""
    for li, (shards, k) in enumerate(layers_for(group)):
        w = make_weights(shards, k, nbits, group, seed=nbits * 1000 + group + li, codebook=codebook)
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
                    f"{codebook or 'uniform'} {nbits}-bit g{group} shards {shards} K={k} M={m} {dtype} "
                    f"bias={bias is not None}: rel err {err:.2e} > {TOL[dtype]:.0e} (ISA {EXT.isa()})"
                )


def sweep(layers, nbits, codebook=None, seed=0):
    """(w, tensors, x, bias) over layers [(shard sizes, K, group)], the issue's M and every dtype."""
    for li, (shards, k, group) in enumerate(layers):
        w = make_weights(shards, k, nbits, group, seed=seed + li, codebook=codebook)
        tensors = cpu_backend.repack(w)
        gen = torch.Generator().manual_seed(li)
        for m in ISSUE_MS:
            for dtype in DTYPES:
                x = torch.randn(m, k, generator=gen).to(dtype)
                bias = torch.randn(sum(shards), generator=gen).to(dtype) if m % 2 else None
                yield w, tensors, x, bias


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("codebook,nbits", VALUES)
def test_every_isa(isa, codebook, nbits):
    """Every ISA, exact activations: odd shapes, merged layers, the issue's M (row chunks included)."""
    use_isa(isa)
    for w, tensors, x, bias in sweep([((97,), 192, 64), ((40, 57, 30), 128, 64)], nbits, codebook):
        err = rel_err(run(tensors, w, x, bias), reference(w, x, bias))
        assert err <= TOL[x.dtype], f"{isa} {codebook or 'uniform'} {nbits}-bit {w.shard_offsets} M={len(x)} {x.dtype}: {err:.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_int8_activations(isa, nbits):
    """int8 activations on every ISA: the documented int8 arithmetic to the output's rounding,
    and the float32 reference within INT8_TOL; odd shapes, merged layers, the issue's M."""
    use_isa(isa)
    for w, tensors, x, bias in sweep([((97,), 192, 64), ((40, 57, 30), 256, 128), ((64, 33), 96, 32)], nbits, seed=10):
        y = run(tensors, w, x, bias, int8=True)
        assert y.dtype == x.dtype and y.shape == (len(x), w.codes.shape[0])
        case = f"{isa} {nbits}-bit {w.shard_offsets} M={len(x)} {x.dtype}"
        exact = int8_oracle(w, x, bias)
        err = ((y.double() - exact).abs().max() / exact.abs().max()).item()
        assert err <= OUT_TOL[x.dtype], f"{case}: vs int8 oracle {err:.2e}"
        err = rel_err(y, reference(w, x, bias))
        assert err <= INT8_TOL, f"{case}: vs float32 reference {err:.2e}"


def test_large_m_many_chunks():
    """K large enough that M=2048 spans many row chunks (and tiles of three shards)."""
    w = make_weights((256, 128, 72), 1024, 4, 64, seed=2)
    tensors = cpu_backend.repack(w)
    x = torch.randn(2048, 1024)
    bias = torch.randn(456)
    for dtype in DTYPES:
        xd, bd = x.to(dtype), bias.to(dtype)
        assert rel_err(run(tensors, w, xd, bd), reference(w, xd, bd)) <= TOL[dtype], dtype
    y8 = run(tensors, w, x, bias, int8=True)
    assert ((y8.double() - int8_oracle(w, x, bias)).abs().max() / y8.abs().max()).item() <= OUT_TOL[torch.float32]


@pytest.mark.parametrize("codebook,nbits", [(None, 4), (None, 3), (None, 2), ("nf4", 4), ("nf3", 3)])
def test_decoded_weight_mode(codebook, nbits):
    """bf16 batches of >= 256 rows on AVX-512: the decoded-weight arithmetic (oracle above) and the
    float32 reference within 1e-2, on odd shapes, merged layers, groups 32/64/128, K across
    several k-blocks (128) and M across row chunks (512); below 256 rows, for fp16/fp32
    activations and with exact=True, bit for bit the exact path."""
    use_isa("avx512bf16")
    layers = [((97,), 192, 64), ((40, 57, 30), 640, 128), ((64, 33), 96, 32), ((256, 72), 1024, 64)]
    for li, (shards, k, group) in enumerate(layers):
        w = make_weights(shards, k, nbits, group, seed=20 + li, codebook=codebook)
        tensors = cpu_backend.repack(w)
        gen = torch.Generator().manual_seed(li)
        for m in (DECODED_MIN_ROWS - 1, DECODED_MIN_ROWS, 512, 517, 2048):
            x = torch.randn(m, k, generator=gen).bfloat16()
            bias = torch.randn(sum(shards), generator=gen).bfloat16() if m % 2 else None
            case = f"{codebook or 'uniform'} {nbits}-bit g{group} {shards} K={k} M={m}"
            y, y_exact = run(tensors, w, x, bias), run(tensors, w, x, bias, exact=True)
            assert rel_err(y, reference(w, x, bias)) <= TOL[torch.bfloat16], case
            assert rel_err(y_exact, reference(w, x, bias)) <= TOL[torch.bfloat16], case
            if m < DECODED_MIN_ROWS:
                assert torch.equal(y, y_exact), case
            else:
                assert_decoded_arithmetic(y, w, x, bias, case)
                assert not torch.equal(y, y_exact), f"{case}: the decoded-weight mode was not taken"
                if m == 2048:  # a row's result does not depend on how the batch is cut into row chunks
                    assert torch.equal(run(tensors, w, x[:300], bias), y[:300]), case
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(512, k, generator=gen).to(dtype)
            assert torch.equal(run(tensors, w, x, None), run(tensors, w, x, None, exact=True)), (dtype, k)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_no_decoded_mode_without_avx512(isa):
    """ISAs without the decoded-weight mode compute exact products at every batch size."""
    use_isa(isa)
    w = make_weights((40, 57), 256, 4, 64, seed=6)
    tensors = cpu_backend.repack(w)
    x = torch.randn(300, 256).bfloat16()
    assert torch.equal(run(tensors, w, x, None), run(tensors, w, x, None, exact=True))


def test_isas_agree():
    """All ISAs compute the same thing: exact mode to rounding, int8 mode (same quantization) closer still."""
    for codebook, nbits in ((None, 4), ("nf4", 4)):
        w = make_weights((40, 57), 128, nbits, 64, seed=3, codebook=codebook)
        tensors = cpu_backend.repack(w)
        x = torch.randn(5, 128, dtype=torch.float32)
        ref = reference(w, x, None)
        for isa in EXT.supported_isas():
            EXT.set_isa(isa)
            assert rel_err(run(tensors, w, x, None), ref) <= 1e-4, (isa, codebook)
    w = make_weights((40, 57), 128, 4, 64, seed=3)
    tensors = cpu_backend.repack(w)
    x = torch.randn(21, 128, dtype=torch.float32)
    outs = {}
    for isa in EXT.supported_isas():
        EXT.set_isa(isa)
        outs[isa] = run(tensors, w, x, None, int8=True)
    first = next(iter(outs.values()))
    for isa, y in outs.items():
        assert rel_err(y, first.float()) <= 1e-6, isa


def test_leading_dims_noncontiguous_and_empty():
    w = make_weights((48, 80), 192, 4, 64, seed=1)
    tensors = cpu_backend.repack(w)
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    y = run(tensors, w, x, None)
    assert y.shape == (2, 3, 128)
    assert rel_err(y, reference(w, x, None)) <= TOL[torch.bfloat16]
    assert run(tensors, w, x, None, int8=True).shape == (2, 3, 128)
    xt = torch.randn(192, 7, dtype=torch.bfloat16).T  # non-contiguous rows
    assert rel_err(run(tensors, w, xt, None), reference(w, xt, None)) <= TOL[torch.bfloat16]
    x0 = torch.randn(0, 192, dtype=torch.bfloat16)
    assert run(tensors, w, x0, None).shape == (0, 128)


def test_zero_activations_int8():
    """A group of zeros (d = 0) gives exact zeros, not NaN."""
    w = make_weights((64,), 128, 4, 64, seed=4)
    tensors = cpu_backend.repack(w)
    x = torch.randn(3, 128)
    x[:, :64] = 0
    x[1] = 0
    y = run(tensors, w, x, None, int8=True)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert rel_err(y, reference(w, x, None)) <= INT8_TOL


def test_bad_arguments_raise():
    w = make_weights((64,), 128, 4, 64)
    tensors = cpu_backend.repack(w)
    spec = spec_of(w)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    args = (tensors["qweight"], tensors["scales_zeros"], tensors["col_scales"], [0, 64], None, 4, 64)
    with pytest.raises(RuntimeError, match="multiple of group size"):
        torch.ops.sinq_vllm.cpu_linear(torch.randn(1, 96, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.sinq_vllm.cpu_linear(x, tensors["qweight"][:-1], *args[1:])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpu_backend.cpu_linear(tensors, spec, x.to(torch.float64), None)
    with pytest.raises(RuntimeError, match="codebook must be a contiguous float32 tensor of 16 values"):
        torch.ops.sinq_vllm.cpu_linear(x, *args, torch.zeros(8), False)
    with pytest.raises(RuntimeError, match="int8 activations need uniform codes"):
        torch.ops.sinq_vllm.cpu_linear(x, *args, torch.zeros(16), True)
    w6 = make_weights((64,), 128, 6, 64)
    t6 = cpu_backend.repack(w6)
    with pytest.raises(RuntimeError, match="int8 activations need uniform codes of at most 4 bits"):
        cpu_backend.cpu_linear(t6, spec_of(w6), x, None, int8_act=True)


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
    assert be.codebooks == frozenset({"nf4", "nf3"})
    assert be.unsupported_reason(spec_of(make_weights((64,), 128, 4, 64, codebook="nf4")), torch.bfloat16, cpu) is None


@pytest.mark.parametrize("codebook", [None, "nf4", "nf3"])
def test_backend_apply_and_selection(codebook):
    from sinq_vllm.kernels.selection import select_backend

    w = make_weights((40, 57), 128, 3 if codebook == "nf3" else 4, 64, codebook=codebook)
    spec = spec_of(w)
    be = select_backend(spec, torch.bfloat16, torch.device("cpu"), "test.layer")
    assert be.name == "cpu"
    tensors = be.prepare(w)
    assert ("codebook" in tensors) == (codebook is not None)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    bias = torch.randn(97, dtype=torch.bfloat16)
    assert rel_err(be.apply(tensors, spec, x, bias), reference(w, x, bias)) <= TOL[torch.bfloat16]


def test_activation_mode_option(monkeypatch):
    """SINQ_VLLM_CPU_ACT=int8 switches uniform <= 4-bit layers to int8 activations; NF and
    5-8-bit layers stay exact; a bad value is one SinqConfigError naming the variable."""
    monkeypatch.setenv("SINQ_VLLM_CPU_ACT", "int8")
    be = cpu_backend.CpuBackend()
    x = torch.randn(6, 128)
    for codebook, nbits, int8 in ((None, 4, True), ("nf4", 4, False), (None, 6, False)):
        w = make_weights((40, 57), 128, nbits, 64, seed=5, codebook=codebook)
        spec = spec_of(w)
        tensors = be.prepare(w)
        y = be.apply(tensors, spec, x, None)
        assert cpu_backend.int8_activations(spec, be.act_mode) is int8
        expected = int8_oracle(w, x) if int8 else reference(w, x)
        tol = OUT_TOL[torch.float32] if int8 else TOL[torch.float32]
        assert ((y.double() - expected.double()).abs().max() / expected.abs().max()).item() <= tol, (codebook, nbits)
    monkeypatch.setenv("SINQ_VLLM_CPU_ACT", "fp8")
    with pytest.raises(SinqConfigError, match="SINQ_VLLM_CPU_ACT='fp8'"):
        cpu_backend.CpuBackend()
    monkeypatch.setenv("SINQ_VLLM_CPU_ACT", "exact")
    be = cpu_backend.CpuBackend()
    w = make_weights((40, 57), 128, 4, 64, seed=5)
    tensors = be.prepare(w)
    x = torch.randn(300, 128).bfloat16()
    assert torch.equal(be.apply(tensors, spec_of(w), x, None), run(tensors, w, x, None, exact=True))
    monkeypatch.delenv("SINQ_VLLM_CPU_ACT")
    be = cpu_backend.CpuBackend()
    assert be.act_mode == "auto"
    assert torch.equal(be.apply(tensors, spec_of(w), x, None), run(tensors, w, x, None))


def test_opcheck():
    w = make_weights((40, 57), 128, 4, 64)
    t = cpu_backend.repack(w)
    cb = cpu_backend.repack(make_weights((40, 57), 128, 4, 64, codebook="nf4"))["codebook"]
    for dtype, bias, codebook, int8 in ((torch.bfloat16, None, None, False),
                                        (torch.float16, torch.randn(97, dtype=torch.float16), None, False),
                                        (torch.bfloat16, None, cb, False), (torch.float32, None, None, True)):
        m = 300 if dtype == torch.bfloat16 else 3  # 300 rows: the decoded-weight mode
        args = (torch.randn(m, 128, dtype=dtype), t["qweight"], t["scales_zeros"], t["col_scales"], [0, 40, 97], bias, 4,
                64, codebook, int8)
        torch.library.opcheck(torch.ops.sinq_vllm.cpu_linear.default, args)
        torch.library.opcheck(torch.ops.sinq_vllm.cpu_linear.default, (*args, True))


@pytest.mark.parametrize("codebook,int8", [(None, False), ("nf4", False), (None, True)])
def test_torch_compile_fullgraph(codebook, int8):
    w = make_weights((64, 33), 128, 4, 64, codebook=codebook)
    spec = spec_of(w)
    t = cpu_backend.repack(w)

    def f(x):
        return cpu_backend.cpu_linear(t, spec, x, None, int8_act=int8) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), f(x))
