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
torch, see build_ext_config.py). When it is missing but the sources are next to the
package and torch is a CUDA build with a toolkit, it is JIT-built once with
``torch.utils.cpp_extension.load`` into ``$SINQ_VLLM_CACHE`` (default
``~/.cache/sinq_vllm``); ``SINQ_VLLM_CUDA_JIT=0`` disables that. Fake (meta)
implementations of both ops are registered here.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

import torch

from ..log import get_logger
from .base import KernelBackend, LayerSpec, SinqWeights
from .gpu_layout import DEFAULT_ALIGN, container_bits, layout_unsupported_reason, repack

logger = get_logger(__name__)

MAX_M = 16  # the decode kernel's limit (two m16n8k16 token tiles)
ACT_DTYPES = (torch.float16, torch.bfloat16)

_JIT_ENV = "SINQ_VLLM_CUDA_JIT"
_CACHE_ENV = "SINQ_VLLM_CACHE"
_SOURCES_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"

_lock = threading.Lock()
_state: dict[str, object] = {}
_fake_registered = False


def _jit_build():
    from torch.utils import cpp_extension  # noqa: PLC0415

    sources = sorted(str(p) for p in _SOURCES_DIR.glob("*.cu")) + [str(_SOURCES_DIR / "binding.cpp")]
    cache = Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "sinq_vllm")
    build_dir = cache / f"cuda_ext_torch{torch.__version__.replace('+', '_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(_SOURCES_DIR.parents[1]))
    try:
        from build_ext_config import cuda_compile_args  # noqa: PLC0415

        flags = cuda_compile_args()
    except ImportError:
        flags = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}
    finally:
        sys.path.pop(0)
    logger.info("SINQ: compiling the CUDA kernel from %s into %s (once; cached)", _SOURCES_DIR, build_dir)
    return cpp_extension.load(
        name="sinq_vllm_C_cuda_jit",
        sources=sources,
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=[str(_SOURCES_DIR)],
        build_directory=str(build_dir),
        verbose=False,
    )


def load_extension():
    """The extension module, or None; the reason is in :func:`extension_error`."""
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        module, errors = None, []
        if not getattr(torch.version, "cuda", None):
            errors.append("torch is not a CUDA build")
        else:
            try:
                module = importlib.import_module("sinq_vllm._C_cuda")
            except ImportError as e:
                errors.append(f"compiled module sinq_vllm._C_cuda is missing ({e})")
            if module is None:
                if os.environ.get(_JIT_ENV, "1") in ("0", "false", "no"):
                    errors.append(f"JIT build disabled by {_JIT_ENV}=0")
                elif not (_SOURCES_DIR / "binding.cpp").exists():
                    errors.append(f"no sources at {_SOURCES_DIR} to JIT-build from")
                else:
                    try:
                        from torch.utils.cpp_extension import CUDA_HOME  # noqa: PLC0415

                        if CUDA_HOME is None:
                            errors.append("no CUDA toolkit found for a JIT build (set CUDA_HOME)")
                        else:
                            module = _jit_build()
                    except Exception as e:  # noqa: BLE001 - any build failure is reported, not raised
                        errors.append(f"JIT build failed: {e}")
        if module is None:
            _state["error"] = "; ".join(errors)
            return None
        _state["module"] = module
        _register_fake()
        logger.info("SINQ: CUDA kernel %s loaded", getattr(module, "__name__", "?"))
        return module


def extension_error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("sinq_vllm::cuda_gemv")
    def _cuda_gemv_fake(x, qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features, split_k=0):
        return x.new_empty((x.shape[0], out_features))

    _fake_registered = True


def _triton_available() -> bool:
    try:
        from . import triton_backend  # noqa: PLC0415

        return triton_backend.TritonBackend.unavailable_reason() is None
    except ImportError:
        return False


@torch.library.custom_op("sinq_vllm::cuda_linear", mutates_args=())
def cuda_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_zeros: torch.Tensor,
    col_scales: torch.Tensor,
    blk: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``x[M, K]`` -> ``[M, out_features]``: CUDA decode kernel for M <= 16, Triton above."""
    m = x.shape[0]
    args = (qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features)
    if m <= MAX_M:
        return torch.ops.sinq_vllm.cuda_gemv(x, *args, 0)
    if _triton_available():
        return torch.ops.sinq_vllm.triton_linear(x, *args)
    return torch.cat([torch.ops.sinq_vllm.cuda_gemv(x[i : i + MAX_M], *args, 0) for i in range(0, m, MAX_M)])


@cuda_linear.register_fake
def _cuda_linear_fake(x, qweight, scales_zeros, col_scales, blk, bias, nbits, group_size, out_features):
    return x.new_empty((x.shape[0], out_features))


class CudaBackend(KernelBackend):
    name = "cuda"

    def __init__(self, align: int = DEFAULT_ALIGN):
        self.align = align

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        if load_extension() is None:
            return "CUDA kernel not available: " + (extension_error() or "unknown error")
        return None

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
            _log_once("SINQ cuda backend: Triton is missing, so M > 16 runs the decode kernel in chunks of 16 rows")
        return None

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        _log_once(
            f"SINQ cuda backend ({weights.nbits}-bit, group {weights.group_size}): M <= {MAX_M} -> CUDA decode "
            f"kernel, larger M -> {'Triton GEMM' if _triton_available() else 'decode kernel in chunks'}"
        )
        return repack(weights, self.align)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        lead = x.shape[:-1]
        y = torch.ops.sinq_vllm.cuda_linear(
            x.reshape(-1, spec.in_features),
            tensors["qweight"],
            tensors["scales_zeros"],
            tensors["col_scales"],
            tensors["blk"],
            bias,
            spec.nbits,
            spec.group_size,
            spec.out_features,
        )
        return y.reshape(*lead, spec.out_features)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)
