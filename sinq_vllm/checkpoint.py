"""Find and read the per-layer truth of a SINQ checkpoint: its sidecar meta file.

Works for our quantizer's output, the reference code's ``save_quantized_safetensors``
and Transformers' ``SinqConfig`` + ``save_pretrained`` (they write the same sidecar).
"""

from __future__ import annotations

import json
import os

from .errors import SinqCheckpointError
from .format.layer_meta import INDEX_NAME, SIDECAR_NAME, LayerMeta


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
    if not os.path.isfile(path):
        raise SinqCheckpointError(
            f"{model_dir} is not a SINQ checkpoint: {SIDECAR_NAME} is missing "
            f"(expected next to {INDEX_NAME}; write one with `sinq-vllm quantize` or the reference "
            "`save_quantized_safetensors`)"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SinqCheckpointError(f"{path}: cannot read the SINQ sidecar meta: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise SinqCheckpointError(f"{path}: expected a non-empty JSON object of per-layer meta entries")
    metas = {name: LayerMeta.from_sidecar(name, entry, path) for name, entry in raw.items()}
    return _strip_legacy_model_prefix(metas)


def _strip_legacy_model_prefix(metas: dict[str, LayerMeta]) -> dict[str, LayerMeta]:
    """Checkpoints of reference commit 9a9812f prefixed every name with one extra ``model.``."""
    if metas and all(n.startswith("model.model.") or n.startswith("model.lm_head") for n in metas):
        return {n[len("model."):]: m for n, m in metas.items()}
    return metas
