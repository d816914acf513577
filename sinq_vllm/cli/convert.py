"""Convert a reference ``qmodel.pt`` checkpoint into the sharded safetensors SINQ format.

The reference code's ``AutoSINQHFModel.save_quantized`` writes one ``qmodel.pt``: a
``torch.save`` of ``{module name: state dict}`` (docs/format.md §2.8), next to
``config.json`` and the tokenizer. vLLM loads safetensors only, so ``sinq-vllm convert``
rewrites it in the layout ``save_quantized_safetensors`` writes (§2.1-§2.4): the same
tensor names (``<module>.W_q``, ``<module>.meta.scale.x`` ...), shards, the index and the
sidecar with every non-tensor meta field.

Security: the file is read with ``torch.load(weights_only=True)`` and nothing else.
That unpickler only rebuilds tensors, containers, numbers, strings and torch dtypes;
any other object in the pickle (the way a malicious ``.pt`` runs code) is refused with
an error naming the file. The result is then checked structurally before anything is
written.

Differences from ``save_quantized_safetensors`` (documented, deliberate):

* rotary ``inv_freq``/``original_inv_freq`` buffers are left out (recomputed by every
  loader, and not model weights), as our quantizer does;
* plain fp16 (non-quantAux) scales and zeros get ``scale.shape``/``zero.shape`` in the
  sidecar, which the reference's writer only records for quantAux triplets; readers then
  need not re-derive the group size;
* shards carry the ``{"format": "pt"}`` safetensors metadata.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SinqCheckpointError, SinqConfigError
from ..format.checkpoint import check_sidecar_matches_tensors, read_layer_metas
from ..format.decode import check_tensors
from ..format.layer_meta import LayerMeta
from ..format.names import DROPPED_BUFFER_SUFFIXES, INDEX_NAME, SIDECAR_NAME
from ..format.safetensors_io import PlannedTensor, ShardWriter
from ..log import get_logger
from ..quantizer.writer import parse_size, plan_shards, write_index, write_sidecar

logger = get_logger(__name__)

PT_NAME = "qmodel.pt"  # the reference's get_weight_file
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_OUTPUT_FILES = (INDEX_NAME, SIDECAR_NAME)


@dataclass
class ConvertSummary:
    source: str
    out_dir: str
    quantized: list[str] = field(default_factory=list)  # modules with W_q
    plain: list[str] = field(default_factory=list)  # other modules with tensors
    dropped: list[str] = field(default_factory=list)  # tensor names left out
    tensors: int = 0
    shards: list[str] = field(default_factory=list)
    total_size: int = 0
    copied_files: list[str] = field(default_factory=list)


def _resolve_source(src: str | os.PathLike) -> Path:
    p = Path(src)
    if p.is_dir():
        candidates = [p / PT_NAME] if (p / PT_NAME).is_file() else sorted(p.glob("*.pt"))
        if len(candidates) != 1:
            found = ", ".join(c.name for c in candidates) or "none"
            raise SinqConfigError(
                f"{p}: expected one reference checkpoint file {PT_NAME} (written by AutoSINQHFModel.save_quantized); "
                f"found {found}; pass the .pt file itself"
            )
        return candidates[0]
    if p.is_file():
        return p
    raise SinqConfigError(f"{p}: no such file or folder")


def load_pt_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)``, with a clear error for anything else."""
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch's message starts with advice to retry with weights_only=False: keep only the line
        # that names the offending global.
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln]
        what = lines[0] if lines else type(e).__name__
        raise SinqCheckpointError(
            f"{path}: refused: the file holds Python objects other than tensors, containers and dtypes, "
            f"which torch.load(weights_only=True) will not rebuild ({what}). sinq-vllm never unpickles "
            "arbitrary objects (that is how a .pt file can run code); a checkpoint written by the reference "
            "AutoSINQHFModel.save_quantized loads this way, so this file was written by something else"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise SinqCheckpointError(f"{path}: cannot read it as a torch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise SinqCheckpointError(
            f"{path}: expected a non-empty dict {{module name: state dict}} as AutoSINQHFModel.save_quantized "
            f"writes, got {type(obj).__name__}"
        )
    return obj


def _jsonable(x, where: str):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, (list, tuple)):  # torch.Size included
        return [_jsonable(v, where) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v, where) for k, v in x.items()}
    raise SinqCheckpointError(f"{where}: value of type {type(x).__name__} cannot be stored in the sidecar")


