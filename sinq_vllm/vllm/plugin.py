"""Registration with vLLM: the ``sinq`` quantization method and checkpoint auto-detection."""

from __future__ import annotations

import functools

from ..format.checkpoint import has_sinq_sidecar
from ..log import get_logger
from .compat import check_vllm_version, model_config_class, register_quantization_config
from .config import QUANT_METHOD, SinqConfig

logger = get_logger(__name__)


def register_with_vllm() -> None:
    check_vllm_version(logger)
    register_quantization_config(QUANT_METHOD)(SinqConfig)
    _detect_sidecar_only_checkpoints()


def _detect_sidecar_only_checkpoints() -> None:
    """Serve reference-API checkpoints (sidecar, no quantization_config) without a flag.

    vLLM decides the quantization method in ``ModelConfig._verify_quantization`` from
    ``config.json`` only; the reference SINQ code writes no ``quantization_config``.
    We select ``sinq`` there when the model folder carries the SINQ sidecar and the
    user asked for nothing else.
    """
    model_config_cls = model_config_class()
    original = model_config_cls._verify_quantization
    if getattr(original, "_sinq_wrapped", False):
        return

    @functools.wraps(original)
    def _verify_quantization(self) -> None:
        if (
            self.quantization is None
            and getattr(self.model_arch_config, "quantization_config", None) is None
            and has_sinq_sidecar(self.model)
        ):
            logger.info("%s carries a SINQ sidecar meta file: using --quantization sinq", self.model)
            self.quantization = QUANT_METHOD
        return original(self)

    _verify_quantization._sinq_wrapped = True
    model_config_cls._verify_quantization = _verify_quantization
