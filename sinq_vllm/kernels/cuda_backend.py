"""CUDA backend: the decode kernel ``torch.ops.sinq_vllm.cuda_gemv`` (csrc/cuda/) for
M <= 16, the Triton kernels for larger M, on one shared resident layout (gpu_layout.py).

``torch.ops.sinq_vllm.cuda_linear`` is the op the backend calls: a
``torch.library.custom_op`` (opaque to ``torch.compile``, so the choice by M made inside it
adds no guards or recompilations) that dispatches

* M <= 16, fp16/bf16  -> ``cuda_gemv``: tensor-core decode kernel with the per-shard column
  scale and float zeros fused (csrc/cuda/sinq_gemv.cu), split-K planned from the shape;
* otherwise           -> ``triton_linear`` (triton_backend.py); without Triton, the CUDA
  kernel over chunks of 16 rows (correct, slow).

The compiled extension is ``sinq_vllm._C_cuda`` (built by ``pip install`` against a CUDA
torch, see build_ext_config.py), loaded or JIT-built by ``kernels/native.py``
(``SINQ_VLLM_CUDA_JIT=0`` disables the JIT build). Fake (meta) implementations of both
ops are registered here.
"""

from __future__ import annotations

import torch

from ..log import get_logger, log_once
from . import native
from .contract import LayerSpec, SinqWeights
from .gpu_layout import GpuLayoutBackend, container_bits, define_linear_op, layout_unsupported_reason, linear_op_fake

logger = get_logger(__name__)

MAX_M = 16  # the decode kernel's limit (two m16n8k16 token tiles)
ACT_DTYPES = (torch.float16, torch.bfloat16)


def _build_flags() -> dict[str, list[str]]:
    config = native.build_config()
    if config is None:
        return {"cflags": ["-O3", "-std=c++17"], "cuda_cflags": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}
    flags = config.cuda_compile_args()
    return {"cflags": flags["cxx"], "cuda_cflags": flags["nvcc"]}


def _toolkit_missing() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME  # noqa: PLC0415

    return None if CUDA_HOME is not None else "no CUDA toolkit found for a JIT build (set CUDA_HOME)"


def _on_load(module) -> None:
    torch.library.register_fake("sinq_vllm::cuda_gemv")(linear_op_fake)
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


def load_extension():
    """The extension module, or None; the reason is in :func:`extension_error`."""
    if not getattr(torch.version, "cuda", None):
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


def _cuda_linear(x, qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features):
    """``x[M, K]`` -> ``[M, out_features]``: CUDA decode kernel for M <= 16, Triton above."""
    m = x.shape[0]
    args = (qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features)
    if m <= MAX_M:
        return torch.ops.sinq_vllm.cuda_gemv(x, *args, 0)
    if _triton_available():
        return torch.ops.sinq_vllm.triton_linear(x, *args)
    return torch.cat([torch.ops.sinq_vllm.cuda_gemv(x[i : i + MAX_M], *args, 0) for i in range(0, m, MAX_M)])


cuda_linear = define_linear_op("cuda_linear", _cuda_linear)


class CudaBackend(GpuLayoutBackend):
    name = "cuda"
    op_name = "cuda_linear"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not getattr(torch.version, "cuda", None):
            return "torch is not a CUDA build"
        return native.unavailable_reason(EXTENSION)

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
            log_once(logger, "SINQ cuda backend: Triton is missing, so M > 16 runs the decode kernel in chunks of 16 rows")
        return None

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        log_once(
            logger, "SINQ cuda backend (%d-bit, group %d): M <= %d -> CUDA decode kernel, larger M -> %s",
            weights.nbits, weights.group_size, MAX_M, "Triton GEMM" if _triton_available() else "decode kernel in chunks",
        )
        return super().prepare(weights)
