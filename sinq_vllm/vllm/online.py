"""Online quantization: serve a plain bf16/fp16 checkpoint, quantizing it with SINQ while
vLLM loads it (no offline step).

Opt in with ``SINQ_VLLM_ONLINE`` (``1`` for the defaults, or ``nbits=4,group_size=64,
method=sinq,aux=0,skip=PATTERN,routers=0``) or with ``--hf-overrides '{"quantization_config":
{"quant_method": "sinq", "online": true, "nbits": 4, "group_size": 64}}'``. Each rank
quantizes the weight slice it holds, shard by shard for merged layers: row-parallel slices
give the same groups as offline quantization; column-parallel slices run Sinkhorn over their
own rows, a valid SINQ quantization of that slice.

Defaults match ``sinq-vllm quantize``: the output head and the embeddings stay as loaded,
MoE router gates (``gate``, ``*_gate``) stay in full precision unless ``routers=1``, and
``skip`` / ``modules_to_not_convert`` patterns keep modules in full precision with the
quantizer's ``--skip`` semantics (fnmatch pattern or substring). One difference: MoE experts
stay as loaded online (the offline quantizer quantizes them). quantAux is off by default
here: it exists to shrink files, and in memory our kernels keep fp16 scales and zeros
either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from ..errors import SinqConfigError
from ..format.decode import decode_module
from ..format.packing import SUPPORTED_BITS
from ..log import get_logger
from .assembly import merge_shards
from .compat import UnquantizedLinearMethod
from .linear import SinqLinearMethod

logger = get_logger(__name__)

ENV_VAR = "SINQ_VLLM_ONLINE"
_METHODS = ("sinq", "rtn")
_KEYS = ("nbits", "group_size", "method", "aux", "skip", "routers")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class OnlineOptions:
    nbits: int = 4
    group_size: int = 64
    method: str = "sinq"
    aux: bool = False
    skip: tuple[str, ...] = ()  # modules kept in full precision (the quantizer's --skip semantics)
    routers: bool = False  # quantize MoE router gates too (like `sinq-vllm quantize --quantize-routers`)

    def __post_init__(self):
        if self.nbits not in SUPPORTED_BITS:
            raise SinqConfigError(f"online SINQ: nbits={self.nbits} is not supported; valid values: {list(SUPPORTED_BITS)}")
        if self.group_size <= 0 or self.group_size % 8:
            raise SinqConfigError(f"online SINQ: group_size={self.group_size} must be a positive multiple of 8")
        if self.method not in _METHODS:
            raise SinqConfigError(f"online SINQ: method={self.method!r}; valid values: {list(_METHODS)}")

    def describe(self) -> str:
        extra = (" quantAux" if self.aux else "") + (" + router gates" if self.routers else "")
        skip = f", keeping {list(self.skip)}" if self.skip else ""
        return f"{self.method} {self.nbits}-bit g{self.group_size}{extra}{skip}"

    def keeps(self, module: str) -> bool:
        """True for a checkpoint module that stays in full precision (the offline defaults)."""
        from ..quantizer.model import matches_skip  # lazy: registering the plugin stays light

        leaf = module.rpartition(".")[2]
        if (leaf == "gate" or leaf.endswith("_gate")) and not self.routers:
            return True  # MoE router and shared-expert gates, as `sinq-vllm quantize` keeps them
        return matches_skip(module, self.skip) or leaf in self.skip


def options_from_env() -> OnlineOptions | None:
    """Parse ``SINQ_VLLM_ONLINE``; None when unset or off."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw.lower() in ("", *_FALSE):
        return None
    if raw.lower() in _TRUE:
        return OnlineOptions()
    fields: dict = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise SinqConfigError(
                f"{ENV_VAR}={raw!r}: expected '1' or comma-separated key=value with keys {', '.join(_KEYS)} "
                "(e.g. nbits=4,group_size=64,method=sinq,aux=0,skip=lm_head,routers=0; repeat skip= for more patterns)"
            )
        if key == "skip":
            fields.setdefault("skip", []).append(value.strip())
        else:
            fields[key] = value.strip()
    return _coerce(fields, ENV_VAR)


def options_from_config(config: dict) -> OnlineOptions | None:
    """Online options from a ``quantization_config`` that asks for them (``"online": true``)."""
    if not config.get("online"):
        return None
    fields = {k: config[k] for k in _KEYS if k in config}
    skip = list(config.get("modules_to_not_convert") or []) + list(config.get("skip") or [])
    if skip:
        fields["skip"] = skip
    return _coerce(fields, "quantization_config")


def _coerce(fields: dict, where: str) -> OnlineOptions:
    kwargs: dict = {}
    for key, value in fields.items():
        if key in ("nbits", "group_size"):
            try:
                kwargs[key] = int(value)
            except (TypeError, ValueError):
                raise SinqConfigError(f"{where}: online SINQ {key}={value!r} is not an integer") from None
        elif key in ("aux", "routers"):
            text = str(value).strip().lower()
            if text not in (*_TRUE, *_FALSE):
                raise SinqConfigError(f"{where}: online SINQ {key}={value!r}; valid values: {', '.join(_TRUE + _FALSE)}")
            kwargs[key] = text in _TRUE
        elif key == "skip":
            kwargs[key] = tuple(str(p) for p in ([value] if isinstance(value, str) else value) if str(p))
        else:
            kwargs[key] = str(value)
    return OnlineOptions(**kwargs)


class SinqOnlineLinearMethod(SinqLinearMethod):
    """Loads the dense weight with vLLM's own loaders, then quantizes it once."""

    def __init__(self, prefix: str, options: OnlineOptions, shard_names: list[str]):
        super().__init__(prefix, metas=[])
        self.options = options
        self.shard_names = shard_names

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        UnquantizedLinearMethod.create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                                               input_size, output_size, params_dtype, **extra_weight_attrs)
        layer.sinq_partition = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "sinq_partition"):
            return
        from ..quantizer import quantize_weight

        dense = layer.weight.data
        device = dense.device
        decoded, offsets = [], [0]
        for name, rows in zip(self.shard_names, layer.sinq_partition):
            part = dense[offsets[-1] : offsets[-1] + rows]
            o = self.options
            tensors, meta = quantize_weight(part, o.nbits, o.group_size, method=o.method, aux=o.aux, name=name)
            decoded.append(decode_module(meta, tensors))
            offsets.append(offsets[-1] + rows)
        del layer.weight, layer.sinq_partition
        self.install(layer, merge_shards(decoded, self.options.nbits, meta.group_size, device))
