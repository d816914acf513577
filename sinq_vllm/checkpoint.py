"""Find and read the per-layer truth of a SINQ checkpoint: its sidecar meta file.

Works for our quantizer's output, the reference code's ``save_quantized_safetensors``
and Transformers' ``SinqConfig`` + ``save_pretrained`` (they write the same sidecar).
"""

from __future__ import annotations

import json
import os

from .errors import SinqCheckpointError
from .format.layer_meta import INDEX_NAME, SIDECAR_NAME, LayerMeta

#: larger sidecar or index files are refused unread (real ones are well under 10 MB)
MAX_JSON_BYTES = 256 * 1024 * 1024


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


def read_layer_metas(model_dir: str) -> dict[str, LayerMeta]:
    """Parse the sidecar of ``model_dir`` into ``{hf_module_name: LayerMeta}``."""
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
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise SinqCheckpointError(f"{path}: {size} bytes is too large for a SINQ sidecar (limit {MAX_JSON_BYTES})")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 errors
        if isinstance(e, SinqCheckpointError):
            raise
        raise SinqCheckpointError(f"{path}: cannot read the SINQ sidecar meta: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise SinqCheckpointError(f"{path}: expected a non-empty JSON object of per-layer meta entries")
    metas = {name: LayerMeta.from_sidecar(name, entry, path) for name, entry in raw.items()}
    return _strip_legacy_model_prefix(metas)


def tensor_names(model_dir: str) -> set[str]:
    """Names of all tensors of a checkpoint, from its index (or the shard headers)."""
    from .validation import read_index, read_safetensors_header  # validation imports this module

    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
        return set(read_index(model_dir))
    names: set[str] = set()
    for fname in sorted(os.listdir(model_dir)):
        if fname.endswith(".safetensors"):
            names.update(read_safetensors_header(os.path.join(model_dir, fname)))
    return names


def check_sidecar_matches_tensors(model_dir: str, metas: dict[str, LayerMeta]) -> None:
    """Every module with codes has meta and every meta entry has codes."""
    names = tensor_names(model_dir)
    coded = {n[: -len(".W_q")] for n in names if n.endswith(".W_q")}
    if any(n.startswith("model.model.") for n in coded):
        coded = {n[len("model."):] for n in coded}
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


def json_keys_have_legacy_prefix(model_dir: str) -> bool:
    """True for reference commit 9a9812f checkpoints, whose names carry one extra ``model.``."""
    try:
        path = sidecar_path(model_dir)
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_JSON_BYTES:  # never open a FIFO or device
            return False
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False  # read_layer_metas reports the unreadable sidecar
    return isinstance(raw, dict) and _is_legacy_prefixed(list(raw))


def _is_legacy_prefixed(names) -> bool:
    return bool(names) and all(n.startswith("model.model.") or n.startswith("model.lm_head") for n in names)


def _strip_legacy_model_prefix(metas: dict[str, LayerMeta]) -> dict[str, LayerMeta]:
    """Checkpoints of reference commit 9a9812f prefixed every name with one extra ``model.``."""
    if _is_legacy_prefixed(list(metas)):
        return {n[len("model."):]: m for n, m in metas.items()}
    return metas
