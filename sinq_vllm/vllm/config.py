"""``SinqConfig``: vLLM's view of a SINQ checkpoint.

Two sources describe a checkpoint: ``config.json``'s ``quantization_config`` (written
by our quantizer and by Transformers' ``SinqConfig``) and the per-layer sidecar meta
(always written, and the only one the reference code's own API writes). The sidecar
is the per-layer truth; ``quantization_config`` is checked against it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SinqCheckpointError, SinqConfigError
from ..format.checkpoint import (
    check_sidecar_matches_tensors,
    json_keys_have_legacy_prefix,
    locate_checkpoint,
    read_layer_metas,
    tensor_names,
)
from ..format.layer_meta import LayerMeta
from ..format.names import DROPPED_BUFFER_SUFFIXES, LEGACY_RENAMES, strip_legacy_prefix
from ..format.packing import SUPPORTED_BITS
from ..format.validation import validate_checkpoint
from ..log import get_logger
from .compat import LinearBase, ParallelLMHead, QuantizationConfig, UnquantizedLinearMethod, weights_mapper
from .linear import SinqLinearMethod
from .model_source import download_dir, hf_token
from .options import check_environment
from .lm_head import SinqLMHeadMethod
from .online import OnlineOptions, SinqOnlineLinearMethod, options_from_config, options_from_env

logger = get_logger(__name__)

QUANT_METHOD = "sinq"
_TILINGS = ("1D",)
_METHODS = ("sinq", "asinq", "rtn")
#: vLLM's usual merged layers, for models that register them in packed_modules_mapping too late
_USUAL_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class SinqConfig(QuantizationConfig):
    def __init__(
        self,
        nbits: int | None = None,
        group_size: int | None = None,
        method: str | None = None,
        modules_to_not_convert: list[str] | None = None,
    ):
        super().__init__()
        self.nbits = nbits
        self.group_size = group_size
        self.method = method
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.layer_metas: dict[str, LayerMeta] = {}  # filled from the sidecar by maybe_update_config
        self.legacy_model_prefix = False
        self.online: OnlineOptions | None = None  # quantize a dense checkpoint while loading
        self.bias_names: set[str] | None = None  # "<module>.bias" in the checkpoint; None: unknown

    def __repr__(self) -> str:
        return (
            f"SinqConfig(nbits={self.nbits}, group_size={self.group_size}, method={self.method!r}, "
            f"quantized_layers={len(self.layer_metas)})"
        )

    # ---- vLLM interface ------------------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The sidecar is read by maybe_update_config from the model folder, which also
        # lets us say clearly when `--quantization sinq` is pointed at a non-SINQ folder.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SinqConfig":
        where = "config.json quantization_config"
        qm = config.get("quant_method", QUANT_METHOD)
        if qm != QUANT_METHOD:
            raise SinqConfigError(f"{where}: quant_method={qm!r}, expected 'sinq'")
        nbits = config.get("nbits")
        if nbits is not None and nbits not in SUPPORTED_BITS:
            raise SinqConfigError(f"{where}: nbits={nbits!r} is not supported; valid values: {list(SUPPORTED_BITS)}")
        group_size = config.get("group_size")
        if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or group_size % 8):
            raise SinqConfigError(f"{where}: group_size={group_size!r} must be a positive multiple of 8")
        tiling = config.get("tiling_mode", "1D")
        if tiling not in _TILINGS:
            raise SinqCheckpointError(
                f"{where}: tiling_mode={tiling!r} is not supported by sinq-vllm (supported: {list(_TILINGS)}); "
                "2D tiles make the column scale depend on the row block"
            )
        method = config.get("method", "sinq")
        if not isinstance(method, str) or not any(method.startswith(m) for m in _METHODS):
            raise SinqConfigError(f"{where}: method={method!r}; valid values: {list(_METHODS)}")
        cfg = cls(nbits, group_size, method, config.get("modules_to_not_convert"))
        cfg.online = options_from_config(config)
        return cfg

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # options first: the workers inherit them, so a typo fails `vllm serve` at once with the valid values
        check_environment()
        # a Hub id: its config, index and sidecar are fetched into --download-dir's cache at
        # `revision` (format/hub.py); the worker downloads the weights later
        located = locate_checkpoint(model_name, revision, download_dir(), hf_token())
        local = located.folder
        if located.sidecar != "present":
            self.online = self.online or options_from_env()
            if self.online is not None:
                logger.info("%s has no SINQ sidecar: quantizing its weights with SINQ (%s) while loading",
                            located.where, self.online.describe())
                return
            problem = located.sidecar_problem()
            if problem:
                raise SinqCheckpointError(problem)
        if local is None:
            raise SinqCheckpointError(f"cannot find the SINQ checkpoint folder of '{model_name}'")
        self.online = None
        located.check_hub_shards()
        self.legacy_model_prefix = json_keys_have_legacy_prefix(local)
        self.layer_metas = read_layer_metas(local)
        check_sidecar_matches_tensors(local, self.layer_metas)
        _untie_quantized_head(hf_config, self.layer_metas, local)
        names = tensor_names(local)
        if self.legacy_model_prefix:
            names = {strip_legacy_prefix(n) for n in names}
        self.bias_names = {n for n in names if n.endswith(".bias")}
        self._check_supported()
        # a Hub snapshot holds the weights only once the worker has downloaded them
        validate_checkpoint(local, self.layer_metas, hf_config, self.legacy_model_prefix, located.hub is None)
        self._check_declared(local)
        logger.info(
            "SINQ checkpoint %s: %d quantized linear modules (%s)", located.where, len(self.layer_metas),
            _summary(self.layer_metas)
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if self.online is not None:
            return self._online_quant_method(layer, prefix)
        if isinstance(layer, LinearBase):
            names = self._checkpoint_names(prefix)
            metas = [self.layer_metas.get(n) for n in names]
            if all(m is None for m in metas):
                return UnquantizedLinearMethod()
            if any(m is None for m in metas):
                quantized = [n for n, m in zip(names, metas) if m is not None]
                plain = [n for n, m in zip(names, metas) if m is None]
                raise SinqCheckpointError(
                    f"vLLM merges {names} into '{prefix}', but only {quantized} are SINQ-quantized "
                    f"({plain} are not); quantize all of them or none"
                )
            has_bias = [f"{n}.bias" in self.bias_names for n in names] if self.bias_names is not None else None
            return SinqLinearMethod(prefix, metas, has_bias)
        if isinstance(layer, ParallelLMHead) and prefix in self.layer_metas:
            return SinqLMHeadMethod(prefix, self.layer_metas[prefix])
        from .moe import sinq_moe_quant_method  # lazy: vLLM's fused-MoE package is heavy

        return sinq_moe_quant_method(layer, prefix, self.layer_metas, self.bias_names)  # None unless RoutedExperts

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        renamer = hf_to_vllm_mapper.get_rename_mapper()
        self.layer_metas = {(renamer.map_name(n) or n): m for n, m in self.layer_metas.items()}
        if self.bias_names is not None:
            self.bias_names = {(renamer.map_name(n) or n) for n in self.bias_names}

    def get_checkpoint_weight_mapper(self):
        # The reference writer also saves the rotary buffer `original_inv_freq`, which
        # vLLM's own mapper (it drops `inv_freq` only) would try to load.
        mapper = super().get_checkpoint_weight_mapper() | weights_mapper(
            orig_to_new_substr={suffix: None for suffix in DROPPED_BUFFER_SUFFIXES}
        )
        if self.legacy_model_prefix:
            mapper = mapper | weights_mapper(orig_to_new_prefix=LEGACY_RENAMES)
        return mapper

    # ---- helpers -----------------------------------------------------------------------
    def _online_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self._checkpoint_names(prefix)
        if any(self.online.keeps(n) for n in names):
            return UnquantizedLinearMethod()
        return SinqOnlineLinearMethod(prefix, self.online, names)

    def _checkpoint_names(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            # vLLM copies the model's packed_modules_mapping before the model's __init__ adds
            # to it (Qwen3-MoE adds gate_up_proj only when mlp_only_layers is set)
            guess = [f"{parent}.{p}" if parent else p for p in _USUAL_PACKED.get(leaf, ())]
            if guess and prefix not in self.layer_metas and all(g in self.layer_metas for g in guess):
                return guess
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def _check_supported(self) -> None:
        bad = [(n, m.unsupported_reason()) for n, m in self.layer_metas.items() if m.unsupported_reason()]
        if bad:
            listing = "; ".join(f"'{n}': {why}" for n, why in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise SinqCheckpointError(f"this SINQ checkpoint uses options sinq-vllm cannot serve faithfully: {listing}{more}")

    def _check_declared(self, local: str) -> None:
        declared = {m.nbits for m in self.layer_metas.values()}
        if self.nbits is not None and declared != {self.nbits}:
            logger.warning(
                "%s: config.json says nbits=%s but the sidecar meta has %s; the sidecar is used",
                local, self.nbits, sorted(declared),
            )


def _untie_quantized_head(hf_config, metas: dict[str, LayerMeta], local: str) -> None:
    """A quantized lm_head is its own matrix: with tied embeddings in the config, vLLM would
    skip the checkpoint's ``lm_head.*`` tensors and compute logits with the embedding."""
    if hf_config is None or not any(n.rpartition(".")[2] == "lm_head" for n in metas):
        return
    configs = {id(c): c for c in (hf_config, hf_config.get_text_config())}.values()
    if any(getattr(c, "tie_word_embeddings", False) for c in configs):
        for c in configs:
            c.tie_word_embeddings = False
        logger.info("%s: lm_head is SINQ-quantized, so the model is served with untied embeddings "
                    "(embeddings stay as stored, the head is the checkpoint's quantized matrix)", local)


def _summary(metas: dict[str, LayerMeta]) -> str:
    kinds: dict[tuple, int] = {}
    for m in metas.values():
        key = (m.nbits, m.group_size, "aux" if m.aux else "no-aux")
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{c}x {b}-bit g{g} {a}" for (b, g, a), c in sorted(kinds.items()))
