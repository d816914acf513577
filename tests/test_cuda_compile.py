"""Compile-only checks of the GPU kernels; no GPU needed.

* ``scripts/compile_cuda.sh``: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a, warnings
  (register spills included) as errors. Skipped when nvcc is not on PATH.
  ``SINQ_TEST_CUDA_BINDING=1`` also syntax-checks csrc/cuda/binding.cpp against the
  installed torch headers (about a minute).
* The Triton kernels, compiled for sm_80 and sm_90 with Triton's bundled ptxas through
  ``sinq_gemm.compile_for_target``: each path, both activation dtypes, 4- and 8-bit,
  split-K on and off (the interpreter tests cannot catch GPU-only compile errors).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_for_sm80_and_sm90a(tmp_path):
    args = ["bash", str(ROOT / "scripts" / "compile_cuda.sh")]
    if os.environ.get("SINQ_TEST_CUDA_BINDING") == "1":
        args.append("--binding")
    env = dict(os.environ, SINQ_CUDA_BUILD_DIR=str(tmp_path))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    objects = sorted(p.name for p in tmp_path.glob("*.o"))
    assert objects == sorted(p.stem + ".o" for p in (ROOT / "csrc" / "cuda").glob("*.cu")), objects


triton = pytest.importorskip("triton")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

        return get_ptxas(90) is not None
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not available")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    from sinq_vllm.triton_kernels import sinq_gemm as G

    cases = [
        ("gemv", torch.bfloat16, 4, 64, G.Config(1, 128, 64, 4, 2), 4),
        ("factored", torch.float16, 4, 128, G.Config(16, 64, 64, 4, 3), 2),
        ("factored", torch.bfloat16, 8, 32, G.Config(32, 128, 32, 4, 3), 1),
        ("dequant", torch.bfloat16, 4, 64, G.Config(128, 128, 32, 8, 3), 1),
        ("dequant", torch.float16, 8, 16, G.Config(64, 64, 64, 4, 3), 1),  # BLOCK_K spans groups
    ]
    for path, dtype, nbits, group, cfg, split in cases:
        kernel = G.compile_for_target(path, dtype, nbits, group, cfg, split_k=split, arch=arch)
        assert kernel.asm.get("cubin"), (path, dtype, nbits, group)
        if path != "gemv":
            assert "mma" in kernel.asm["ptx"], f"{path}: no tensor-core instructions"
