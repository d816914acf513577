"""The one loader of sinq-vllm's native extensions (``sinq_vllm._C_cpu``, ``sinq_vllm._C_cuda``).

``pip install`` builds them (build_ext_config.py). When a compiled module is missing but
the sources sit next to the package (editable install, source checkout) and a compiler
exists, the extension is JIT-built once with ``torch.utils.cpp_extension.load`` and
cached under ``$SINQ_VLLM_CACHE`` (default ``~/.cache/sinq_vllm``); ``SINQ_VLLM_<KIND>_JIT=0``
disables that. Each extension is loaded at most once per process; why it is not
available is kept for the error messages and logs of the backends.

``SINQ_VLLM_REQUIRE_<KIND>=1`` (set by scripts/gpu_check.sh for CUDA) turns "not
available" into an :class:`ExtensionUnavailable` error carrying the whole reason, the
compiler output of a failed JIT build included: a check run on a GPU never skips or falls
back silently (docs/design.md §4.2).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..log import get_logger

logger = get_logger(__name__)

CACHE_ENV = "SINQ_VLLM_CACHE"
SOURCES_ROOT = Path(__file__).resolve().parents[2] / "csrc"


@dataclass(frozen=True)
class NativeExtension:
    kind: str  # "cpu" | "cuda": the csrc/ folder and the env switch SINQ_VLLM_<KIND>_JIT
    module: str  # the module pip builds, e.g. "sinq_vllm._C_cpu"
    sources: Callable[[Path], list[str]]  # source files under csrc/<kind>
    build_flags: Callable[[], dict[str, list[str]]]  # build_ext_config.py's flags: cflags, ldflags, cuda_cflags
    can_build: Callable[[], str | None]  # None, or why a JIT build cannot run here
    on_load: Callable[[object], None]  # registers fake impls etc.; runs once, after loading

    @property
    def sources_dir(self) -> Path:
        return SOURCES_ROOT / self.kind

    @property
    def jit_env(self) -> str:
        return f"SINQ_VLLM_{self.kind.upper()}_JIT"

    @property
    def require_env(self) -> str:
        return f"SINQ_VLLM_REQUIRE_{self.kind.upper()}"

    def required(self) -> bool:
        return os.environ.get(self.require_env, "0").strip().lower() in ("1", "true", "yes", "on")


class ExtensionUnavailable(RuntimeError):
    """A required native extension (``SINQ_VLLM_REQUIRE_<KIND>=1``) could not be loaded or built."""


_lock = threading.Lock()
_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(ext: NativeExtension):
    """The extension module, or None; the reason is in :func:`error`. Raises
    :class:`ExtensionUnavailable` instead of returning None when the extension is required."""
    module = _load(ext)
    if module is None and ext.required():
        raise ExtensionUnavailable(
            f"{ext.require_env}=1 but the {ext.kind.upper()} extension {ext.module} is not available:\n{error(ext)}"
        )
    return module


def _load(ext: NativeExtension):
    with _lock:
        if ext.kind in _loaded or ext.kind in _errors:
            return _loaded.get(ext.kind)
        module, errors = None, []
        try:
            module = importlib.import_module(ext.module)
        except ImportError as e:
            errors.append(f"compiled module {ext.module} is missing ({e})")
        if module is None:
            why_not = _jit_unavailable(ext)
            if why_not:
                errors.append(why_not)
            else:
                try:
                    module = _jit_build(ext)
                except Exception as e:  # noqa: BLE001 - any build failure is reported, not raised
                    errors.append(f"JIT build failed: {e}")
        if module is None:
            _errors[ext.kind] = "; ".join(errors)
            return None
        _loaded[ext.kind] = module
        ext.on_load(module)
        return module


def error(ext: NativeExtension) -> str | None:
    return _errors.get(ext.kind)


def unavailable_reason(ext: NativeExtension, hint: str = "") -> str | None:
    """None when the extension loads, else why not (for a backend's ``unavailable_reason``)."""
    if load(ext) is not None:
        return None
    return f"{ext.kind.upper()} kernel not available: {error(ext) or 'unknown error'}{hint}"


def _jit_unavailable(ext: NativeExtension) -> str | None:
    if os.environ.get(ext.jit_env, "1").strip().lower() in ("0", "false", "no"):
        return f"JIT build disabled by {ext.jit_env}=0"
    if not ext.sources(ext.sources_dir):
        return f"no sources at {ext.sources_dir} to JIT-build from"
    return ext.can_build()


def build_config():
    """The repository's build_ext_config module (next to setup.py), or None in an installed wheel."""
    sys.path.insert(0, str(SOURCES_ROOT.parent))
    try:
        import build_ext_config  # noqa: PLC0415

        return build_ext_config
    except ImportError:
        return None
    finally:
        sys.path.pop(0)


def _jit_build(ext: NativeExtension):
    from torch.utils import cpp_extension  # noqa: PLC0415

    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sinq_vllm")
    build_dir = cache / f"{ext.kind}_ext_torch{torch.__version__.replace('+', '_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ext.build_flags()
    logger.info("SINQ: compiling the %s kernels from %s into %s (once; cached)", ext.kind, ext.sources_dir, build_dir)
    return cpp_extension.load(
        name=f"sinq_vllm_C_{ext.kind}_jit",
        sources=ext.sources(ext.sources_dir),
        extra_cflags=flags.get("cflags", []),
        extra_ldflags=flags.get("ldflags", []),
        extra_cuda_cflags=flags.get("cuda_cflags", []),
        extra_include_paths=[str(ext.sources_dir)],
        build_directory=str(build_dir),
        verbose=False,  # not verbose: a failure's exception then carries the compiler output
    )
