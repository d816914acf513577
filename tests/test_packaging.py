"""Packaging contracts: plugin entry point, idempotent registration, no top-level shadowing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "sinq" and ep.value == "sinq_vllm:register" for ep in eps)


def test_register_is_idempotent_and_adds_sinq():
    import sinq_vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    sinq_vllm.register()
    sinq_vllm.register()
    assert QUANTIZATION_METHODS.count("sinq") == 1
    assert get_quantization_config("sinq").__name__ == "SinqConfig"


def test_register_is_cheap():
    """No kernel build, no CUDA init: importing the package pulls in no extension module."""
    code = "import sinq_vllm, sys; print(any(m.startswith('sinq_vllm._C') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False"


def test_triton_kernels_ship_under_our_namespace_only():
    assert importlib.util.find_spec("sinq_vllm.triton_kernels") is not None
    spec = importlib.util.find_spec("triton_kernels")
    # vLLM probes for an unrelated `triton_kernels` package; ours must never be it.
    assert spec is None or not str(spec.origin or "").startswith(str(REPO))
