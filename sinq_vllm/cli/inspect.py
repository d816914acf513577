"""``sinq-vllm inspect DIR|ORG/NAME``: what a SINQ checkpoint holds and whether sinq-vllm can serve it.

Reads only JSON files and safetensors headers (never tensor data, never a pickle), so it
is instant on any model size. A Hub id is read from the Hub (or the local cache) at the
given revision: its JSON files are fetched like vLLM's front end fetches them
(format/hub.py), the shard headers with HTTP range requests unless the shards are cached.
Reported:

* the format (sharded safetensors + sidecar; a reference ``qmodel.pt`` that needs
  ``sinq-vllm convert`` first), who wrote it (``quantization_config`` present or not)
  and legacy traits (extra ``model.`` name prefix, unpacked ``W_q``);
* per quantized module: bits, effective and declared group size, method, quantAux,
  tiling, packing, shape, and why sinq-vllm cannot serve it if it cannot
  (:meth:`LayerMeta.unsupported_reason`: 2D tiling, symmetric ``noz``, bits);
* modules kept in full precision (2-D ``.weight`` tensors without SINQ codes);
* bytes of codes, of scales/zeros/column scales and of everything else, the total, and
  the model's estimated size in bf16 (every quantized weight at 2 bytes, every other
  floating tensor at 2 bytes);
* the kernel backend each kind of layer would use on this machine (cli/doctor.py);
* the verdict: servable, or the reasons why not (the unsupported layers, tensors whose
  dtype or shape does not match the sidecar, and the first error of the same front-end
  validation vLLM runs before loading).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..errors import SinqCheckpointError, SinqError
from ..format.checkpoint import (
    check_sidecar_matches_tensors,
    json_keys_have_legacy_prefix,
    locate_checkpoint,
    read_layer_metas,
    shard_files,
)
from ..format.hub import shard_headers
from ..format.layer_meta import LayerMeta
from ..format.names import LEGACY_PREFIX, SIDECAR_NAME, is_legacy_prefixed, strip_legacy_prefix
from ..format.packing import planar_rows
from ..format.safetensors_io import FLOAT_ST_DTYPES, HeaderEntry, read_header, read_json
from ..format.tensor_specs import expected_tensor_specs
from ..format.validation import validate_checkpoint, validate_model_dir
from .doctor import LayerKind, backends_for, devices


@dataclass
class LayerInfo:
    name: str
    shape: list[int]  # [out_features, in_features]
    nbits: int | None = None
    group_size: int | None = None  # effective (W_q.shape[1])
    declared_group_size: int | None = None  # meta["group_size"]
    method: str | None = None
    aux: bool | None = None
    tiling: str | None = None
    packing: str | None = None
    unpacked_codes: bool = False  # legacy: W_q stored unpacked although meta.packing says packed
    code_bytes: int = 0
    scale_bytes: int = 0
    problem: str | None = None  # why sinq-vllm cannot serve this layer


@dataclass
class InspectReport:
    path: str
    format: str  # "sinq-safetensors" | "reference-pt" | "not-sinq"
    architectures: list[str] = field(default_factory=list)
    model_type: str | None = None
    quantization_config: dict | None = None
    written_by: str | None = None
    legacy_model_prefix: bool = False
    layers: list[LayerInfo] = field(default_factory=list)
    unquantized_modules: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # "4-bit g64 sinq_quantAux 1D" -> count
    tensors: int = 0
    code_bytes: int = 0
    scale_bytes: int = 0
    other_bytes: int = 0
    total_bytes: int = 0
    bf16_bytes: int = 0
    bits_per_weight: float | None = None  # (codes + scales) per quantized weight
    backends: dict[str, dict[str, str]] = field(default_factory=dict)  # "cpu 4-bit g64" -> {dtype: backend}
    servable: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _headers(model_dir: str, hub=None) -> dict[str, HeaderEntry]:
    entries: dict[str, HeaderEntry] = {}
    for fname in shard_files(model_dir):
        entries.update(shard_headers(hub, fname) if hub is not None else
                       read_header(os.path.join(model_dir, fname)).entries)
    return entries


def _parse_metas(model_dir: str, raw: dict, report: InspectReport) -> dict[str, LayerMeta]:
    path = os.path.join(model_dir, SIDECAR_NAME)
    report.legacy_model_prefix = is_legacy_prefixed(raw)
    metas: dict[str, LayerMeta] = {}
    for name, entry in raw.items():
        try:
            metas[name] = LayerMeta.from_sidecar(name, entry, path)
        except SinqCheckpointError as e:
            meta = entry.get("meta", {}) if isinstance(entry, dict) else {}
            shape = meta.get("shape") if isinstance(meta, dict) else None
            report.layers.append(LayerInfo(
                name=name, shape=list(shape) if isinstance(shape, list) else [],
                nbits=meta.get("nbits") if isinstance(meta, dict) else None,
                method=meta.get("method") if isinstance(meta, dict) else None, problem=str(e)))
    return metas


def inspect_checkpoint(model: str, revision: str | None = None, cache_dir: str | None = None) -> InspectReport:
    """Everything ``sinq-vllm inspect`` reports, as a dataclass (``to_json()`` for a dict).

    ``model``: a checkpoint folder, or a Hub id (``revision``, ``cache_dir`` as for vLLM)."""
    model = str(model)
    located = locate_checkpoint(model, revision, cache_dir)
    if located.hub is None and not os.path.isdir(model):
        raise SinqCheckpointError(f"{model}: not a folder (nor a Hugging Face Hub model id)")
    if located.hub is not None and located.folder is None:
        raise SinqCheckpointError(f"{located.where}: no config.json, index or SINQ sidecar in the repository")
    model_dir = located.folder
    report = InspectReport(path=located.where if located.hub else model_dir, format="not-sinq")
    cfg_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(cfg_path):
        try:
            cfg = read_json(cfg_path, "not a valid config.json")
            report.architectures = list(cfg.get("architectures") or [])
            report.model_type = cfg.get("model_type")
            report.quantization_config = cfg.get("quantization_config")
        except (SinqCheckpointError, AttributeError) as e:
            report.reasons.append(f"{cfg_path}: unreadable ({e})")
    else:
        report.reasons.append(f"{cfg_path} is missing (vLLM needs the model config)")

    if located.hub is not None and located.sidecar != "present":
        report.reasons.append(located.sidecar_problem())
        return report
    sidecar = os.path.join(model_dir, SIDECAR_NAME)
    if not os.path.isfile(sidecar):
        pts = sorted(f for f in os.listdir(model_dir) if f.endswith(".pt"))
        if pts:
            report.format = "reference-pt"
            report.written_by = "reference SINQ AutoSINQHFModel.save_quantized (torch.save pickle)"
            report.total_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in pts)
            report.reasons.append(
                f"{', '.join(pts)}: vLLM reads safetensors only; convert with `sinq-vllm convert {model_dir} OUT_DIR`"
            )
        else:
            report.reasons.append(f"no {SIDECAR_NAME}: not a SINQ checkpoint")
        return report

    report.format = "sinq-safetensors"
    qc = report.quantization_config
    if isinstance(qc, dict) and qc.get("quant_method") == "sinq":
        if "aux" in qc:
            report.written_by = "sinq-vllm quantize"
        elif "_extra_kwargs" in qc or "sinq_version" in qc:
            report.written_by = "Transformers SinqConfig + save_pretrained"
        else:
            report.written_by = "a writer that sets quantization_config (quant_method 'sinq')"
    else:
        report.written_by = "reference SINQ save_quantized_safetensors (no quantization_config; detected by the sidecar)"
    try:
        raw = read_json(sidecar, "not a valid SINQ sidecar")
        if not isinstance(raw, dict) or not raw:
            raise ValueError("expected a non-empty JSON object")
    except (SinqCheckpointError, ValueError) as e:
        report.reasons.append(f"{sidecar}: unreadable ({e})")
        return report
    metas = _parse_metas(model_dir, raw, report)
    try:
        entries = _headers(model_dir, located.hub)
    except SinqCheckpointError as e:
        report.reasons.append(f"cannot read the safetensors headers: {e}")
        entries = {}
    _account(report, metas, entries)
    _kernels_here(report, metas)
    _verdict(report, model_dir, located.hub is not None)
    return report


def _account(report: InspectReport, metas: dict[str, LayerMeta], entries: dict[str, HeaderEntry]) -> None:
    quantized_names = set(metas)
    counted: set[str] = set()
    for name, meta in metas.items():
        info = LayerInfo(name=name, shape=[meta.out_features, meta.in_features], nbits=meta.nbits,
                         group_size=meta.group_size, declared_group_size=meta.declared_group_size,
                         method=meta.method, aux=meta.aux, tiling=meta.tiling, packing=meta.packing,
                         problem=meta.unsupported_reason())
        if entries and info.problem is None:  # names as stored (legacy prefix included)
            info.problem = _tensor_problem(name, meta, entries)
        for key, entry in entries.items():
            if not key.startswith(name + "."):
                continue
            rest = key[len(name) + 1:]
            if rest == "W_q":
                info.code_bytes += entry.nbytes
                packed_rows = planar_rows(meta.grouped_rows, meta.packing)
                if math.prod(entry.shape) == meta.out_features * meta.in_features and entry.shape[0] != packed_rows:
                    info.unpacked_codes = True
                counted.add(key)
            elif rest.startswith("meta."):
                info.scale_bytes += entry.nbytes
                counted.add(key)
        report.layers.append(info)
        report.bf16_bytes += 2 * meta.out_features * meta.in_features
        kind = f"{meta.nbits}-bit g{meta.group_size} {meta.method} {meta.tiling}"
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
    report.layers.sort(key=lambda i: i.name)
    report.code_bytes = sum(i.code_bytes for i in report.layers)
    report.scale_bytes = sum(i.scale_bytes for i in report.layers)
    for key, entry in entries.items():
        if key in counted:
            continue
        report.other_bytes += entry.nbytes
        report.bf16_bytes += entry.nbytes if entry.dtype not in FLOAT_ST_DTYPES else math.prod(entry.shape) * 2
        if key.endswith(".weight") and len(entry.shape) == 2:
            module = key[: -len(".weight")]
            if module not in quantized_names:
                report.unquantized_modules.append(strip_legacy_prefix(module) if report.legacy_model_prefix else module)
    report.unquantized_modules.sort()
    report.tensors = len(entries)
    report.total_bytes = report.code_bytes + report.scale_bytes + report.other_bytes
    weights = sum(m.out_features * m.in_features for m in metas.values())
    if weights:
        report.bits_per_weight = 8 * (report.code_bytes + report.scale_bytes) / weights


def _merged_groups(names) -> list[list[str]]:
    """Sibling modules vLLM merges into one layer (q/k/v, gate/up) that are all present."""
    groups = []
    for parts in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        parents = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] == parts[0]}
        for parent in sorted(parents):
            members = [f"{parent}.{p}" for p in parts]
            if all(m in names for m in members):
                groups.append(members)
    return groups


def _tensor_problem(module: str, meta: LayerMeta, entries: dict[str, HeaderEntry]) -> str | None:
    """What is wrong with the stored tensors of one SINQ module (format/tensor_specs.py), or None."""
    for key, spec in expected_tensor_specs(meta).items():
        entry = entries.get(f"{module}.{key}")
        if entry is None:
            if spec.required:
                return f"tensor '{module}.{key}' is missing ({spec.what})"
            continue
        problem = spec.problem(entry.torch_dtype, entry.shape)
        if problem:
            return f"tensor '{module}.{key}' {problem}"
    return None


def _kernels_here(report: InspectReport, metas: dict[str, LayerMeta]) -> None:
    """The kernel backend of each kind of layer of this checkpoint on this machine."""
    first: dict[tuple, LayerMeta] = {}
    for meta in metas.values():
        if meta.unsupported_reason() is None:
            first.setdefault((meta.nbits, meta.group_size), meta)
    for (nbits, group), meta in sorted(first.items()):
        kind = LayerKind(f"{nbits}-bit g{group}", nbits, group, (meta.out_features,), meta.in_features)
        for device in devices():
            report.backends[f"{device.type} {kind.label}"] = backends_for(kind, device).dtypes


def _verdict(report: InspectReport, model_dir: str, hub: bool = False) -> None:
    bad = [layer for layer in report.layers if layer.problem]
    for layer in bad[:5]:
        report.reasons.append(f"'{layer.name}': {layer.problem}")
    if len(bad) > 5:
        report.reasons.append(f"... and {len(bad) - 5} more layer(s) that cannot be served")
    by_name = {layer.name: layer for layer in report.layers}
    for members in _merged_groups(set(by_name)):
        kinds = {(by_name[m].nbits, by_name[m].group_size, by_name[m].aux) for m in members}
        if len(kinds) > 1:
            report.reasons.append(
                f"{', '.join(members)} are merged into one vLLM layer but were quantized differently {sorted(kinds)}")
    if not report.reasons:
        try:  # the front-end checks vLLM runs before loading
            if hub:  # the JSON files are here, the shards on the Hub (their headers were checked above)
                metas = read_layer_metas(model_dir)
                check_sidecar_matches_tensors(model_dir, metas)
                validate_checkpoint(model_dir, metas, legacy_prefix=json_keys_have_legacy_prefix(model_dir),
                                    require_shards=False)
            else:
                validate_model_dir(model_dir)
        except SinqError as e:
            report.reasons.append(str(e))
    report.servable = not report.reasons


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_report(r: InspectReport, show_layers: bool = False) -> str:
    lines = [f"{r.path}"]
    lines.append(f"  format:        {r.format}" + (f" (written by {r.written_by})" if r.written_by else ""))
    if r.architectures or r.model_type:
        lines.append(f"  model:         {', '.join(r.architectures) or '?'} ({r.model_type or '?'})")
    if r.legacy_model_prefix:
        lines.append(f"  legacy:        tensor names carry an extra '{LEGACY_PREFIX}' prefix (reference commit 9a9812f)")
    if r.format == "sinq-safetensors":
        quantized = [layer for layer in r.layers if layer.nbits is not None]
        lines.append(f"  quantized:     {len(quantized)} modules")
        for kind, count in sorted(r.kinds.items()):
            lines.append(f"                 {count:4d} x {kind}")
        aux = Counter(layer.aux for layer in quantized if layer.aux is not None)
        lines.append(f"  quantAux:      {aux.get(True, 0)} with 8-bit scales/zeros, {aux.get(False, 0)} with fp16")
        fallback = [layer.name for layer in quantized
                    if layer.declared_group_size and layer.group_size != layer.declared_group_size]
        if fallback:
            lines.append(f"  group fallback: {len(fallback)} module(s) use a smaller group than declared "
                         f"(K not divisible), e.g. {fallback[0]}")
        unpacked = [layer.name for layer in quantized if layer.unpacked_codes]
        if unpacked:
            lines.append(f"  legacy:        {len(unpacked)} module(s) store W_q unpacked, e.g. {unpacked[0]}")
        shown = ", ".join(r.unquantized_modules[:6]) + (" ..." if len(r.unquantized_modules) > 6 else "")
        lines.append(f"  full precision: {len(r.unquantized_modules)} 2-D weights" + (f" ({shown})" if shown else ""))
        lines.append(f"  tensors:       {r.tensors}: codes {_mb(r.code_bytes)}, scales/zeros/column scales "
                     f"{_mb(r.scale_bytes)}, other {_mb(r.other_bytes)}; total {_mb(r.total_bytes)}")
        if r.bf16_bytes:
            lines.append(f"  vs bf16:       {_mb(r.bf16_bytes)} estimated, {r.total_bytes / r.bf16_bytes:.2f}x"
                         + (f"; {r.bits_per_weight:.2f} bits per quantized weight" if r.bits_per_weight else ""))
        if show_layers:
            lines.append("  layers:")
            for layer in r.layers:
                desc = (f"{layer.nbits}-bit g{layer.group_size}"
                        + (f" (declared {layer.declared_group_size})"
                           if layer.declared_group_size not in (None, layer.group_size) else "")
                        + f" {layer.method} {layer.tiling} {layer.shape}") if layer.nbits is not None and \
                    layer.group_size else f"{layer.method} {layer.shape}"
                lines.append(f"    {layer.name}: {desc}" + (f"  <- {layer.problem}" if layer.problem else ""))
    elif r.total_bytes:
        lines.append(f"  size:          {_mb(r.total_bytes)}")
    for kind, dtypes in r.backends.items():
        lines.append(f"  kernels here:  {kind}: " + ", ".join(f"{d} {b}" for d, b in dtypes.items()))
    if r.servable:
        lines.append(f"  sinq-vllm:     can serve it (vllm serve {r.path.split(' ')[0]}; detected automatically)")
    else:
        lines.append("  sinq-vllm:     cannot serve it:")
        lines.extend(f"    - {why}" for why in r.reasons)
    return "\n".join(lines)
