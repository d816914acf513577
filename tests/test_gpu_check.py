"""scripts/gpu_check.sh without a GPU, and the no-silent-fallback contract it relies on.

* ``gpu_check.sh --dry-run`` runs every step but the GPU calls (versions, the build's
  inputs, collection of the GPU tests, the kernel benchmark on tiny shapes in Triton's
  interpreter), so the one command a GPU session runs cannot rot unnoticed.
* ``SINQ_VLLM_REQUIRE_CUDA=1`` turns "CUDA extension unavailable" into an error carrying
  the reason and the build log (docs/design.md §4.2).
* The CUDA build flags: no hard-coded ``-std`` (torch adds the standard its headers need),
  and a JIT build for the running GPU's architecture only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("SINQ_VLLM_REQUIRE_CUDA", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for step in ("versions", "build", "GPU tests", "kernel benchmark"):
        assert f"=== {step}: ok" in log, f"step {step!r} did not pass:\n{log[-4000:]}"
    files = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check.log", "versions.txt", "build.log", "kernels_dry_run.md", "kernels_dry_run.json"} <= files
    assert "torch " + torch.__version__ in (tmp_path / "versions.txt").read_text()
    collected = [line for line in log.splitlines() if "tests collected" in line]
    assert collected and int(collected[-1].split()[0]) >= 100, collected  # the GPU run's selection
    table = (tmp_path / "kernels_dry_run.md").read_text()
    assert "| qkv_proj | 80 x 128 | 20 |" in table and "sinq-cuda: unavailable" in table


def test_gpu_check_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_required_cuda_backend_fails_instead_of_falling_back(monkeypatch):
    from sinq_vllm.kernels import cuda_backend, native

    if torch.cuda.is_available():
        pytest.skip("checks the machine without a GPU")
    monkeypatch.setenv("SINQ_VLLM_REQUIRE_CUDA", "1")
    with pytest.raises(native.ExtensionUnavailable, match="SINQ_VLLM_REQUIRE_CUDA=1 .*(no CUDA device|not a CUDA build)"):
        cuda_backend.CudaBackend.unavailable_reason()
    monkeypatch.delenv("SINQ_VLLM_REQUIRE_CUDA")
    assert cuda_backend.CudaBackend.unavailable_reason() in ("no CUDA device", "torch is not a CUDA build")


def test_required_extension_error_shows_the_build_log(monkeypatch, tmp_path):
    """A required extension whose JIT build fails raises with the compiler's output."""
    from sinq_vllm.kernels import native

    src = tmp_path / "broken"
    src.mkdir()
    (src / "bad.cpp").write_text("this is not C++ at all;\n")
    ext = native.NativeExtension(
        kind="brokentest", module="sinq_vllm._C_brokentest", sources=lambda d: [str(src / "bad.cpp")],
        build_flags=lambda: {"cflags": ["-O0"]}, can_build=lambda: None, on_load=lambda m: None,
    )
    monkeypatch.setattr(native.NativeExtension, "sources_dir", property(lambda self: src))
    monkeypatch.setenv("SINQ_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ext.require_env, "1")
    with pytest.raises(native.ExtensionUnavailable) as info:
        native.load(ext)
    message = str(info.value)
    assert "SINQ_VLLM_REQUIRE_BROKENTEST=1" in message and "JIT build failed" in message
    assert "bad.cpp" in message and "error" in message.lower()  # the compiler's own words
    monkeypatch.delenv(ext.require_env)
    assert native.load(ext) is None and "JIT build failed" in native.error(ext)


def test_cuda_build_flags():
    sys.path.insert(0, str(ROOT))
    try:
        import build_ext_config
    finally:
        sys.path.pop(0)
    default = build_ext_config.cuda_compile_args()
    jit = build_ext_config.cuda_compile_args(["90"])
    for flags in (default, jit):
        assert not any(f.startswith("-std") for f in flags["cxx"] + flags["nvcc"])
    assert [f for f in jit["nvcc"] if "arch" in f] == ["-gencode=arch=compute_90,code=sm_90"]
    assert sum("code=sm_" in f for f in default["nvcc"]) == len(build_ext_config.CUDA_DEFAULT_GENCODES)
