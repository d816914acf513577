"""CPU backend: the C++ kernel ``torch.ops.sinq_vllm.cpu_linear`` (csrc/cpu/).

The op is registered by the compiled extension ``sinq_vllm._C_cpu``, loaded (or
JIT-built from csrc/cpu; ``SINQ_VLLM_CPU_JIT=0`` disables that) by ``kernels/native.py``.
The kernel picks AVX-512 (AVX512_BF16 + AVX512_VNNI), AVX2 or a scalar loop at run time
(``SINQ_VLLM_CPU_ISA`` forces one).

Resident layout (``prepare``), documented in csrc/cpu/sinq_cpu_kernel.h: tiles of 64
output rows, each merged-layer shard padded on its own to a multiple of 64 rows;
* ``qweight`` uint8: nbits <= 4 as interleaved nibbles ``[T, K/8, 4, 64]`` (2- and 3-bit
  codes are stored as 4-bit nibbles: same fast kernel, 0.5 byte per weight), nbits 5, 6
  and 8 as one byte per code ``[T, K/2, 4, 32]`` (slower, 1 byte per weight);
* ``scales_zeros`` fp16 ``[T, G, 2, 64]``: the checkpoint's scales and float zeros;
* ``col_scales`` fp32 ``[S, K]``;
* ``codebook`` fp32 ``[2^nbits]`` (NF4/NF3 layers only): the code values, fp16-rounded as
  the reference computes (``sinq_vllm.format.codebooks``).

Activations (``SINQ_VLLM_CPU_ACT``, docs/design.md §4.2):
* ``auto`` (default): ``exact`` below; except that bf16 batches of at least 256 rows
  (prefill, large decode batches) of uniform or NF layers of at most 4 bits run on weights
  decoded to bf16 once per row chunk, ``bf16((V(q) - z) * s)``, with a plain bf16 GEMM
  (AVX-512 only): the numerics of a bf16 linear layer, without the exact path's per-group
  epilogue, which is what keeps it below oneDNN's bf16 GEMM where the op is compute-bound;
* ``exact``: ``x * t`` in bf16 (plus a bf16 remainder row for fp16/fp32 activations),
  exact bf16 products with the codes, fp32 sums, at every batch size;
* ``int8``: ``x * t`` quantized to int8 per (row, group), exact int32 dot products with
  the codes: about twice the multiply-add rate where the op is compute-bound (batches,
  prefill), at the cost of an activation rounding error of up to max|x t| / 254 per group.
  Applies to uniform layers of at most 4 bits; NF4/NF3 and 5-8-bit layers stay exact.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..errors import SinqConfigError
from ..format.codebooks import codebook_values
from ..log import get_logger, log_once
from . import native
from .contract import KernelBackend, LayerSpec, SinqWeights, pad_shard_rows

logger = get_logger(__name__)

TILE_ROWS = 64
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACT_ENV = "SINQ_VLLM_CPU_ACT"
ACT_MODES = ("auto", "exact", "int8")


def activation_mode() -> str:
    """``SINQ_VLLM_CPU_ACT``: ``auto`` (default), ``exact`` or ``int8``."""
    value = os.environ.get(ACT_ENV, "auto").strip().lower() or "auto"
    if value not in ACT_MODES:
        raise SinqConfigError(f"{ACT_ENV}={value!r} is not a CPU activation mode; valid values: {', '.join(ACT_MODES)}")
    return value


def int8_activations(spec: LayerSpec, mode: str) -> bool:
    """Whether a layer runs with int8 activations in this mode (uniform codes of <= 4 bits)."""
    return mode == "int8" and spec.codebook is None and spec.nbits <= 4


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
    def _cpu_linear_fake(x, qweight, scales_zeros, col_scales, shard_offsets, bias, nbits, group_size, codebook=None,
                         int8_act=False, exact=False):
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
    out = {
        "qweight": qweight,
        "scales_zeros": sz,
        "col_scales": weights.col_scales.to(torch.float32).cpu().contiguous(),
    }
    if weights.codebook is not None:
        out["codebook"] = codebook_values(weights.codebook, torch.float16).float().contiguous()
    return out


def cpu_linear(tensors: dict[str, torch.Tensor], spec: LayerSpec, x: torch.Tensor, bias: torch.Tensor | None,
               int8_act: bool = False, exact: bool = False):
    return torch.ops.sinq_vllm.cpu_linear(
        x,
        tensors["qweight"],
        tensors["scales_zeros"],
        tensors["col_scales"],
        list(spec.shard_offsets),
        bias,
        spec.nbits,
        spec.group_size,
        tensors.get("codebook"),
        int8_act,
        exact,
    )


class CpuBackend(KernelBackend):
    name = "cpu"
    codebooks = frozenset({"nf4", "nf3"})

    def __init__(self):
        self.act_mode = activation_mode()

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
        if spec.codebook is not None and spec.nbits > 4:
            return f"{spec.codebook.upper()} codebook with {spec.nbits}-bit codes (at most 4)"
        if spec.group_size % 8 != 0:
            return f"group size {spec.group_size} is not a multiple of 8"
        if spec.in_features % spec.group_size != 0:
            return f"in_features {spec.in_features} is not a multiple of group size {spec.group_size}"
        return spec.offsets_problem()

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        if self.act_mode == "int8":
            log_once(
                logger,
                f"SINQ cpu kernel: {ACT_ENV}=int8: activations quantized to int8 per (row, group) in uniform layers "
                "of at most 4 bits; NF4/NF3 and 5-8-bit layers keep exact activations",
            )
        if weights.nbits in (2, 3) and weights.codebook is None:
            log_once(logger, f"SINQ cpu kernel: {weights.nbits}-bit codes are kept as 4-bit nibbles (0.5 byte per weight)")
        elif weights.nbits > 4:
            log_once(
                logger,
                f"SINQ cpu kernel: {weights.nbits}-bit codes use the generic one-byte-per-code path "
                "(correct, slower than the 4-bit path)"
            )
        return repack(weights)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        return cpu_linear(tensors, spec, x, bias, int8_activations(spec, self.act_mode), exact=self.act_mode == "exact")
