"""Helpers (not a test module) for the tests that need a CUDA GPU.

Without a GPU they are skipped, with the reason; with ``SINQ_VLLM_REQUIRE_CUDA=1`` (set by
scripts/gpu_check.sh) a missing GPU or CUDA extension is a failure that shows why (the
extension's build log included), never a skip (docs/design.md §4.2).
"""

from __future__ import annotations

import os

import pytest
import torch

REQUIRED = os.environ.get("SINQ_VLLM_REQUIRE_CUDA", "0").strip().lower() in ("1", "true", "yes", "on")

#: module-level mark: skip without a GPU, unless one is required (then the fixtures fail)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRED,
                               reason="no CUDA device (SINQ_VLLM_REQUIRE_CUDA=1 makes this a failure)")


def gpu_or_fail():
    if not torch.cuda.is_available():
        pytest.fail("SINQ_VLLM_REQUIRE_CUDA=1 but torch sees no CUDA device")


def cuda_extension():
    """The loaded CUDA extension; its absence skips (fails when required, with the build log)."""
    from sinq_vllm.kernels import cuda_backend

    gpu_or_fail()
    module = cuda_backend.load_extension()  # raises, with the build log, when required
    if module is None:
        pytest.skip(f"CUDA extension unavailable: {cuda_backend.extension_error()}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the decode kernel needs compute capability 8.0+")
    return module