def flatten_module(name: str, state: dict, source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One module's state dict -> (``{tensor name: tensor}``, sidecar entry or ``{}``).

    The same flattening as the reference's ``save_weights_safetensors``: tensors of the
    ``meta`` dict become ``<module>.meta.<dotted path>``, its other values go to the
    sidecar under ``meta`` with the same dotted keys (``scale.shape`` ...).
    """
    where = f"{source}: module '{name}'"
    if not isinstance(state, dict):
        raise SinqCheckpointError(f"{where}: expected a state dict, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    side: dict = {}

    def meta_walk(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[f"{name}.meta.{path}"] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                meta_walk(v, f"{path}.{k}" if path else str(k))
        else:
            side.setdefault("meta", {})[path] = _jsonable(obj, f"{where}: meta field '{path}'")

    for key, value in state.items():
        if key == "meta" and isinstance(value, dict):
            meta_walk(value, "")
        elif isinstance(value, torch.Tensor):
            tensors[f"{name}.{key}" if key else name] = value
        else:
            side[str(key)] = _jsonable(value, f"{where}: field '{key}'")
    if "W_q" in state:
        meta = side.setdefault("meta", {})
        for what in ("scale", "zero"):
            t = tensors.get(f"{name}.meta.{what}")
            if t is not None and f"{what}.shape" not in meta:
                meta[f"{what}.shape"] = list(t.shape)  # plain fp16 scales/zeros: record their shape too
    return tensors, side


def _check_quantized(name: str, tensors: dict[str, torch.Tensor], side: dict, source: str) -> None:
    """The layer must parse like any sidecar entry and carry well-formed tensors."""
    meta = LayerMeta.from_sidecar(name, side, source)
    local = {k[len(name) + 1:]: v for k, v in tensors.items()}
    try:
        check_tensors(meta, local)
    except SinqCheckpointError as e:
        raise SinqCheckpointError(f"{source}: {e}") from None


def _prepare_out_dir(src_dir: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src_dir.resolve():
        raise SinqConfigError(f"output folder {out} is the source folder; choose another one")
    if out.exists() and not out.is_dir():
        raise SinqConfigError(f"{out} exists and is not a folder")
    existing = [f.name for f in out.glob("*") if f.name in _OUTPUT_FILES or f.name.endswith(".safetensors")] \
        if out.is_dir() else []
    if existing and not overwrite:
        raise SinqConfigError(f"{out} already holds a checkpoint ({', '.join(sorted(existing)[:3])}); pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for f in existing:
        (out / f).unlink()


def convert_pt(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "4GB",
    overwrite: bool = False,
) -> ConvertSummary:
    """Convert ``src`` (a folder with ``qmodel.pt``, or the ``.pt`` file) into ``out_dir``."""
    pt = _resolve_source(src)
    src_dir = pt.parent
    out = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    if not (src_dir / "config.json").is_file():
        raise SinqConfigError(f"{src_dir}: config.json is missing next to {pt.name} (vLLM needs the model config)")
    if out.resolve() == src_dir.resolve():
        raise SinqConfigError(f"output folder {out} is the source folder; choose another one")

    source = str(pt)
    weights = load_pt_checkpoint(pt)
    summary = ConvertSummary(source=source, out_dir=str(out))
    flat: dict[str, torch.Tensor] = {}
    sidecar: dict = {}
    for name, state in weights.items():
        if not isinstance(name, str):
            raise SinqCheckpointError(f"{source}: top-level key {name!r} is not a module name")
        tensors, side = flatten_module(name, state, source)
        if isinstance(state, dict) and "W_q" in state:
            _check_quantized(name, tensors, side, source)
            summary.quantized.append(name)
        elif tensors:
            summary.plain.append(name)
        for key, t in tensors.items():
            if key.endswith(DROPPED_BUFFER_SUFFIXES):
                summary.dropped.append(key)
                continue
            if key in flat:
                raise SinqCheckpointError(f"{source}: tensor name '{key}' occurs twice")
            flat[key] = t.detach().to("cpu").contiguous()
        if side:
            sidecar[name] = side
    if not summary.quantized:
        raise SinqCheckpointError(f"{source}: no module has a W_q tensor; this is not a SINQ-quantized checkpoint")

    _prepare_out_dir(src_dir, out, overwrite)  # only once the source is known to be good
    shards = plan_shards(list(flat), lambda key: [PlannedTensor.of(key, flat[key])], max_bytes)
    for shard in shards:
        with ShardWriter(out / shard.filename, shard.specs, metadata={"format": "pt"}) as writer:
            for key in shard.items:
                writer.write(key, flat[key])
        summary.shards.append(shard.filename)
    summary.total_size = sum(shard.nbytes for shard in shards)
    summary.tensors = len(flat)
    write_index(out, shards)
    write_sidecar(out, sidecar)

    for f in sorted(src_dir.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _OUTPUT_FILES:
            shutil.copyfile(f, out / f.name)
            summary.copied_files.append(f.name)

    check_sidecar_matches_tensors(str(out), read_layer_metas(str(out)))
    logger.info("converted %s: %d SINQ modules, %d tensors, %d shard(s), %.1f MB",
                source, len(summary.quantized), summary.tensors, len(shards), summary.total_size / 1e6)
    return summary
