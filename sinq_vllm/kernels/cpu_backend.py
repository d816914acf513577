"""CPU backend: the C++ kernel ``torch.ops.sinq_vllm.cpu_linear`` (csrc/cpu/).

The op is registered by the compiled extension ``sinq_vllm._C_cpu`` (built by
``pip install``, see build_ext_config.py). When that module is missing but the sources
are next to the package (editable install, source checkout) and a C++ compiler exists,
the extension is JIT-built once with ``torch.utils.cpp_extension.load`` and cached under
``$SINQ_VLLM_CACHE`` (default ``~/.cache/sinq_vllm``); ``SINQ_VLLM_CPU_JIT=0`` disables
that. The kernel picks AVX-512+AVX512_BF16, AVX2 or a scalar loop at run time
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

import importlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from .base import KernelBackend, LayerSpec, SinqWeights

logger = logging.getLogger("sinq_vllm")

TILE_ROWS = 64
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_JIT_ENV = "SINQ_VLLM_CPU_JIT"
_CACHE_ENV = "SINQ_VLLM_CACHE"
_SOURCES_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cpu"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", set once
_fake_registered = False


def _jit_build():
    """Build the extension from csrc/cpu with torch.utils.cpp_extension.load (cached)."""
    from torch.utils import cpp_extension  # noqa: PLC0415

    sources = sorted(str(p) for p in _SOURCES_DIR.glob("*.cpp"))
    cache = Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "sinq_vllm")
    build_dir = cache / f"cpu_ext_torch{torch.__version__.replace('+', '_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import sys  # noqa: PLC0415

        sys.path.insert(0, str(_SOURCES_DIR.parents[1]))
        from build_ext_config import cpu_compile_args  # noqa: PLC0415

        cflags, ldflags = cpu_compile_args()
    except ImportError:
        cflags, ldflags = ["-O3", "-std=c++17", "-fopenmp"], ["-fopenmp"]
    finally:
        sys.path.pop(0)
    logger.info("SINQ: compiling the CPU kernel from %s into %s (once; cached)", _SOURCES_DIR, build_dir)
    return cpp_extension.load(
        name="sinq_vllm_C_cpu_jit",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=ldflags,
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
        try:
            module = importlib.import_module("sinq_vllm._C_cpu")
        except ImportError as e:
            errors.append(f"compiled module sinq_vllm._C_cpu is missing ({e})")
        if module is None:
            if os.environ.get(_JIT_ENV, "1") in ("0", "false", "no"):
                errors.append(f"JIT build disabled by {_JIT_ENV}=0")
            elif not any(_SOURCES_DIR.glob("*.cpp")):
                errors.append(f"no sources at {_SOURCES_DIR} to JIT-build from")
            elif not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
                errors.append("no C++ compiler found for a JIT build")
            else:
                try:
                    module = _jit_build()
                except Exception as e:  # noqa: BLE001 - any build failure is reported, not raised
                    errors.append(f"JIT build failed: {e}")
        if module is None:
            _state["error"] = "; ".join(errors) + " (reinstall with `pip install -e . --no-build-isolation`)"
            return None
        _state["module"] = module
        _register_fake()
        logger.info("SINQ: CPU kernel %s loaded, ISA %s", getattr(module, "__name__", "?"), module.isa())
        return module


def extension_error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("sinq_vllm::cpu_linear")
    def _cpu_linear_fake(x, qweight, scales_zeros, col_scales, shard_offsets, bias, nbits, group_size):
        return x.new_empty((*x.shape[:-1], shard_offsets[-1]))

    if hasattr(torch.ops.sinq_vllm, "sinkhorn_stds"):  # quantizer op (absent from older builds)

        @torch.library.register_fake("sinq_vllm::sinkhorn_stds")
        def _sinkhorn_stds_fake(m, mu1, mu2):
            return m.new_empty(m.shape[:2]), m.new_empty((m.shape[0], m.shape[2]))

    _fake_registered = True


def num_tiles(shard_offsets) -> int:
    return sum(-(-(b - a) // TILE_ROWS) for a, b in zip(shard_offsets[:-1], shard_offsets[1:]))


def _pad_shards(t: torch.Tensor, shard_offsets) -> torch.Tensor:
    """Rows of each shard padded with zeros to a multiple of TILE_ROWS, concatenated."""
    parts = []
    for a, b in zip(shard_offsets[:-1], shard_offsets[1:]):
        rows = b - a
        padded = -(-rows // TILE_ROWS) * TILE_ROWS
        part = t[a:b]
        if padded != rows:
            part = torch.cat([part, part.new_zeros((padded - rows, *t.shape[1:]))])
        parts.append(part)
    return torch.cat(parts) if parts else t[:0]


def repack(weights: SinqWeights) -> dict[str, torch.Tensor]:
    """Canonical SinqWeights -> the resident CPU layout (see module docstring)."""
    offs = tuple(int(o) for o in weights.shard_offsets)
    n, k = weights.codes.shape
    g = weights.group_size
    codes = _pad_shards(weights.codes.to(torch.uint8).cpu(), offs)
    t = codes.shape[0] // TILE_ROWS
    if weights.nbits <= 4:
        c = codes.view(t, 4, 16, k // 8, 4, 2).permute(0, 3, 1, 2, 5, 4).to(torch.int32)  # [T, k8, sb, r, e, h]
        words = c[..., 0] | (c[..., 1] << 4) | (c[..., 2] << 8) | (c[..., 3] << 12)
        lo, hi = (words & 0xFF).to(torch.uint8), (words >> 8).to(torch.uint8)  # little-endian uint16
        qweight = torch.stack([lo, hi], dim=-1).contiguous().view(-1)
    else:
        qweight = codes.view(t, 4, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous().view(-1)
    s = _pad_shards(weights.scales.to(torch.float16).cpu(), offs)
    z = _pad_shards(weights.zeros.to(torch.float16).cpu(), offs)
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
        if load_extension() is None:
            return "CPU kernel not available: " + (extension_error() or "unknown error")
        return None

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
        offs = spec.shard_offsets
        if len(offs) < 2 or offs[0] != 0 or offs[-1] != spec.out_features or any(b < a for a, b in zip(offs, offs[1:])):
            return f"shard offsets {offs} do not partition {spec.out_features} output rows"
        return None

    def prepare(self, weights: SinqWeights) -> dict[str, torch.Tensor]:
        if weights.nbits in (2, 3):
            _log_once(f"SINQ cpu kernel: {weights.nbits}-bit codes are kept as 4-bit nibbles (0.5 byte per weight)")
        elif weights.nbits > 4:
            _log_once(
                f"SINQ cpu kernel: {weights.nbits}-bit codes use the generic one-byte-per-code path "
                "(correct, slower than the 4-bit path)"
            )
        return repack(weights)

    def apply(self, tensors, spec: LayerSpec, x, bias):
        return cpu_linear(tensors, spec, x, bias)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)
