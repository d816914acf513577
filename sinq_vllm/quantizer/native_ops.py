"""The quantizer's ops in the CPU extension (csrc/cpu/), looked up once per process.

Each has a torch version next to its caller; the native one computes the same thing in one
pass over the data instead of one tensor op at a time (docs/design.md §4.2, native extensions).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_op(name: str):
    """``torch.ops.sinq_vllm.<name>`` when the CPU extension provides it, else None."""
    from ..kernels.cpu_backend import load_extension

    if load_extension() is None or not hasattr(torch.ops.sinq_vllm, name):
        return None
    return getattr(torch.ops.sinq_vllm, name)
