"""Find a SINQ checkpoint (a local folder or a Hub id) and read its per-layer truth: the
sidecar meta and the index.

Works for our quantizer's output, the reference code's ``save_quantized_safetensors``
and Transformers' ``SinqConfig`` + ``save_pretrained`` (they write the same sidecar,
docs/format.md §2.1-§2.4). Reads JSON only; tensor headers are checked by
``format.validation``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import SinqCheckpointError
from .hub import HubFiles, fetch_metadata, is_hub_id, repo_files
from .layer_meta import LayerMeta
from .names import INDEX_NAME, SIDECAR_NAME, is_legacy_prefixed, module_of, strip_legacy_prefix
from .safetensors_io import read_header, read_json


@dataclass(frozen=True)
class LocatedCheckpoint:
    """Where the JSON files of a checkpoint are: a local folder, or a Hub repository's
    cache snapshot (``hub`` says which files the repository has)."""

    model: str
    folder: str | None
    hub: HubFiles | None = None

    @property
    def sidecar(self) -> str:
        """'present', 'absent' or (a Hub id, offline, not in the cache) 'unknown'."""
        if self.hub is not None:
            return ("present" if SIDECAR_NAME in self.hub.present else
                    "absent" if SIDECAR_NAME in self.hub.absent else "unknown")
        return "present" if self.folder and os.path.isfile(sidecar_path(self.folder)) else "absent"

    @property
    def where(self) -> str:
        return self.hub.where if self.hub is not None else self.model

    def has_sinq_codes(self) -> bool:
        """True when the index (or a local shard header) names ``<module>.W_q`` tensors."""
        if self.folder is None or not os.path.isdir(self.folder):
            return False
        try:
            return any(n.endswith(".W_q") for n in tensor_names(self.folder))
        except SinqCheckpointError:
            return False  # not readable as a SINQ checkpoint: vLLM reports its own problem

    def check_hub_shards(self) -> None:
        """A Hub checkpoint whose index names shards the repository does not have (renamed or not
        uploaded) fails here, naming them, rather than in the worker's download."""
        if self.hub is None or self.folder is None or not os.path.isfile(os.path.join(self.folder, INDEX_NAME)):
            return
        present = repo_files(self.hub)
        if present is None:
            return
        missing = sorted(set(read_index(self.folder).values()) - present)
        if missing:
            raise SinqCheckpointError(
                f"{self.where}: {INDEX_NAME} lists {len(missing)} shard(s) the repository does not have, e.g. "
                f"'{missing[0]}' (renamed or not uploaded?); files there: {', '.join(sorted(present)[:12])}"
            )

    def sidecar_problem(self) -> str | None:
        """Why this cannot be served as a SINQ checkpoint for lack of its sidecar, or None."""
        state = self.sidecar
        if state == "present":
            return None
        if state == "unknown":
            return (f"{self.where}: the SINQ sidecar {SIDECAR_NAME} is not in the local Hugging Face cache and the Hub "
                    "cannot be reached (HF_HUB_OFFLINE=1 or no network): run once with network access, or "
                    f"`hf download {self.hub.repo_id}`" + (f" --revision {self.hub.revision}" if self.hub.revision
                                                             else ""))
        if self.hub is not None:
            return (f"{self.where} is not a SINQ checkpoint: the repository has no {SIDECAR_NAME} (the per-layer meta "
                    "that the reference SINQ code, Transformers' SinqConfig and `sinq-vllm quantize` write next to "
                    f"{INDEX_NAME}); to quantize a bf16/fp16 model while loading use SINQ_VLLM_ONLINE=1")
        return None  # a local folder: read_layer_metas says it, with the path


def locate_checkpoint(model: str, revision: str | None = None, cache_dir: str | None = None,
                      token: bool | str | None = None) -> LocatedCheckpoint:
    """A local folder as is; a Hub id: its config, index and sidecar fetched into the cache
    (``cache_dir``, default the Hugging Face cache) at ``revision`` (format/hub.py)."""
    if os.path.isdir(model) or not is_hub_id(model):
        return LocatedCheckpoint(model, model if os.path.isdir(model) else None)
    files = fetch_metadata(model, revision, cache_dir, token=token)
    return LocatedCheckpoint(model, files.folder, files)


def has_sinq_sidecar(model: str, revision: str | None = None, cache_dir: str | None = None,
                     token: bool | str | None = None) -> bool:
    """Whether ``model`` (a folder or Hub id) is a SINQ checkpoint by its sidecar.

    A checkpoint whose tensors are SINQ codes but whose sidecar is missing (renamed, not
    uploaded, or offline and not cached) is an error, never a silent "no"."""
    located = locate_checkpoint(model, revision, cache_dir, token)
    if located.sidecar == "present":
        return True
    if located.has_sinq_codes():
        raise SinqCheckpointError(
            located.sidecar_problem() if located.sidecar == "unknown" else
            f"{located.where}: its {INDEX_NAME} names SINQ codes ('<module>.W_q' tensors) but the SINQ sidecar "
            f"{SIDECAR_NAME} is missing (renamed or not uploaded?); it holds the per-layer meta needed to serve them"
        )
    return False


def sidecar_path(model_dir: str) -> str:
    return os.path.join(model_dir, SIDECAR_NAME)


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
