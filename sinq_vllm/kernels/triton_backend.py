"""Triton backend: ``torch.ops.sinq_vllm.triton_linear`` on the shared GPU layout.

The kernels live in ``triton_kernels/sinq_gemm.py`` (installed as
``sinq_vllm.triton_kernels.sinq_gemm``): a split-K GEMV for decode, a group-factored
tensor-core kernel for moderate M and a dequantizing tiled GEMM above, all with float
zeros, NF4/NF3 codebooks, the per-shard column scale and the bias fused, split-K in one
launch. From ``SINQ_VLLM_PREFILL_MIN_M`` (default 256) rows on, each merged shard is
dequantized into a scratch in the activation dtype and multiplied by torch.matmul (cuBLAS
on a GPU; gpu_layout.prefill_linear). Resident layout: see ``gpu_layout.py``.

The op is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile`` treats it as opaque and CUDA graphs capture its launches. On CPU
tensors it runs the same kernels in Triton's interpreter (slow; tests and dry runs).
"""

from __future__ import annotations

import os

import torch

from .contract import LayerSpec
from .gpu_layout import GpuLayoutBackend, define_linear_op, layout_unsupported_reason, prefill_linear, prefill_min_m

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_import_error: str | None = None
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - triton ships with torch on Linux
    _import_error = f"triton is not installed ({e})"


def kernel_module(device_type: str = "cuda"):
    """The Triton kernel module; on CPU its interpreted instance. ``sinq_vllm.triton_kernels``
    exists once the checkout is installed (``pip install -e .`` maps ``triton_kernels/``)."""
    from sinq_vllm.triton_kernels import sinq_gemm  # noqa: PLC0415

    return sinq_gemm.load_interpreted() if device_type == "cpu" else sinq_gemm


def _triton_linear(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias, nbits, group_size,
                   out_features, shard_offsets):
    mod = kernel_module(x.device.type)
    if x.shape[0] >= prefill_min_m():
        def dequant(w, shard, col0):
            mod.dequantize_shard(w, qweight, scales_zeros, col_scales, codebook, nbits, group_size, shard, col0)

        return prefill_linear(x, qweight, col_scales, blk, bias, out_features, shard_offsets, dequant)
    return mod.sinq_linear(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias, nbits, group_size,
                           out_features)


triton_linear = define_linear_op("triton_linear", _triton_linear)


def _interpreter_allowed() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(GpuLayoutBackend):
    name = "triton"
    op_name = "triton_linear"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _import_error:
            return _import_error
        if not torch.cuda.is_available() and not _interpreter_allowed():
            return "no CUDA device (TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on CPU)"
        return None

    def unsupported_reason(self, spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type == "cpu" and not _interpreter_allowed():
            return "runs on CUDA GPUs (on CPU only under TRITON_INTERPRET=1)"
        if device.type not in ("cuda", "cpu"):
            return f"runs on CUDA GPUs, not {device.type}"
        if act_dtype not in ACT_DTYPES:
            return f"activation dtype {act_dtype} (supported: bfloat16, float16, float32)"
        if device.type == "cuda" and act_dtype == torch.bfloat16:
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return "bfloat16 tensor-core dots need compute capability 8.0+"
        return layout_unsupported_reason(spec)
