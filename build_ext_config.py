"""Native extensions of sinq-vllm, kept out of setup.py so it stays readable.

One function per extension; ``get_ext_modules()`` collects the ones this machine can
build. The CPU kernel is required on Linux: without torch in the build environment the
build fails with the fix (``pip install .`` gets torch from build_backend.py, pinned to the
target environment's version) rather than install a wheel that silently serves the slow
torch fallback; ``SINQ_VLLM_SKIP_CPU_EXT=1`` opts out.

* ``sinq_vllm._C_cpu`` (:func:`cpu_extension`): the CPU kernel of the SINQ linear op,
  ``csrc/cpu/*.cpp``. Built for the baseline x86-64 target; the AVX-512/AVX512_BF16 and
  AVX2 kernels carry function-level ``target`` attributes and are chosen at run time,
  so the wheel runs on any x86-64 CPU (and the scalar kernel elsewhere).
* ``sinq_vllm._C_cuda`` (:func:`cuda_extension`): the CUDA decode kernel,
  ``csrc/cuda/*.cu`` (pure CUDA, no torch headers) plus the torch binding
  ``csrc/cuda/binding.cpp``. Built only when torch is a CUDA build (``torch.version.cuda``)
  and a CUDA toolkit is found; skipped quietly otherwise (the Triton backend still
  serves GPUs). Architectures: ``TORCH_CUDA_ARCH_LIST`` when set (torch turns it into
  ``-gencode`` flags), else sm_80, sm_86, sm_89, sm_90 and compute_90 PTX (the kernels
  need sm_80+: bf16 ``mma.sync``); the JIT build compiles only the running GPU's
  architecture. No ``-std`` flag: torch's build adds the C++ standard its headers need.
"""

from __future__ import annotations

import glob
import os
import platform
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES_DIR = os.path.join("csrc", "cpu")

# Set SINQ_VLLM_SKIP_CPU_EXT=1 to install without the CPU kernel.
_SKIP_CPU_ENV = "SINQ_VLLM_SKIP_CPU_EXT"


def _torch_cpp_extension():
    """torch's cpp_extension, or None without torch (pip's metadata hooks run before the build
    requirements are installed; the CPU extension reports a real build without torch itself)."""
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415
    except ImportError:
        return None
    return cpp_extension


def cpu_compile_args() -> tuple[list[str], list[str]]:
    """(extra_compile_args, extra_link_args) for the CPU kernel; shared with the JIT build."""
    cflags = ["-O3", "-std=c++17", "-fno-math-errno", "-Wno-unknown-pragmas"]
    ldflags: list[str] = []
    try:
        import torch  # noqa: PLC0415

        uses_openmp = "OpenMP" in torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001
        uses_openmp = False
    if uses_openmp:
        # at::parallel_for is a header template: without -fopenmp it would run serially.
        # libgomp.so.1 resolves to the copy torch already loaded (same soname).
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


_NO_TORCH_FIX = (
    "sinq-vllm: the CPU kernel is a torch C++ extension, but torch is not importable in the build environment. "
    "Use `pip install .` (sinq-vllm's build backend, build_backend.py, then puts the torch version of your "
    "environment into pip's isolated build), or install torch first and run `pip install --no-build-isolation .`; "
    f"{_SKIP_CPU_ENV}=1 installs without the kernel (the torch fallback then serves CPUs, several times slower, "
    "with a warning)"
)


def _skip_cpu_extension() -> bool:
    value = os.environ.get(_SKIP_CPU_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"sinq-vllm: {_SKIP_CPU_ENV}={value!r} is not valid; valid values: 0, 1")
    return value == "1"


def cpu_extension():
    """The CPU kernel extension ``sinq_vllm._C_cpu``, or None when it is not built here.

    Without torch at build time (on Linux, where the kernel is built) this is a placeholder
    that makes ``build_ext`` fail with the fix (:data:`_NO_TORCH_FIX`): a wheel without its
    kernel would silently serve the slow torch fallback. Metadata-only steps (``egg_info``,
    pip's ``get_requires_*`` hooks, which run before torch is installed) still work.
    """
    if _skip_cpu_extension():
        return None
    if platform.system() != "Linux":
        warnings.warn("sinq-vllm: the CPU kernel is only built on Linux", stacklevel=2)
        return None
    sources = sorted(glob.glob(os.path.join(CPU_SOURCES_DIR, "*.cpp"), root_dir=ROOT))
    if not sources:
        return None
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415
    except ImportError:
        from setuptools import Extension  # noqa: PLC0415

        return Extension("sinq_vllm._C_cpu", sources=sources)  # built by _NoTorchBuildExt: fails with the fix
    cflags, ldflags = cpu_compile_args()
    return cpp_extension.CppExtension(
        name="sinq_vllm._C_cpu",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CPU_SOURCES_DIR)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


CUDA_SOURCES_DIR = os.path.join("csrc", "cuda")

# Set SINQ_VLLM_SKIP_CUDA_EXT=1 to install without the CUDA kernel.
_SKIP_CUDA_ENV = "SINQ_VLLM_SKIP_CUDA_EXT"
CUDA_DEFAULT_GENCODES = ("80", "86", "89", "90")


def cuda_compile_args(archs: list[str] | None = None) -> dict[str, list[str]]:
    """extra_compile_args of the CUDA extension, shared with the JIT build (which passes the running
    GPU's ``archs``, e.g. ``["90"]``). Without ``archs``: ``TORCH_CUDA_ARCH_LIST`` when set, else
    :data:`CUDA_DEFAULT_GENCODES` plus PTX of the newest."""
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if archs is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = list(CUDA_DEFAULT_GENCODES)
        nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs or ()]
    return {"cxx": ["-O3"], "nvcc": nvcc}


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_SOURCES_DIR, "*.cu"), root_dir=ROOT)) + [
        os.path.join(CUDA_SOURCES_DIR, "binding.cpp")
    ]


def cuda_extension():
    """The CUDA kernel extension ``sinq_vllm._C_cuda``, or None when it cannot be built here."""
    if os.environ.get(_SKIP_CUDA_ENV, "0") not in ("", "0"):
        return None
    cpp_extension = _torch_cpp_extension()
    if cpp_extension is None:
        return None
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    if not getattr(torch.version, "cuda", None):
        return None  # CPU build of torch: nothing to link against, skip quietly
    if cpp_extension.CUDA_HOME is None:
        warnings.warn(
            "sinq-vllm: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME), so the CUDA "
            "kernel is not built; the Triton backend serves GPUs",
            stacklevel=2,
        )
        return None
    if not os.path.exists(os.path.join(ROOT, CUDA_SOURCES_DIR, "binding.cpp")):
        return None
    return cpp_extension.CUDAExtension(
        name="sinq_vllm._C_cuda",
        sources=cuda_sources(),
        include_dirs=[os.path.join(ROOT, CUDA_SOURCES_DIR)],
        extra_compile_args=cuda_compile_args(),
    )


def get_ext_modules():
    exts = []
    for make in (cpu_extension, cuda_extension):
        ext = make()
        if ext is not None:
            exts.append(ext)
    return exts


def get_cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension  # noqa: PLC0415
    except ImportError:
        from setuptools.command.build_ext import build_ext  # noqa: PLC0415

        class _NoTorchBuildExt(build_ext):
            def run(self):
                if self.extensions:
                    raise SystemExit(_NO_TORCH_FIX)

        return {"build_ext": _NoTorchBuildExt}
    return {"build_ext": BuildExtension}
