"""Front-end validation of a SINQ checkpoint, before any engine starts and before any
weight reaches a kernel.

``SinqConfig.maybe_update_config`` runs :func:`validate_checkpoint` in vLLM's front-end
process (after checking the sinq-vllm options), and ``sinq-vllm inspect`` runs
:func:`validate_model_dir`. Both read only JSON and safetensors *headers* (8-byte
length + JSON, a bounded read per shard; never tensor data), so it costs milliseconds
even for large models (SmolLM2-135M, 210 SINQ layers, 1742 tensors: about 16 ms):

* the index (``model.safetensors.index.json``): valid JSON, a ``weight_map`` of tensor
  name -> shard file inside the model folder; every listed shard exists (for a local
  folder) and holds the tensors the index says it holds;
* every shard is complete: a well-formed header (known dtypes, offsets that tile the
  data buffer, byte sizes that match dtype x shape) and a file size of exactly
  ``8 + header length + end of the last tensor``: truncated or padded files are refused;
* every tensor of every SINQ module is present with the dtype and shape its sidecar meta
  implies (:func:`~sinq_vllm.format.tensor_specs.expected_tensor_specs`, the same expectations the
  worker checks at load time), and no unexpected tensor hides under a SINQ module;
* the sidecar shapes agree with the model config where that is unambiguous (the
  hidden size at the input of q/k/v/gate/up and the output of o/down); the full
  per-layer shape check against vLLM's layers stays in ``SinqLinearMethod.create_weights``.

Checks that need tensor values (codes in range, finite non-zero scales, finite positive
column scales) run at load time in ``format.decode.decode_module``, before the kernel backend
sees the weights. Every failure is one :class:`SinqCheckpointError` naming the file, the
tensor and what was expected.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from ..errors import SinqCheckpointError
from .checkpoint import (
    check_sidecar_matches_tensors,
    json_keys_have_legacy_prefix,
    read_index,
    read_layer_metas,
    shard_files,
)
from .layer_meta import LayerMeta
from .names import INDEX_NAME, LEGACY_PREFIX, SIDECAR_NAME
from .safetensors_io import HeaderEntry, is_int, read_header, read_json
from .tensor_specs import expected_tensor_specs

@dataclass
class ValidationReport:
    shards: int = 0
    tensors: int = 0
    sinq_layers: int = 0
    header_bytes: int = 0  # bytes read from shard files (length prefixes + headers)
    seconds: float = 0.0
    skipped_shards: list[str] = field(default_factory=list)  # listed, not downloaded yet (hub cache)


# ---- the checkpoint -----------------------------------------------------------------------
def validate_checkpoint(
    model_dir: str,
    metas: dict[str, LayerMeta],
    hf_config=None,
    legacy_prefix: bool = False,
    require_shards: bool = True,
) -> ValidationReport:
    """Check shards, headers and SINQ tensors of ``model_dir`` against its sidecar ``metas``.

    ``metas`` are keyed by module name without the legacy extra ``model.`` prefix; set
    ``legacy_prefix`` when the checkpoint's tensor names carry it. ``require_shards=False``
    (a Hub cache snapshot whose weights the worker downloads later) skips shards that are
    listed in the index but not present yet.
    """
    start = time.perf_counter()
    report = ValidationReport()
    index_path = os.path.join(model_dir, INDEX_NAME)
    weight_map = read_index(model_dir) if os.path.lexists(index_path) else None
    shards = shard_files(model_dir)
    source = index_path if weight_map is not None else model_dir
    if not shards:
        raise SinqCheckpointError(f"{model_dir}: no {INDEX_NAME} and no *.safetensors weights")

    where_is: dict[str, tuple[str, HeaderEntry]] = {}  # tensor name -> (shard path, entry)
    absent: set[str] = set()
    for shard in shards:
        path = os.path.join(model_dir, shard)
        if not os.path.exists(path):
            if not require_shards:
                absent.add(shard)
                report.skipped_shards.append(shard)
                continue
            listed = sorted(n for n, s in (weight_map or {}).items() if s == shard)
            raise SinqCheckpointError(
                f"{source}: lists shard '{shard}' (holding {len(listed)} tensors, e.g. '{listed[0]}'), "
                f"but {path} does not exist"
            )
        header = read_header(path)
        report.shards += 1
        report.header_bytes += 8 + header.length
        for name, entry in header.entries.items():
            if name in where_is:
                raise SinqCheckpointError(
                    f"tensor '{name}' is stored twice: in {where_is[name][0]} and in {path}"
                )
            where_is[name] = (path, entry)
    report.tensors = len(where_is)

    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard in absent:
                continue
            found = where_is.get(name)
            if found is None or os.path.normpath(found[0]) != os.path.normpath(os.path.join(model_dir, shard)):
                held = f"it is in {found[0]}" if found else "no shard holds it"
                raise SinqCheckpointError(
                    f"{index_path}: says tensor '{name}' is in '{shard}', but {held}"
                )
    pending = {n for n, s in (weight_map or {}).items() if s in absent}

    _check_sinq_tensors(model_dir, metas, where_is, pending, legacy_prefix, source)
    report.sinq_layers = len(metas)
    _check_model_config(model_dir, metas, hf_config)
    report.seconds = time.perf_counter() - start
    return report


def _check_sinq_tensors(model_dir, metas, where_is, pending, legacy_prefix, source) -> None:
    prefix = LEGACY_PREFIX if legacy_prefix else ""
    modules = {prefix + name: meta for name, meta in metas.items()}
    # tensors that sit under a SINQ module: "<module>.<key>"
    under: dict[str, dict[str, str]] = {m: {} for m in modules}
    for name in where_is:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            if module in modules:
                under[module][".".join(parts[i:])] = name
                break
    for module, meta in modules.items():
        specs = expected_tensor_specs(meta)
        # a dense weight or stray SINQ tensors next to the codes; other extras (e.g. a router's
        # buffers) are vLLM's business
        extra = set(under[module]) - set(specs)
        unexpected = sorted(k for k in extra if k == "weight" or k.startswith(("meta.", "W_q")))
        if unexpected:
            full = under[module][unexpected[0]]
            raise SinqCheckpointError(
                f"{where_is[full][0]}: tensor '{full}' does not belong to a SINQ layer; '{module}' may only hold "
                f"{', '.join(specs)}"
            )
        for key, spec in specs.items():
            full = f"{module}.{key}"
            if full not in where_is:
                if spec.required and full not in pending:
                    dtype = str(spec.dtypes[0]).replace("torch.", "")
                    raise SinqCheckpointError(
                        f"{source}: tensor '{full}' is missing (the sidecar {SIDECAR_NAME} says '{module}' is "
                        f"{meta.nbits}-bit {meta.packing}, method {meta.method!r}: expected {dtype} "
                        f"{list(spec.shape)}, {spec.what})"
                    )
                continue
            path, entry = where_is[full]
            problem = spec.problem(entry.torch_dtype, entry.shape)
            if problem:
                raise SinqCheckpointError(
                    f"{path}: tensor '{full}' {problem} (safetensors dtype {entry.dtype}; sidecar meta: "
                    f"{meta.nbits}-bit, shape [{meta.out_features}, {meta.in_features}], group {meta.group_size})"
                )


# The hidden size is at the input of these modules and at the output of those, in every
# decoder-only architecture whose layers use these names; anything else (per-head sizes,
# intermediate sizes, merged layers) is checked against vLLM's layers in create_weights.
_HIDDEN_IN = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)$")
_HIDDEN_OUT = re.compile(r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)$")


def _check_model_config(model_dir: str, metas: dict[str, LayerMeta], hf_config) -> None:
    hidden = _text_hidden_size(model_dir, hf_config)
    if hidden is None:
        return
    sidecar = os.path.join(model_dir, SIDECAR_NAME)
    for name, meta in metas.items():
        if _HIDDEN_IN.match(name) and meta.in_features != hidden:
            side, value = "in_features", meta.in_features
        elif _HIDDEN_OUT.match(name) and meta.out_features != hidden:
            side, value = "out_features", meta.out_features
        else:
            continue
        raise SinqCheckpointError(
            f"{sidecar}: layer '{name}': sidecar shape [{meta.out_features}, {meta.in_features}] does not match the "
            f"model config: its {side} ({value}) must equal hidden_size={hidden} of {model_dir}/config.json"
        )


def _text_hidden_size(model_dir: str, hf_config) -> int | None:
    """hidden_size of a text-only model config (None: unknown or a multimodal config)."""
    if hf_config is None:
        try:
            cfg = read_json(os.path.join(model_dir, "config.json"), "not a valid config.json")
        except SinqCheckpointError:
            return None  # vLLM reports an unreadable config.json itself
        if not isinstance(cfg, dict) or any(k in cfg for k in ("text_config", "vision_config", "audio_config")):
            return None
        hidden = cfg.get("hidden_size")
    else:
        get_text = getattr(hf_config, "get_text_config", None)
        if get_text is not None and get_text() is not hf_config:
            return None
        hidden = getattr(hf_config, "hidden_size", None)
    return hidden if is_int(hidden) and hidden > 0 else None


def validate_model_dir(model_dir: str) -> ValidationReport:
    """Everything the front end checks, for a local folder (sidecar, index, headers, config)."""
    legacy = json_keys_have_legacy_prefix(model_dir)
    metas = read_layer_metas(model_dir)
    check_sidecar_matches_tensors(model_dir, metas)
    return validate_checkpoint(model_dir, metas, legacy_prefix=legacy)
