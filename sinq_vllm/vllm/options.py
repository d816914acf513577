"""Every ``SINQ_VLLM_*`` environment switch: what it does, its valid values, and the one
front-end check (docs/design.md §3.1).

Each switch is read where it acts (kernel selection, the native-extension loader, the
Triton kernels, the C++ CPU kernel, the build), often in vLLM's worker processes, which
inherit the environment of ``vllm serve``. A bad value there would fail late, deep in a
worker, or, for the readers that fall back to a default, not at all. So
``SinqConfig.maybe_update_config`` runs :func:`check_environment` in the front-end
process before any engine starts: an unknown ``SINQ_VLLM_*`` name or an invalid value is
one :class:`SinqConfigError` that lists the valid names or values. The README's table of
switches is checked against :data:`SWITCHES` by the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import SinqConfigError
from ..kernels.cpu_backend import ACT_ENV as CPU_ACT_ENV
from ..kernels.cpu_backend import activation_mode
from ..kernels.gpu_layout import DEFAULT_PREFILL_MIN_M, ENV_PREFILL_MIN_M, prefill_min_m
from ..kernels.selection import ENV_VAR as BACKEND_ENV
from ..kernels.selection import requested_backend
from .online import ENV_VAR as ONLINE_ENV
from .online import options_from_env

PREFIX = "SINQ_VLLM_"
_ON_OFF = ("0", "1", "false", "true", "no", "yes", "on", "off")
_JIT = ("0", "1", "false", "true", "no", "yes")  # kernels/native.py: "0", "false", "no" disable it
_SKIP_EXT = ("0", "1")  # build_ext_config.py: anything but "0" (or empty) skips the extension


@dataclass(frozen=True)
class Switch:
    name: str
    default: str
    valid: str  # the valid values, as the error message and the README say them
    read_by: str  # where it acts
    purpose: str
    check: Callable[[str, str], None]  # (name, value): raises SinqConfigError for a bad value


def _choice(values: tuple[str, ...], case_sensitive: bool = False) -> Callable[[str, str], None]:
    def check(name: str, value: str) -> None:
        v = value.strip() if case_sensitive else value.strip().lower()
        if v not in values:
            raise SinqConfigError(f"{name}={value!r} is not valid; valid values: {', '.join(values)}")

    return check


def _count(name: str, value: str) -> None:
    if not value.strip().isdigit():
        raise SinqConfigError(f"{name}={value!r} is not valid; valid values: a whole number >= 0")


def _folder(name: str, value: str) -> None:
    if not value.strip():
        raise SinqConfigError(f"{name} is set but empty; valid values: a folder path (created if missing)")
    if os.path.exists(value) and not os.path.isdir(value):
        raise SinqConfigError(f"{name}={value!r} is not valid: it exists and is not a folder; valid values: "
                              "a folder path (created if missing)")


def _jit(kind: str) -> Switch:
    return Switch(f"SINQ_VLLM_{kind.upper()}_JIT", "1", "0, 1 (also false/true, no/yes)",
                  "native-extension loader (worker)",
                  f"allow a one-time JIT build of the {kind.upper()} kernel when the compiled module is missing",
                  _choice(_JIT))


def _require(kind: str) -> Switch:
    # kernels/native.py reads it (NativeExtension.required): 1/true/yes/on require the extension
    return Switch(f"SINQ_VLLM_REQUIRE_{kind.upper()}", "0", "0, 1 (also false/true, no/yes, off/on)",
                  "native-extension loader (worker)",
                  f"a missing or unbuildable {kind.upper()} kernel is an error showing the build log, instead of "
                  "another backend being selected (scripts/gpu_check.sh sets it for CUDA)",
                  _choice(_ON_OFF))


def _skip_ext(kind: str, then: str) -> Switch:
    return Switch(f"SINQ_VLLM_SKIP_{kind.upper()}_EXT", "0", "0, 1", "pip install (build)",
                  f"build without the {kind.upper()} kernel ({then})", _choice(_SKIP_EXT))


SWITCHES: tuple[Switch, ...] = (
    Switch(BACKEND_ENV, "auto", "auto, cpu, cuda, triton, torch", "kernel selection (worker)",
           "force one kernel backend for every SINQ layer; a forced backend that cannot run a layer is an error",
           lambda name, value: requested_backend()),
    Switch(ONLINE_ENV, "0", "0/1, or comma-separated nbits=, group_size=, method=sinq|rtn, aux=0|1, routers=0|1, "
           "skip=PATTERN (repeatable)", "front end",
           "quantize a bf16/fp16 checkpoint with SINQ while loading it", lambda name, value: options_from_env()),
    Switch("SINQ_VLLM_MOE_KERNEL", "auto", "auto, triton, loop", "MoE layers (worker)",
           "MoE expert kernel: the Triton grouped GEMM (CUDA) or a per-expert loop through the dense backend",
           _choice(("auto", "triton", "loop"))),
    Switch("SINQ_VLLM_CPU_ISA", "auto", "auto, avx512bf16, avx512, avx2, scalar", "C++ CPU kernel (worker)",
           # the C++ kernel compares exact lower-case names (csrc/cpu/sinq_cpu_kernel.cpp)
           "force the instruction set of the CPU kernel (the CPU must support it)",
           _choice(("auto", "avx512bf16", "avx512", "avx2", "scalar"), case_sensitive=True)),
    Switch(CPU_ACT_ENV, "auto", "auto, exact, int8", "C++ CPU kernel (worker)",
           "auto: exact products below 256 rows, bf16 batches of >= 256 rows (prefill) on weights decoded to bf16 "
           "(AVX-512); exact: exact products at every batch size; int8: round x*t to int8 per (row, group) on "
           "uniform <= 4-bit layers (VNNI; faster prefill and batched decode, larger error: docs/design.md §4.2)",
           lambda name, value: activation_mode()),
    _jit("cpu"),
    _jit("cuda"),
    Switch("SINQ_VLLM_CACHE", "~/.cache/sinq_vllm", "a folder path (created if missing)",
           "native-extension loader (worker)", "where JIT-built kernels are cached", _folder),
    Switch("SINQ_VLLM_TRITON_AUTOTUNE", "0", "0, 1 (also false/true, no/yes, off/on)", "Triton kernels (worker)",
           "autotune the Triton GEMM configs (every candidate is a compilation: slow first start)",
           _choice(_ON_OFF)),
    Switch("SINQ_VLLM_TRITON_GEMV_MAX_M", "1", "a whole number >= 0", "Triton kernels (worker)",
           "largest batch (M) that takes the split-K GEMV path", _count),
    Switch("SINQ_VLLM_TRITON_FACTORED_MAX_M", "64", "a whole number >= 0", "Triton kernels (worker)",
           "largest M that takes the group-factored tensor-core path (above: the dequantizing GEMM)", _count),
    Switch(ENV_PREFILL_MIN_M, str(DEFAULT_PREFILL_MIN_M), "a whole number >= 1", "GPU kernels (worker)",
           "from this batch size (M) on, GPU layers dequantize each shard into a bf16/fp16 scratch and call "
           "torch.matmul (cuBLAS)", lambda name, value: prefill_min_m()),
    _require("cpu"),
    _require("cuda"),
    _skip_ext("cpu", "the torch fallback then serves CPUs, with a warning"),
    _skip_ext("cuda", "the Triton backend then serves GPUs"),
)
_BY_NAME = {s.name: s for s in SWITCHES}


def check_environment() -> None:
    """Raise one SinqConfigError for an unknown ``SINQ_VLLM_*`` name or an invalid value."""
    for name in sorted(k for k in os.environ if k.startswith(PREFIX)):
        switch = _BY_NAME.get(name)
        if switch is None:
            raise SinqConfigError(
                f"{name} is not a sinq-vllm switch (a typo?); valid names: {', '.join(_BY_NAME)}")
        switch.check(name, os.environ[name])
