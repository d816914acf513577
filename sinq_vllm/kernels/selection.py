"""Choose a kernel backend per layer: by platform, dtype and shape, overridable.

``SINQ_VLLM_BACKEND`` (default ``auto``) forces one backend by name. A forced backend
that cannot run a layer is an error naming the layer and the reason, never a silent
fallback; ``auto`` falls back down the preference list and logs why.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform

import torch

from ..errors import SinqConfigError
from ..log import get_logger
from .contract import KernelBackend, LayerSpec

logger = get_logger(__name__)

ENV_VAR = "SINQ_VLLM_BACKEND"

# name -> "module:Class", imported lazily so that registering the plugin stays cheap
_BACKENDS: dict[str, str] = {
    "cpu": "sinq_vllm.kernels.cpu_backend:CpuBackend",
    "cuda": "sinq_vllm.kernels.cuda_backend:CudaBackend",
    "triton": "sinq_vllm.kernels.triton_backend:TritonBackend",
    "torch": "sinq_vllm.kernels.torch_backend:TorchBackend",
}
# preference order per device type. On CUDA the choice by M happens per call inside the
# chosen backend's op (``cuda``: its decode kernel for M <= 16, the Triton GEMM above).
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

_instances: dict[str, KernelBackend] = {}
_logged: set[tuple] = set()


def backend_names() -> list[str]:
    """Valid values of ``SINQ_VLLM_BACKEND``."""
    return ["auto", *_BACKENDS]


def available_backends() -> list[str]:
    """The backends that can run in this process (built, and with their device present)."""
    return [name for name in _BACKENDS if load_backend(name)[0] is not None]


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in backend_names():
        raise SinqConfigError(f"{ENV_VAR}={value!r} is not a SINQ kernel backend; valid values: {', '.join(backend_names())}")
    return value


def load_backend(name: str) -> tuple[KernelBackend | None, str | None]:
    if name in _instances:
        return _instances[name], None
    module_name, cls_name = _BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError as e:
        return None, f"not installed ({e})"
    reason = cls.unavailable_reason()
    if reason:
        return None, reason
    _instances[name] = cls()
    return _instances[name], None


def choose_backend(spec: LayerSpec, act_dtype: torch.dtype, device: torch.device) -> tuple[str | None, list[str]]:
    """The backend ``select_backend`` would pick for such a layer here, and why the preferred
    ones were skipped; nothing is logged (``sinq-vllm doctor`` and ``inspect`` report it)."""
    requested = requested_backend()
    candidates = (requested,) if requested != "auto" else _PREFERENCE.get(device.type, ("torch",))
    rejected: list[str] = []
    for name in candidates:
        backend, reason = load_backend(name)
        if backend is not None:
            reason = _codebook_problem(backend, spec) or backend.unsupported_reason(spec, act_dtype, device)
        if reason is None:
            return name, rejected
        rejected.append(f"{name}: {reason}")
    return None, rejected


def select_backend(spec: LayerSpec, act_dtype: torch.dtype, device: torch.device, layer_name: str) -> KernelBackend:
    name, rejected = choose_backend(spec, act_dtype, device)
    if name is not None:
        _log_choice(name, spec, act_dtype, device, rejected)
        return _instances[name]
    requested = requested_backend()
    candidates = (requested,) if requested != "auto" else _PREFERENCE.get(device.type, ("torch",))
    usable = [n for n in _BACKENDS if n not in candidates and _fits(n, spec, act_dtype, device)]
    hint = f"; backends that can run it: {', '.join(usable)} (or {ENV_VAR}=auto)" if usable else ""
    raise SinqConfigError(
        f"no SINQ kernel backend can run layer '{layer_name}' ({spec.nbits}-bit, group {spec.group_size}, "
        f"{act_dtype}, {device.type}; {ENV_VAR}={requested}): " + "; ".join(rejected) + hint
    )


def native_cpu_expected() -> bool:
    """True on the CPUs the native kernel is built for (Linux x86-64, build_ext_config.py)."""
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def _fits(name: str, spec: LayerSpec, act_dtype, device) -> bool:
    backend, _ = load_backend(name)
    return backend is not None and (_codebook_problem(backend, spec) or backend.unsupported_reason(
        spec, act_dtype, device)) is None


def _codebook_problem(backend: KernelBackend, spec: LayerSpec) -> str | None:
    if spec.codebook is None or spec.codebook in backend.codebooks:
        return None
    return f"{spec.codebook.upper()} codebook layers are not implemented in this backend"


#: how to get the native CPU kernel back, for the fallback warning
CPU_FIX = (
    "reinstall sinq-vllm so that it builds its CPU kernel against this environment's torch: "
    "`pip install --no-build-isolation .` from a source checkout (or plain `pip install .`, whose isolated build "
    "uses the same torch version; it needs the index that torch came from, e.g. --extra-index-url "
    "https://download.pytorch.org/whl/cpu), then check with `sinq-vllm doctor`"
)


def _log_choice(name, spec: LayerSpec, act_dtype, device, rejected) -> None:
    key = (name, spec.nbits, spec.group_size, str(act_dtype), device.type, tuple(rejected))
    if key in _logged:
        return
    _logged.add(key)
    why = "forced by " + ENV_VAR if os.environ.get(ENV_VAR, "auto") not in ("", "auto") else "first that fits"
    extra = f" (skipped: {'; '.join(rejected)})" if rejected else ""
    kind = f"{spec.nbits}-bit{' ' + spec.codebook.upper() if spec.codebook else ''} g{spec.group_size}"
    if name == "torch" and device.type == "cpu" and rejected and native_cpu_expected():
        # never a silent slow path (docs/design.md §4.4): say why and how to fix it
        unavailable = load_backend("cpu")[0] is None
        fix = CPU_FIX if unavailable else "the native CPU kernel does not support this layer (see the reason)"
        logger.warning(
            "SINQ: %s layers on cpu/%s run on the portable torch fallback, several times slower than the "
            "native CPU kernel, because %s. Fix: %s",
            kind, str(act_dtype).replace("torch.", ""), "; ".join(rejected), fix,
        )
        return
    # A backend skipped for a codebook it lacks means a slower path than the user may expect:
    # say it as a warning, never silently.
    level = logging.WARNING if spec.codebook is not None and rejected else logging.INFO
    logger.log(
        level, "SINQ: %s layers on %s/%s use the '%s' kernel backend (%s)%s",
        kind, device.type, str(act_dtype).replace("torch.", ""), name, why, extra,
    )
