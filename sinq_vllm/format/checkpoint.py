"""Find a SINQ checkpoint and read its per-layer truth: the sidecar meta and the index.

Works for our quantizer's output, the reference code's ``save_quantized_safetensors``
and Transformers' ``SinqConfig`` + ``save_pretrained`` (they write the same sidecar,
docs/format.md §2.1-§2.4). Reads JSON only; tensor headers are checked by
``format.validation``.
"""

from __future__ import annotations

import os

from ..errors import SinqCheckpointError
from .layer_meta import LayerMeta
from .names import INDEX_NAME, SIDECAR_NAME, is_legacy_prefixed, module_of, strip_legacy_prefix
from .safetensors_io import read_header, read_json


def resolve_local_dir(model: str) -> str | None:
    """A local folder for ``model``: the path itself, or its snapshot in the HF cache."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json"], local_files_only=True)
    except Exception:
        return None


def sidecar_path(model_dir: str) -> str:
    return os.path.join(model_dir, SIDECAR_NAME)


def has_sinq_sidecar(model: str) -> bool:
    local = resolve_local_dir(model)
    return local is not None and os.path.isfile(sidecar_path(local))


def _read_sidecar(model_dir: str) -> dict:
    path = sidecar_path(model_dir)
    if os.path.exists(path) and not os.path.isfile(path):
        raise SinqCheckpointError(f"{path}: the SINQ sidecar meta is not a regular file")
    if not os.path.isfile(path):
        raise SinqCheckpointError(
            f"{model_dir} is not a SINQ checkpoint: {SIDECAR_NAME} is missing "
            f"(expected next to {INDEX_NAME}; write one with `sinq-vllm quantize` or the reference "
            "`save_quantized_safetensors`, or quantize a bf16/fp16 checkpoint while loading with "
            "SINQ_VLLM_ONLINE=1 or --hf-overrides '{\"quantization_config\": {\"quant_method\": \"sinq\", "
            "\"online\": true}}')"
        )
    raw = read_json(path, "cannot read the SINQ sidecar meta")
    if not isinstance(raw, dict) or not raw:
        raise SinqCheckpointError(f"{path}: expected a non-empty JSON object of per-layer meta entries")
    return raw


def read_layer_metas(model_dir: str) -> dict[str, LayerMeta]:
    """Parse the sidecar of ``model_dir`` into ``{hf_module_name: LayerMeta}`` (legacy prefix removed)."""
    raw = _read_sidecar(model_dir)
    path = sidecar_path(model_dir)
    metas = {name: LayerMeta.from_sidecar(name, entry, path) for name, entry in raw.items()}
    if is_legacy_prefixed(metas):
        metas = {strip_legacy_prefix(n): m for n, m in metas.items()}
    return metas


def json_keys_have_legacy_prefix(model_dir: str) -> bool:
    """True for reference commit 9a9812f checkpoints, whose names carry one extra ``model.``."""
    try:
        raw = _read_sidecar(model_dir)
    except SinqCheckpointError:
        return False  # read_layer_metas reports the unreadable sidecar
    return is_legacy_prefixed(raw)


def read_index(model_dir: str) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json``, checked: tensor name -> shard file."""
    path = os.path.join(model_dir, INDEX_NAME)
    index = read_json(path, "not a valid safetensors index")
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


def shard_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: those its index lists, else every ``*.safetensors``."""
    if os.path.lexists(os.path.join(model_dir, INDEX_NAME)):
        return sorted(set(read_index(model_dir).values()))
    try:
        return sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    except OSError as e:
        raise SinqCheckpointError(f"{model_dir}: cannot list the model folder: {e}") from None


def tensor_names(model_dir: str) -> set[str]:
    """Names of all tensors of a checkpoint, from its index (or the shard headers)."""
    if os.path.isfile(os.path.join(model_dir, INDEX_NAME)):
        return set(read_index(model_dir))
    names: set[str] = set()
    for fname in shard_files(model_dir):
        names.update(read_header(os.path.join(model_dir, fname)).entries)
    return names


def check_sidecar_matches_tensors(model_dir: str, metas: dict[str, LayerMeta]) -> None:
    """Every module with codes has meta and every meta entry has codes."""
    coded = {m for m in (module_of(n, ".W_q") for n in tensor_names(model_dir)) if m is not None}
    if is_legacy_prefixed(coded):
        coded = {strip_legacy_prefix(n) for n in coded}
    missing_meta = sorted(coded - set(metas))
    missing_codes = sorted(set(metas) - coded)
    where = sidecar_path(model_dir)
    if missing_meta:
        raise SinqCheckpointError(
            f"{where}: inconsistent with the checkpoint: {len(missing_meta)} module(s) have W_q tensors but no "
            f"meta entry, e.g. '{missing_meta[0]}'"
        )
    if missing_codes:
        raise SinqCheckpointError(
            f"{where}: inconsistent with the checkpoint: {len(missing_codes)} meta entr(y/ies) have no "
            f"'<module>.W_q' tensor in the checkpoint, e.g. '{missing_codes[0]}.W_q'"
        )
