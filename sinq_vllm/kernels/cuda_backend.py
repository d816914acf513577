"""CUDA backend: the decode kernel ``torch.ops.sinq_vllm.cuda_gemv`` (csrc/cuda/) for
M <= 64, the Triton GEMM for moderate M and cuBLAS on a dequantized scratch for prefill,
all on one shared resident layout (gpu_layout.py).

``torch.ops.sinq_vllm.cuda_linear`` is the op the backend calls: a
``torch.library.custom_op`` (opaque to ``torch.compile``, so the choice by M made inside it
adds no guards or recompilations) that dispatches

* M <= 64, fp16/bf16 -> ``cuda_gemv``: tensor-core decode kernel with the per-shard column
  scale, float zeros and NF4/NF3 tables fused, 16-byte weight loads, one-launch
  deterministic split-K planned from the shape and the kernel's occupancy;
* M >= ``SINQ_VLLM_PREFILL_MIN_M`` (default 256), or without Triton ->
  ``cuda_dequant_`` per merged shard into a scratch in the activation dtype, then
  torch.matmul (cuBLAS; gpu_layout.prefill_linear);
* otherwise -> ``triton_linear`` (triton_backend.py).

The compiled extension is ``sinq_vllm._C_cuda`` (built by ``pip install`` against a CUDA
torch, see build_ext_config.py), loaded or JIT-built for the running GPU's architecture by
``kernels/native.py`` (``SINQ_VLLM_CUDA_JIT=0`` disables the JIT build;
``SINQ_VLLM_REQUIRE_CUDA=1`` makes a missing extension or GPU an error that shows the
build log). Fake (meta) implementations of the ops are registered here.
"""

from __future__ import annotations

import torch

from ..log import get_logger, log_once
from . import native
from .contract import LayerSpec, SinqWeights
from .gpu_layout import (GpuLayoutBackend, container_bits, define_linear_op, layout_unsupported_reason,
                         linear_op_fake, prefill_linear, prefill_min_m)

logger = get_logger(__name__)

MAX_M = 64  # the decode kernel's limit (csrc/cuda/sinq_cuda.h kGemvMaxM)
ACT_DTYPES = (torch.float16, torch.bfloat16)


def _build_flags() -> dict[str, list[str]]:
    """JIT flags: only the running GPU's architecture (a build for 5 architectures inside an
    engine's start costs minutes)."""
    archs = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}"]
    config = native.build_config()
    if config is None:  # installed wheel without build_ext_config: the same flags
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs or ()]
        return {"cflags": ["-O3"], "cuda_cflags": ["-O3", "--expt-relaxed-constexpr", *gencode]}
    flags = config.cuda_compile_args(archs)
    return {"cflags": flags["cxx"], "cuda_cflags": flags["nvcc"]}


def _toolkit_missing() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME  # noqa: PLC0415

    return None if CUDA_HOME is not None else "no CUDA toolkit found for a JIT build (set CUDA_HOME)"


def _on_load(module) -> None:
    torch.library.register_fake("sinq_vllm::cuda_gemv")(linear_op_fake)
    torch.library.register_fake("sinq_vllm::cuda_dequant_")(lambda *args: None)
    logger.info("SINQ: CUDA kernel %s loaded", getattr(module, "__name__", "?"))


def _sources(d) -> list[str]:
    binding = d / "binding.cpp"
    return sorted(str(p) for p in d.glob("*.cu")) + [str(binding)] if binding.exists() else []


EXTENSION = native.NativeExtension(
    kind="cuda",
    module="sinq_vllm._C_cuda",
    sources=_sources,
    build_flags=_build_flags,
    can_build=_toolkit_missing,
    on_load=_on_load,
)


def _required_error(why: str) -> native.ExtensionUnavailable:
    return native.ExtensionUnavailable(f"{EXTENSION.require_env}=1 but the CUDA backend cannot run: {why}")


def load_extension():
    """The extension module, or None; the reason is in :func:`extension_error`."""
    if not getattr(torch.version, "cuda", None):
        if EXTENSION.required():
            raise _required_error("torch is not a CUDA build")
        return None
    return native.load(EXTENSION)


def extension_error() -> str | None:
    if not getattr(torch.version, "cuda", None):
        return "torch is not a CUDA build"
    return native.error(EXTENSION)


def _triton_available() -> bool:
    try:
        from . import triton_backend  # noqa: PLC0415

        return triton_backend.TritonBackend.unavailable_reason() is None
    except ImportError:
        return False


def _cuda_linear(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias, nbits, group_size, out_features,
                 shard_offsets):
    """``x[M, K]`` -> ``[M, out_features]``: decode kernel, Triton GEMM or dequant + cuBLAS by M."""
    m = x.shape[0]
    if m <= MAX_M:
        return torch.ops.sinq_vllm.cuda_gemv(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias,
                                             nbits, group_size, out_features, 0)
    if m < prefill_min_m() and _triton_available():
        return torch.ops.sinq_vllm.triton_linear(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias,
                                                 nbits, group_size, out_features, shard_offsets)

    def dequant(w, shard, col0):
        torch.ops.sinq_vllm.cuda_dequant_(w, qweight, scales_zeros, col_scales, codebook, nbits, group_size, shard, col0)

    return prefill_linear(x, qweight, col_scales, blk, bias, out_features, shard_offsets, dequant)


cuda_linear = define_linear_op("cuda_linear", _cuda_linear)


class CudaBackend(GpuLayoutBackend):
    name = "cuda"
    op_name = "cuda_linear"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            why = "no CUDA device"
        elif not getattr(torch.version, "cuda", None):
            why = "torch is not a CUDA build"
        else:
            return native.unavailable_reason(EXTENSION)  # raises itself when required
        if EXTENSION.required():
            raise _required_error(why)
        return why

    def unsupported_reason(self, spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"runs on CUDA GPUs, not {device.type}"
        if act_dtype not in ACT_DTYPES:
            return f"activation dtype {act_dtype} (supported: bfloat16, float16)"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return "needs compute capability 8.0+ (bf16/fp16 mma.sync m16n8k16)"
        reason = layout_unsupported_reason(spec)
        if reason:
            return reason
        chunk = 32 if container_bits(spec.nbits) == 4 else 16
        if spec.group_size % chunk:
            return f"group size {spec.group_size} is not a multiple of {chunk} (the decode kernel's K chunk)"
        if not _triton_available():
            log_once(logger, "SINQ cuda backend: Triton is missing, so %d < M < %d also dequantizes into a scratch "
                     "for cuBLAS", MAX_M, prefill_min_m())
        return None

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        log_once(
            logger, "SINQ cuda backend (%d-bit, group %d): M <= %d -> CUDA decode kernel, M < %d -> %s, "
            "larger M -> dequantized scratch + cuBLAS",
            weights.nbits, weights.group_size, MAX_M, prefill_min_m(),
            "Triton GEMM" if _triton_available() else "dequantized scratch + cuBLAS",
        )
        return super().prepare(weights)
