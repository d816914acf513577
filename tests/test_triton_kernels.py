"""The Triton kernels (``sinq_vllm.triton_kernels.sinq_gemm``) and the ``triton`` backend
against an independent float32 reference written from the op's math (docs/design.md §1;
tests/kernel_reference.py):

    y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k // g]) * s[n, k // g] + bias[n]

with ``V(q) = q`` (uniform) or the NF4/NF3 table.

The kernels run in Triton's interpreter on CPU tensors: ``sinq_gemm.load_interpreted()``
executes the kernel module once more with ``TRITON_INTERPRET=1`` set for that import only
(``triton.jit`` picks interpreted vs compiled at decoration time), so this file neither
needs the variable set for the whole pytest process nor leaks it into vLLM's own kernels.
The compiled kernels run on a GPU in tests/test_triton_gpu.py.

Tolerances (max |y - ref| / max |ref|):
  * bfloat16: 1e-2 (x * t and, on the tensor-core paths, the dequantized weight are
    rounded to bf16 once; output rounding 2^-9)
  * float16:  2e-3
  * float32 (gemv path only): 1e-5
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sinq_vllm.kernels import gpu_layout  # noqa: E402
from sinq_vllm.kernels.contract import spec_of  # noqa: E402
from sinq_vllm.triton_kernels import sinq_gemm  # noqa: E402
from kernel_reference import make_weights, reference, rel_err  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
INTERP = sinq_gemm.load_interpreted()


def run(w, x, bias, device="cpu", align=32, tensors=None, kernels=INTERP, **kw):
    """The kernels' launcher on a fresh (or the given) layout; checks the counters are zero after it."""
    t = tensors or {k: v.to(device) for k, v in gpu_layout.repack(w, align).items()}
    y = kernels.sinq_linear(
        x.to(device), t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], t["counters"], t.get("codebook"),
        None if bias is None else bias.to(device), w.nbits, w.group_size, w.out_features, **kw,
    )
    assert not t["counters"].any(), "split-K counters must be zero again after every launch"
    return y


# --------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 6, 8])
def test_layout_roundtrip_and_padding(nbits):
    w = make_weights((37, 19, 11), 64, nbits, 32)
    t = gpu_layout.repack(w, align=32)
    bits = gpu_layout.container_bits(nbits)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (gpu_layout.word_rows(64, nbits), 128)
    codes = gpu_layout.unpack_codes(t["qweight"], nbits, 64)
    assert torch.equal(codes[0:37], w.codes[0:37])
    assert torch.equal(codes[64:83], w.codes[37:56])
    assert torch.equal(codes[96:107], w.codes[56:67])
    assert not codes[37:64].any() and not codes[83:96].any()
    assert t["blk"].tolist() == [[0, 0, 32], [0, 32, 5], [1, 37, 19], [2, 56, 11]]
    sz = t["scales_zeros"]
    assert sz.shape == (2, 128, 2) and sz.dtype == torch.float16
    s, z = gpu_layout.unpack_scales_zeros(sz)
    assert torch.equal(s[64:83], w.scales[37:56]) and torch.equal(z[64:83], w.zeros[37:56])
    assert not s[37:64].any() and not z[37:64].any()
    assert t["col_scales"].dtype == torch.float16 and torch.equal(t["col_scales"], w.col_scales)
    assert t["counters"].dtype == torch.int32 and not t["counters"].any() and "codebook" not in t
    assert t["qweight"].shape[0] * (32 // bits) >= 64


def test_lane_order_gives_each_lane_16_contiguous_bytes():
    """Lane 4g + j of a warp finds the words of columns g, g+8, g+16, g+24 (word row j of a
    4-row chunk) as one 16-byte block; the same formula as the kernels' address math."""
    codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8)
    q = gpu_layout.pack_codes(codes, 4)
    flat = q.flatten()
    w = torch.arange(q.shape[0])[:, None].expand(-1, 64)
    n = torch.arange(64)[None, :].expand(q.shape[0], -1)
    offs = gpu_layout.word_offsets(w, n, 64)
    assert sorted(offs.flatten().tolist()) == list(range(q.numel()))  # a permutation
    unpacked = gpu_layout.unpack_codes(q, 4, 64)
    for lane in (0, 5, 31):
        g, j = lane >> 2, lane & 3
        for c, wt in ((0, 1), (1, 0)):
            block = flat[((c * 2 + wt) * 32 + lane) * 4 : ((c * 2 + wt) * 32 + lane) * 4 + 4]
            for slot in range(4):
                col = 32 * wt + 8 * slot + g
                word = int(block[slot]) & 0xFFFFFFFF
                got = [(word >> (4 * gpu_layout.NIBBLE_POS[i])) & 0xF for i in range(8)]
                assert got == unpacked[col, (4 * c + j) * 8 : (4 * c + j) * 8 + 8].tolist()


