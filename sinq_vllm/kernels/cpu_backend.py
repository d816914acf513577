"""CPU backend: the C++ kernel ``torch.ops.sinq_vllm.cpu_linear`` (csrc/cpu/).

The op is registered by the compiled extension ``sinq_vllm._C_cpu``, loaded (or
JIT-built from csrc/cpu; ``SINQ_VLLM_CPU_JIT=0`` disables that) by ``kernels/native.py``.
The kernel picks AVX-512+AVX512_BF16, AVX2 or a scalar loop at run time
(``SINQ_VLLM_CPU_ISA`` forces one).

Resident layout (``prepare``), documented in csrc/cpu/sinq_cpu_kernel.h: tiles of 64
output rows, each merged-layer shard padded on its own to a multiple of 64 rows;
* ``qweight`` uint8: nbits <= 4 as interleaved nibbles ``[T, K/8, 4, 64]`` (2- and 3-bit
  codes are stored as 4-bit nibbles: same fast kernel, 0.5 byte per weight), nbits 5, 6
  and 8 as one byte per code ``[T, K/2, 4, 32]`` (slower, 1 byte per weight);
* ``scales_zeros`` fp16 ``[T, G, 2, 64]``: the checkpoint's scales and float zeros;
* ``col_scales`` fp32 ``[S, K]``.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..log import get_logger, log_once
from . import native
from .contract import KernelBackend, LayerSpec, SinqWeights, pad_shard_rows

logger = get_logger(__name__)

TILE_ROWS = 64
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _build_flags() -> dict[str, list[str]]:
    config = native.build_config()
    if config is None:
        return {"cflags": ["-O3", "-std=c++17", "-fopenmp"], "ldflags": ["-fopenmp"]}
    cflags, ldflags = config.cpu_compile_args()
    return {"cflags": cflags, "ldflags": ldflags}


def _compiler_missing() -> str | None:
    if shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"):
        return None
    return "no C++ compiler found for a JIT build"


def _on_load(module) -> None:
    @torch.library.register_fake("sinq_vllm::cpu_linear")
    def _cpu_linear_fake(x, qweight, scales_zeros, col_scales, shard_offsets, bias, nbits, group_size):
        return x.new_empty((*x.shape[:-1], shard_offsets[-1]))

    if hasattr(torch.ops.sinq_vllm, "sinkhorn_stds"):  # quantizer op (absent from older builds)

        @torch.library.register_fake("sinq_vllm::sinkhorn_stds")
        def _sinkhorn_stds_fake(m, mu1, mu2):
            return m.new_empty(m.shape[:2]), m.new_empty((m.shape[0], m.shape[2]))

    if hasattr(torch.ops.sinq_vllm, "group_fit"):  # sinq_fit quantizer ops (absent from older builds)

        @torch.library.register_fake("sinq_vllm::group_fit")
        def _group_fit_fake(x, nbits, deltas, lloyd_steps, weights, scales, zeros):
            return x.new_empty((*x.shape[:2], 1)), x.new_empty((*x.shape[:2], 1))

        @torch.library.register_fake("sinq_vllm::column_scale_step")
        def _column_scale_step_fake(x, t, scales, zeros, nbits):
            return x.new_empty((x.shape[0], x.shape[2]))

    logger.info("SINQ: CPU kernel %s loaded, ISA %s", getattr(module, "__name__", "?"), module.isa())


EXTENSION = native.NativeExtension(
    kind="cpu",
    module="sinq_vllm._C_cpu",
    sources=lambda d: sorted(str(p) for p in d.glob("*.cpp")),
    build_flags=_build_flags,
    can_build=_compiler_missing,
    on_load=_on_load,
)


def load_extension():
    """The extension module, or None; the reason is in :func:`extension_error`."""
    return native.load(EXTENSION)


_REINSTALL_HINT = " (reinstall with `pip install -e . --no-build-isolation`)"


def extension_error() -> str | None:
    why = native.error(EXTENSION)
    return why and why + _REINSTALL_HINT


def repack(weights: SinqWeights) -> dict[str, torch.Tensor]:
    """Canonical SinqWeights -> the resident CPU layout (see module docstring)."""
    offs = tuple(int(o) for o in weights.shard_offsets)
    n, k = weights.codes.shape
    codes = pad_shard_rows(weights.codes.to(torch.uint8).cpu(), offs, TILE_ROWS)
    t = codes.shape[0] // TILE_ROWS
    if weights.nbits <= 4:
        c = codes.view(t, 4, 16, k // 8, 4, 2).permute(0, 3, 1, 2, 5, 4).to(torch.int32)  # [T, k8, sb, r, e, h]
        words = c[..., 0] | (c[..., 1] << 4) | (c[..., 2] << 8) | (c[..., 3] << 12)
        lo, hi = (words & 0xFF).to(torch.uint8), (words >> 8).to(torch.uint8)  # little-endian uint16
        qweight = torch.stack([lo, hi], dim=-1).contiguous().view(-1)
    else:
        qweight = codes.view(t, 4, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous().view(-1)
    s = pad_shard_rows(weights.scales.to(torch.float16).cpu(), offs, TILE_ROWS)
    z = pad_shard_rows(weights.zeros.to(torch.float16).cpu(), offs, TILE_ROWS)
    sz = torch.stack([s.view(t, TILE_ROWS, -1), z.view(t, TILE_ROWS, -1)], dim=1)  # [T, 2, 64, G]
    sz = sz.permute(0, 3, 1, 2).contiguous()  # [T, G, 2, 64]
    return {
        "qweight": qweight,
        "scales_zeros": sz,
        "col_scales": weights.col_scales.to(torch.float32).cpu().contiguous(),
    }


def cpu_linear(tensors: dict[str, torch.Tensor], spec: LayerSpec, x: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.sinq_vllm.cpu_linear(
        x,
        tensors["qweight"],
        tensors["scales_zeros"],
        tensors["col_scales"],
        list(spec.shard_offsets),
        bias,
        spec.nbits,
        spec.group_size,
    )


class CpuBackend(KernelBackend):
    name = "cpu"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return native.unavailable_reason(EXTENSION, _REINSTALL_HINT)

    def unsupported_reason(self, spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"runs on CPU only, not {device.type}"
        if act_dtype not in ACT_DTYPES:
            return f"activation dtype {act_dtype} (supported: bfloat16, float16, float32)"
        if spec.nbits not in SUPPORTED_BITS:
            return f"{spec.nbits}-bit codes (supported: {', '.join(map(str, SUPPORTED_BITS))})"
        if spec.group_size % 8 != 0:
            return f"group size {spec.group_size} is not a multiple of 8"
        if spec.in_features % spec.group_size != 0:
            return f"in_features {spec.in_features} is not a multiple of group size {spec.group_size}"
        return spec.offsets_problem()

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        if weights.nbits in (2, 3):
            log_once(logger, f"SINQ cpu kernel: {weights.nbits}-bit codes are kept as 4-bit nibbles (0.5 byte per weight)")
        elif weights.nbits > 4:
            log_once(
                logger,
                f"SINQ cpu kernel: {weights.nbits}-bit codes use the generic one-byte-per-code path "
                "(correct, slower than the 4-bit path)"
            )
        return repack(weights)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        return cpu_linear(tensors, spec, x, bias)
