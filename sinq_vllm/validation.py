"""Front-end validation of a SINQ checkpoint, before any engine starts and before any
weight reaches a kernel.

``SinqConfig.maybe_update_config`` runs :func:`validate_before_engine` in vLLM's front-end
process: the sinq-vllm environment options (:func:`check_options`), then
:func:`validate_checkpoint`, which reads only JSON and safetensors *headers* (8-byte
length + JSON, a bounded read per shard; never tensor data), so it costs milliseconds
even for large models (SmolLM2-135M, 210 SINQ layers, 1742 tensors: about 16 ms):

* the index (``model.safetensors.index.json``): valid JSON, a ``weight_map`` of tensor
  name -> shard file inside the model folder; every listed shard exists (for a local
  folder) and holds the tensors the index says it holds;
* every shard is complete: a well-formed header (known dtypes, offsets that tile the
  data buffer, byte sizes that match dtype x shape) and a file size of exactly
  ``8 + header length + end of the last tensor``: truncated or padded files are refused;
* every tensor of every SINQ module is present with the dtype and shape its sidecar meta
  implies (:func:`sinq_vllm.assembly.expected_tensor_specs`, the same expectations the
  worker checks at load time), and no unexpected tensor hides under a SINQ module;
* the sidecar shapes agree with the model config where that is unambiguous (the
  hidden size at the input of q/k/v/gate/up and the output of o/down); the full
  per-layer shape check against vLLM's layers stays in ``SinqLinearMethod.create_weights``.

Checks that need tensor values (codes in range, finite non-zero scales, finite positive
column scales) run at load time in ``assembly.decode_shard``, before the kernel backend
sees the weights. Every failure is one :class:`SinqCheckpointError` naming the file, the
tensor and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field

import torch

from .assembly import expected_tensor_specs
from .checkpoint import MAX_JSON_BYTES, check_sidecar_matches_tensors, json_keys_have_legacy_prefix, read_layer_metas
from .errors import SinqCheckpointError
from .format.layer_meta import INDEX_NAME, SIDECAR_NAME, LayerMeta

#: safetensors' own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype -> (bits per element, torch dtype or None when torch has none)
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "I16": (16, torch.int16),
    "U16": (16, getattr(torch, "uint16", None)),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32),
    "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)),
    "F64": (64, torch.float64),
    "C64": (64, getattr(torch, "complex64", None)),
    "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype string, shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES[self.dtype][1]


@dataclass
class ValidationReport:
    shards: int = 0
    tensors: int = 0
    sinq_layers: int = 0
    header_bytes: int = 0  # bytes read from shard files (length prefixes + headers)
    seconds: float = 0.0
    skipped_shards: list[str] = field(default_factory=list)  # listed, not downloaded yet (hub cache)


# ---- safetensors headers ------------------------------------------------------------------
def read_safetensors_header(path: str) -> dict[str, HeaderEntry]:
    """Parse and check the header of one safetensors file, reading only the header bytes.

    Checks that the file is complete: the tensors' byte ranges tile the data buffer and
    the file is exactly ``8 + header length + data length`` bytes long.
    """
    return _read_header(path)[1]


def _read_header(path: str) -> tuple[int, dict[str, HeaderEntry]]:
    try:
        if not os.path.isfile(path):
            raise SinqCheckpointError(f"{path}: not a regular file")
        size = os.path.getsize(path)
        if size < 8:
            raise SinqCheckpointError(
                f"{path}: {size} bytes, truncated or empty (a safetensors file starts with an 8-byte header length)"
            )
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise SinqCheckpointError(
                    f"{path}: header length {length} does not fit the file ({size} bytes) or the safetensors limit "
                    f"of {MAX_HEADER_BYTES} bytes: the file is truncated or not a safetensors file"
                )
            raw = f.read(length)
    except OSError as e:
        raise SinqCheckpointError(f"{path}: cannot read the safetensors header: {e}") from None
    if len(raw) != length:
        raise SinqCheckpointError(f"{path}: truncated inside its {length}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SinqCheckpointError(
            f"{path}: the safetensors header is not valid UTF-8 JSON ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(header, dict):
        raise SinqCheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object"
        )
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise SinqCheckpointError(f"{path}: '__metadata__' is not a JSON object")
            continue
        entries[name] = _header_entry(path, name, info)
    data_end = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != data_end:
            what = "overlaps the previous tensor" if e.begin < data_end else f"leaves a gap after byte {data_end}"
            raise SinqCheckpointError(
                f"{path}: tensor '{name}' data_offsets [{e.begin}, {e.end}] {what} (tensors must tile the data buffer)"
            )
        data_end = e.end
    expected = 8 + length + data_end
    if size != expected:
        state = "truncated" if size < expected else f"has {size - expected} trailing bytes"
        raise SinqCheckpointError(
            f"{path}: {state}: {size} bytes, expected {expected} (8 + {length}-byte header + {data_end} bytes of "
            "tensor data)"
        )
    return length, entries


def _header_entry(path: str, name: str, info) -> HeaderEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
        raise SinqCheckpointError(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise SinqCheckpointError(
            f"{where}: unknown dtype {dtype!r} (safetensors dtypes: {sorted(SAFETENSORS_DTYPES)})"
        )
    if not (isinstance(shape, list) and all(_is_int(v) and v >= 0 for v in shape)):
        raise SinqCheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) and v >= 0 for v in offsets)):
        raise SinqCheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    bits = SAFETENSORS_DTYPES[dtype][0]
    nbytes = (math.prod(shape) * bits + 7) // 8
    if end - begin != nbytes:
        raise SinqCheckpointError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} {shape} needs {nbytes}"
        )
    return HeaderEntry(dtype, tuple(shape), begin, end)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- index --------------------------------------------------------------------------------
def read_index(model_dir: str) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json``, checked: tensor name -> shard file."""
    path = os.path.join(model_dir, INDEX_NAME)
    index = _read_json(path, "not a valid safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SinqCheckpointError(f"{path}: not a valid safetensors index (expected a non-empty 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise SinqCheckpointError(
                f"{path}: tensor '{name}' maps to {shard!r}, expected a '*.safetensors' file name"
            )
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts or "" in parts:
            raise SinqCheckpointError(
                f"{path}: tensor '{name}' maps to {shard!r}, which is not a file inside the model folder"
            )
    return weight_map


def _read_json(path: str, what: str):
    """Parse a JSON file: a regular file (never a FIFO or device), bounded in size."""
    try:
        if not os.path.isfile(path):
            raise SinqCheckpointError(f"{path}: {what} (not a regular file)")
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise SinqCheckpointError(f"{path}: {what} ({size} bytes; the limit is {MAX_JSON_BYTES})")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except SinqCheckpointError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 errors
        raise SinqCheckpointError(f"{path}: {what} ({type(e).__name__}: {e})") from None


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
    if weight_map is not None:
        shard_files = sorted(set(weight_map.values()))
        source = index_path
    else:
        try:
            shard_files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        except OSError as e:
            raise SinqCheckpointError(f"{model_dir}: cannot list the model folder: {e}") from None
        if not shard_files:
            raise SinqCheckpointError(f"{model_dir}: no {INDEX_NAME} and no *.safetensors weights")
        source = model_dir

    where_is: dict[str, tuple[str, HeaderEntry]] = {}  # tensor name -> (shard path, entry)
    absent: set[str] = set()
    for shard in shard_files:
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
        length, entries = _read_header(path)
        report.shards += 1
        report.header_bytes += 8 + length
        for name, entry in entries.items():
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
    prefix = "model." if legacy_prefix else ""
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
            cfg = _read_json(os.path.join(model_dir, "config.json"), "not a valid config.json")
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
    return hidden if _is_int(hidden) and hidden > 0 else None


def check_options() -> None:
    """sinq-vllm environment options, checked in the front end (the workers inherit them), so a
    typo fails ``vllm serve`` at once with the valid values instead of after the weights load."""
    from .kernels.selection import requested_backend

    requested_backend()


def validate_before_engine(
    model_dir: str, metas: dict[str, LayerMeta], hf_config=None, legacy_prefix: bool = False,
    require_shards: bool = True,
) -> ValidationReport:
    """What ``SinqConfig.maybe_update_config`` runs in vLLM's front end: options, then the checkpoint."""
    check_options()
    return validate_checkpoint(model_dir, metas, hf_config, legacy_prefix, require_shards)


def validate_model_dir(model_dir: str) -> ValidationReport:
    """Everything the front end checks, for a local folder (sidecar, index, headers, config)."""
    legacy = json_keys_have_legacy_prefix(model_dir)
    metas = read_layer_metas(model_dir)
    check_sidecar_matches_tensors(model_dir, metas)
    return validate_checkpoint(model_dir, metas, legacy_prefix=legacy)


__all__ = [
    "HeaderEntry",
    "SAFETENSORS_DTYPES",
    "ValidationReport",
    "check_options",
    "read_index",
    "read_safetensors_header",
    "validate_before_engine",
    "validate_checkpoint",
    "validate_model_dir",
]