def test_nibble_order_is_mma_pair_order():
    """Codes (0,1), (2,3), ... of a word sit in nibbles (0,4), (1,5), ...: what the CUDA
    kernel's lop3 with mask 0x000f000f extracts as one half2."""
    codes = torch.zeros(32, 8, dtype=torch.uint8)
    codes[0] = torch.arange(8)
    word = gpu_layout.pack_codes(codes, 4)[0, 0].item() & 0xFFFFFFFF  # word (0, 0) sits at offset 0
    nibbles = [(word >> (4 * p)) & 0xF for p in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]


# --------------------------------------------------------------------------------------
# kernels vs reference
# --------------------------------------------------------------------------------------

# (shard sizes, K) per group size: odd N, merged layers, K = a few groups
LAYERS = {32: ((37, 19, 11), 96), 64: ((21, 27), 192), 128: ((45,), 256)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("nbits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_every_path_matches_reference(m, nbits, group, dtype):
    shards, k = LAYERS[group]
    w = make_weights(shards, k, nbits, group, seed=m + nbits + group)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(w.out_features, generator=gen).to(dtype) if m % 2 else None
    ref = reference(w, x, bias)
    for path in sinq_gemm.PATHS:
        y = run(w, x, bias, path=path)
        assert y.dtype == dtype and y.shape == (m, w.out_features)
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"path {path}: rel err {err:.2e}"


@pytest.mark.parametrize("nbits", [2, 3, 5, 6])
def test_other_bit_widths(nbits):
    w = make_weights((19, 13), 128, nbits, 64, seed=nbits)
    x = torch.randn(3, 128).to(torch.bfloat16)
    ref = reference(w, x, None)
    for path in sinq_gemm.PATHS:
        assert rel_err(run(w, x, None, path=path), ref) < TOL[torch.bfloat16], path


def test_group16_and_non_dividing_block_k():
    """g=16 (the reference's K fallback) and, on the dequant path, BLOCK_K > group."""
    w = make_weights((23, 9), 48, 4, 16, seed=3)
    x = torch.randn(5, 48).to(torch.float16)
    ref = reference(w, x, None)
    for path in sinq_gemm.PATHS:
        assert rel_err(run(w, x, None, path=path), ref) < TOL[torch.float16], path
    cfg = sinq_gemm.Config(16, 32, 32, 1, 1)  # BLOCK_K 32 spans two groups of 16
    assert rel_err(run(w, x, None, path="dequant", config=cfg), ref) < TOL[torch.float16]


@pytest.mark.parametrize("path", ["gemv", "factored"])
def test_split_k_is_deterministic_and_exact(path):
    w = make_weights((37, 19), 256, 4, 32, seed=5)
    x = torch.randn(2, 256).to(torch.float16)
    bias = torch.randn(w.out_features).to(torch.float16)
    ref = reference(w, x, bias)
    ys = [run(w, x, bias, path=path, split_k=s) for s in (1, 2, 3, 8)]
    for y in ys:
        assert rel_err(y, ref) < TOL[torch.float16]
    assert torch.equal(run(w, x, bias, path=path, split_k=3), ys[2])  # same split: bit-identical
    # more splits than K blocks: empty splits contribute zeros
    assert rel_err(run(w, x, bias, path=path, split_k=16), ref) < TOL[torch.float16]
    # one layout, many launches: the counters it keeps are reset by every launch
    t = gpu_layout.repack(w, 32)
    assert all(torch.equal(run(w, x, bias, tensors=t, path=path, split_k=3), ys[2]) for _ in range(3))
    # too few counters (a layout from elsewhere): a zeroed temporary, same result
    t["counters"] = t["counters"][:1]
    assert torch.equal(run(w, x, bias, tensors=t, path=path, split_k=3), ys[2])


@pytest.mark.parametrize("codebook,dtype,m", [("nf4", torch.bfloat16, 1), ("nf4", torch.float16, 40),
                                               ("nf3", torch.bfloat16, 40), ("nf3", torch.float16, 5)])
def test_codebooks_on_every_path(codebook, dtype, m):
    """NF4/NF3: codes index the fp16 table (docs/format.md §1.4); odd merged shards."""
    nbits = 4 if codebook == "nf4" else 3
    w = make_weights((37, 19, 11), 96, nbits, 32, seed=m, codebook=codebook)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=gen).to(dtype)
    bias = torch.randn(w.out_features, generator=gen).to(dtype)
    ref = reference(w, x, bias)
    for path in sinq_gemm.PATHS:
        for split in ((1, 2) if path != "dequant" else (1,)):
            err = rel_err(run(w, x, bias, path=path, split_k=split), ref)
            assert err < TOL[dtype], f"path {path}, split {split}: rel err {err:.2e}"


def test_fp32_activations_use_gemv():
    w = make_weights((21, 11), 64, 4, 32, seed=7)
    x = torch.randn(3, 64)
    assert sinq_gemm.choose_path(3, torch.float32) == "gemv"
    assert rel_err(run(w, x, None), reference(w, x, None)) < TOL[torch.float32]


def test_default_align_and_single_shard():
    w = make_weights((45,), 128, 4, 64, seed=9)
    x = torch.randn(2, 128).to(torch.bfloat16)
    y = run(w, x, None, align=gpu_layout.DEFAULT_ALIGN)
    assert rel_err(y, reference(w, x, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("nbits,codebook", [(4, None), (8, None), (4, "nf4")])
def test_prefill_dequantizes_each_shard_for_matmul(monkeypatch, nbits, codebook, dtype):
    """From SINQ_VLLM_PREFILL_MIN_M rows on, triton_linear dequantizes every merged shard
    (t folded in) into one scratch and multiplies it with torch.matmul."""
    from sinq_vllm.kernels import triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(gpu_layout.ENV_PREFILL_MIN_M, "6")
    backend = triton_backend.TritonBackend(align=32)
    w = make_weights((37, 0, 19, 11), 96, nbits, 32, seed=nbits, codebook=codebook)  # an empty shard too
    spec = spec_of(w)
    tensors = backend.prepare(w)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(w.out_features, generator=gen).to(dtype)
    for m in (6, 9):
        x = torch.randn(m, 96, generator=gen).to(dtype)
        err = rel_err(backend.apply(tensors, spec, x, bias), reference(w, x, bias))
        assert err < TOL[dtype], f"M={m}: rel err {err:.2e}"
    out = torch.empty(19, 96, dtype=dtype)
    INTERP.dequantize_shard(out, tensors["qweight"], tensors["scales_zeros"], tensors["col_scales"],
                            tensors.get("codebook"), nbits, 32, 2, gpu_layout.padded_shard_starts(w.shard_offsets, 32)[2])
    dense = reference(w, torch.eye(96)).T  # [N, K] = (V(Q) - z) * s * t per shard
    assert rel_err(out, dense[37:56]) < TOL[dtype]


def test_prefill_threshold_option_is_checked(monkeypatch):
    from sinq_vllm.errors import SinqConfigError

    monkeypatch.setenv(gpu_layout.ENV_PREFILL_MIN_M, "zero")
    with pytest.raises(SinqConfigError, match=gpu_layout.ENV_PREFILL_MIN_M):
        gpu_layout.prefill_min_m()


def test_empty_batch():
    w = make_weights((21,), 64, 4, 32)
    y = run(w, torch.zeros(0, 64, dtype=torch.float16), None)
    assert y.shape == (0, 21)


# --------------------------------------------------------------------------------------
# configuration logic (pure Python)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("align", [32, 64, 128])
def test_candidate_configs_respect_layout(group, align):
    for path in sinq_gemm.PATHS:
        for m in (1, 3, 16, 33, 64, 1024):
            cfgs = sinq_gemm.candidate_configs(path, m, group, align, 4 * group)
            assert cfgs
            for c in cfgs:
                assert align % c.block_n == 0
                if path != "dequant":
                    assert group % c.block_k == 0 and c.block_k >= 16
                if path != "gemv":
                    assert c.block_m >= 16 and c.block_k >= 16


def test_path_thresholds(monkeypatch):
    assert sinq_gemm.choose_path(1, torch.bfloat16) == "gemv"
    assert sinq_gemm.choose_path(16, torch.bfloat16) == "factored"
    assert sinq_gemm.choose_path(65, torch.float16) == "dequant"
    monkeypatch.setenv(sinq_gemm.ENV_GEMV_MAX_M, "4")
    monkeypatch.setenv(sinq_gemm.ENV_FACTORED_MAX_M, "8")
    assert sinq_gemm.choose_path(4, torch.bfloat16) == "gemv"
    assert sinq_gemm.choose_path(9, torch.bfloat16) == "dequant"


def test_production_module_is_not_interpreted():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("whole process runs interpreted")
    assert not sinq_gemm.interpreting() and INTERP.interpreting()
    assert os.environ.get("TRITON_INTERPRET") is None


# --------------------------------------------------------------------------------------
# backend and custom op
# --------------------------------------------------------------------------------------


def test_backend_op_3d_input_and_opcheck(monkeypatch):
    from sinq_vllm.kernels import triton_backend

    backend = triton_backend.TritonBackend()
    w = make_weights((37, 19, 11), 64, 4, 32, seed=11)
    spec = spec_of(w)
    assert backend.unsupported_reason(spec, torch.bfloat16, torch.device("cpu")) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unsupported_reason(spec, torch.bfloat16, torch.device("cpu")) is None
    tensors = backend.prepare(w)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    bias = torch.randn(w.out_features).to(torch.bfloat16)
    y = backend.apply(tensors, spec, x, bias)
    assert y.shape == (2, 3, w.out_features)
    assert rel_err(y, reference(w, x, bias)) < TOL[torch.bfloat16]
    args = gpu_layout.op_args(tensors, spec, x.reshape(-1, 64), bias)
    torch.library.opcheck(torch.ops.sinq_vllm.triton_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    assert backend.codebooks == {"nf4", "nf3"}


def test_backend_rejects_unsupported_layers():
    from sinq_vllm.kernels import triton_backend
    from sinq_vllm.kernels.contract import LayerSpec

    backend = triton_backend.TritonBackend()
    cuda = torch.device("cuda")
    assert "group size" in backend.unsupported_reason(LayerSpec(4, 24, 8, 48, (0, 8)), torch.float16, cuda)
    assert "shard offsets" in backend.unsupported_reason(LayerSpec(4, 32, 8, 64, (0, 9)), torch.float16, cuda)
    assert "activation dtype" in backend.unsupported_reason(LayerSpec(4, 32, 8, 64, (0, 8)), torch.int8, cuda)


def test_autotuner_construction():
    """The autotuned launchers build (benchmarking itself needs a GPU)."""
    for path, m in (("gemv", 1), ("factored", 16), ("dequant", 256)):
        tuner = sinq_gemm._autotuned(path, sinq_gemm.m_bucket(m), 64, 128, 4096)
        assert tuner.configs and tuner.keys == ["M_BUCKET", "N", "K", "SPLIT_K"]
        assert all(128 % c.kwargs["BLOCK_N"] == 0 for c in tuner.configs)


def test_selection_on_cpu_skips_gpu_backends(monkeypatch):
    from sinq_vllm.errors import SinqConfigError
    from sinq_vllm.kernels import selection
    from sinq_vllm.kernels.contract import LayerSpec

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(selection, "_instances", {})
    spec = LayerSpec(4, 64, 128, 128, (0, 128))
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "triton")
    with pytest.raises(SinqConfigError, match="triton: no CUDA device"):
        selection.select_backend(spec, torch.bfloat16, torch.device("cpu"), "layer")
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "cuda")
    with pytest.raises(SinqConfigError, match="cuda: no CUDA device"):
        selection.select_backend(spec, torch.bfloat16, torch.device("cpu"), "layer")
