"""Registration with vLLM: the ``sinq`` quantization method and checkpoint auto-detection."""

from __future__ import annotations

import functools

from ..format.checkpoint import has_sinq_sidecar
from ..log import get_logger
from .compat import check_vllm_version, engine_args_class, model_config_class, register_quantization_config
from .config import QUANT_METHOD, SinqConfig
from .model_source import download_dir, engine_source, hf_token

logger = get_logger(__name__)


def register_with_vllm() -> None:
    check_vllm_version(logger)
    register_quantization_config(QUANT_METHOD)(SinqConfig)
    _publish_model_source()
    _detect_sidecar_only_checkpoints()


def _wrap_once(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, "_sinq_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._sinq_wrapped = True
    setattr(cls, name, wrapper)


def _publish_model_source() -> None:
    """``--download-dir`` and ``--hf-token`` for the Hub downloads of detection and
    ``maybe_update_config`` (vllm/model_source.py): both run inside ``EngineArgs.create_engine_config``."""

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            with engine_source(getattr(self, "download_dir", None), getattr(self, "hf_token", None)):
                return original(self, *args, **kwargs)

        return create_engine_config

    _wrap_once(engine_args_class(), "create_engine_config", make)


def _detect_sidecar_only_checkpoints() -> None:
    """Serve reference-API checkpoints (sidecar, no quantization_config) without a flag.

    vLLM decides the quantization method in ``ModelConfig._verify_quantization`` from
    ``config.json`` only; the reference SINQ code writes no ``quantization_config``.
    We select ``sinq`` there when the model folder, or the Hub repository at the requested
    revision, carries the SINQ sidecar and the user asked for nothing else. For a Hub id
    vLLM has fetched only ``config.json`` at this point, so the sidecar is fetched here
    (format/hub.py); a checkpoint with SINQ codes but no reachable sidecar is an error.
    """

    def make(original):
        def _verify_quantization(self) -> None:
            if (
                self.quantization is None
                and getattr(self.model_arch_config, "quantization_config", None) is None
                and has_sinq_sidecar(self.model, getattr(self, "revision", None), download_dir(), hf_token())
            ):
                logger.info("%s carries a SINQ sidecar meta file: using --quantization sinq", self.model)
                self.quantization = QUANT_METHOD
            return original(self)

        return _verify_quantization

    _wrap_once(model_config_class(), "_verify_quantization", make)
