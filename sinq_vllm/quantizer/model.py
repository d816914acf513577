"""Quantize a local Hugging Face safetensors folder into a SINQ checkpoint, streaming.

Which tensors are nn.Linear weights is read off the model skeleton built on the meta
device (no weights allocated), not guessed from names. Tensors are then read one at a
time from the source and written straight into pre-planned output shards.

Mixture-of-experts models. Transformers v5 holds the routed experts of a block as fused
3-D parameters (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj
[E, H, I]``), not nn.Linear, but ``save_pretrained`` writes them per expert as 2-D
tensors (``mlp.experts.{e}.gate_proj.weight`` ...). With ``experts=True`` (default) each
of those becomes its own SINQ module ``mlp.experts.{e}.gate_proj`` (same on-disk format
as a Linear: ``W_q``, ``meta.*``, one sidecar entry), which is what vLLM's per-expert
weight mapping expects. Router gates (``mlp.gate``, out_features = number of experts)
stay in full precision unless ``routers=True``, as vLLM keeps them; ``*_gate`` modules
of an MoE block (e.g. ``shared_expert_gate``) always do.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import SinqCheckpointError, SinqConfigError
from ..format.aux8 import SCALE_TILE
from ..format.layer_meta import LayerMeta
from ..format.names import DROPPED_BUFFER_SUFFIXES, INDEX_NAME, SIDECAR_NAME
from ..format.safetensors_io import PlannedTensor, ShardWriter, st_dtype
from ..log import get_logger
from .activations import BlockActivations, decoder_core
from .calibration import calibration_set
from .calibration import check_options as check_calibration_options
from .layer import effective_group_size, quantize_weight_detailed, quantized_layout, stored_method, validate_options
from .methods import calibrated_methods, get_method
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    Shard,
    parse_size,
    plan_shards,
    write_index,
    write_sidecar,
)

logger = get_logger(__name__)

# Non-weight files a served model needs (tokenizer, chat template, generation defaults, licence).
_COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
    "*.tiktoken", "spiece.model", "tokenizer.model", "generation_config.json",
    "chat_template*", "preprocessor_config.json", "LICENSE*", "NOTICE*",
)
# Output files a previous run may have left; only these are removed by overwrite=True.
_OUTPUT_GLOBS = ("model-*-of-*.safetensors", INDEX_NAME, SIDECAR_NAME)
_QUANTIZABLE_ST_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass
class QuantizeSummary:
    out_dir: str
    nbits: int
    group_size: int
    method: str
    aux: bool
    quantized: list[str] = field(default_factory=list)  # module names
    not_converted: list[str] = field(default_factory=list)  # Linear modules kept in full precision
    kurtosis_gated: list[str] = field(default_factory=list)  # layers the reference's gate sent to its RTN branch
    calibration: str = ""  # A-SINQ: the calibration set, e.g. "built-in prompts ...: 13 samples x 128 tokens"
    calibrated_layers: list[str] = field(default_factory=list)  # layers quantized with their calibration inputs
    experts_kept: list[str] = field(default_factory=list)  # MoE expert containers left in full precision
    copied: int = 0  # tensors copied unchanged
    dropped: list[str] = field(default_factory=list)  # tensor keys left out (tied lm_head, buffers)
    shards: list[str] = field(default_factory=list)
    total_size: int = 0
    source_size: int = 0
    quantize_seconds: float = 0.0  # time inside quantize_weight only
    seconds: float = 0.0  # wall time of the whole run


@dataclass(frozen=True)
class _Item:
    """One source tensor and what becomes of it."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    module: str | None = None  # set when the tensor is a Linear weight we quantize
    aux_ok: bool = True  # False: this module is stored without quantAux (tiny router gates)


# ---------------------------------------------------------------------------------------------
# Source discovery


def _check_dirs(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise SinqConfigError(f"source folder {str(src)!r} does not exist")
    if not (src / "config.json").is_file():
        raise SinqConfigError(f"source folder {str(src)!r} has no config.json (expected a Hugging Face model folder)")
    if out.resolve() == src.resolve():
        raise SinqConfigError("OUT_DIR must differ from SRC_DIR: the source would be overwritten")
    if out.exists() and not out.is_dir():
        raise SinqConfigError(f"output path {str(out)!r} exists and is not a folder")


def source_weight_map(src: Path) -> dict[str, str]:
    """``{tensor key: file name}`` of a single-file or sharded safetensors folder."""
    index = src / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise SinqCheckpointError(f"{index}: not a safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing:
            raise SinqCheckpointError(f"{index}: shard(s) {missing[:3]} listed but missing")
        return dict(weight_map)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        other = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f" (found {other[:3]}: convert them to safetensors first)" if other else ""
        raise SinqCheckpointError(f"no *.safetensors weights in {str(src)!r}{hint}")
    weight_map: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                weight_map[key] = path.name
    return weight_map


def _read_config_json(src: Path) -> dict:
    try:
        cfg = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise SinqConfigError(f"{src / 'config.json'}: invalid JSON ({e})") from None
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method", "?")
        raise SinqConfigError(f"{str(src)!r} is already quantized (quant_method={method!r}); start from the full-precision model")
    return cfg


@dataclass(frozen=True)
class _Experts:
    """A Transformers v5 fused-experts module, as its per-expert 2-D tensors appear on disk."""

    num_experts: int
    shapes: dict[str, tuple[int, int]]  # projection ("gate_proj", ...) -> (out_features, in_features)


@dataclass(frozen=True)
class _Skeleton:
    linears: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    output_module: str | None  # lm_head-like module, quantized only on request
    tied_output: bool  # output embeddings share the input embedding weight
    input_module: str | None = None  # the input embedding module
    experts: dict[str, _Experts] = field(default_factory=dict)  # fused experts module name -> layout
    routers: dict[str, tuple[int, int]] = field(default_factory=dict)  # MoE gate -> (num_experts, hidden)
    block_gates: frozenset[str] = frozenset()  # other gates of MoE blocks (shared_expert_gate): never quantized

    def kind_of(self, module: str) -> tuple[str, tuple[int, int]] | None:
        """("linear" | "expert" | "router" | "block_gate", (out, in)) of a module we could quantize."""
        if module in self.routers:
            return "router", self.routers[module]
        if module in self.block_gates:
            return "block_gate", self.linears[module]
        if module in self.linears:
            return ("expert" if _EXPERT_LINEAR.search(module) else "linear"), self.linears[module]
        m = _PER_EXPERT.match(module)
        if m and m.group(1) in self.experts:
            info = self.experts[m.group(1)]
            if int(m.group(2)) < info.num_experts and m.group(3) in info.shapes:
                return "expert", info.shapes[m.group(3)]
        return None


# "<experts module>.<expert index>.<projection>" as save_pretrained writes fused experts
_PER_EXPERT = re.compile(r"^(.*)\.(\d+)\.([A-Za-z0-9_]+)$")
# nn.Linear experts held in a ModuleList ("...experts.3.w1"): quantized like any Linear
_EXPERT_LINEAR = re.compile(r"(^|\.)experts\.\d+\.")
_EXPERTS_CONTAINER = re.compile(r"^(.*?experts)\.\d+\.")


def _experts_container(module: str) -> str:
    """"model.layers.0.mlp.experts" of "model.layers.0.mlp.experts.3.gate_proj"."""
    m = _EXPERTS_CONTAINER.match(module)
    return m.group(1) if m else module.rsplit(".", 2)[0]


def _module_name(model: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def model_skeleton(src: Path) -> _Skeleton:
    """Linear modules of the model, from its architecture built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise SinqConfigError(f"cannot build the model architecture of {str(src)!r} with Transformers: {e}") from None
    out_mod = model.get_output_embeddings()
    in_mod = model.get_input_embeddings()
    tied = bool(
        out_mod is not None and in_mod is not None and getattr(out_mod, "weight", None) is getattr(in_mod, "weight", 0)
    )
    linears = {
        name: (mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    experts, routers, block_gates = _moe_modules(model)
    return _Skeleton(linears, _module_name(model, out_mod), tied, _module_name(model, in_mod), experts, routers,
                     frozenset(block_gates))


def _moe_modules(model: torch.nn.Module):
    """Fused experts modules, router gates and other gates of the MoE blocks of ``model``."""
    experts: dict[str, _Experts] = {}
    blocks: set[str] = set()
    for name, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        gate_up, up, down = params.get("gate_up_proj"), params.get("up_proj"), params.get("down_proj")
        first = gate_up if gate_up is not None else up
        if first is not None and down is not None and first.dim() == 3 and down.dim() == 3:
            e, n1, h = first.shape
            i = n1 // 2 if gate_up is not None else n1
            if tuple(down.shape) != (e, h, i) or (gate_up is not None and n1 % 2):
                # e.g. [E, H, 2I] (transposed) layouts: their on-disk names are not per-expert 2-D
                logger.warning("experts module %s has a layout the quantizer does not know (%s, %s); it stays "
                               "in full precision", name, tuple(first.shape), tuple(down.shape))
            else:
                shapes = {"down_proj": (h, i)}
                shapes.update({"gate_proj": (i, h), "up_proj": (i, h)} if gate_up is not None else {"up_proj": (i, h)})
                experts[name] = _Experts(int(e), shapes)
            blocks.add(name.rpartition(".")[0])
        elif name.rpartition(".")[2] == "experts" and isinstance(mod, torch.nn.ModuleList):
            blocks.add(name.rpartition(".")[0])
    routers: dict[str, tuple[int, int]] = {}
    block_gates: set[str] = set()
    for name, mod in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if parent not in blocks or not (leaf == "gate" or leaf.endswith("_gate")):
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            continue
        if leaf == "gate":
            routers[name] = (int(weight.shape[0]), int(weight.shape[1]))
        elif isinstance(mod, torch.nn.Linear):
            block_gates.add(name)
    return experts, routers, block_gates


# ---------------------------------------------------------------------------------------------
# Planning


def _natural_key(key: str):
    # layers.10 after layers.9, so shards follow the model's order
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def matches_skip(name: str, patterns) -> bool:
    """``--skip`` semantics: an fnmatch pattern on the module name, or a substring of it."""
    return any(fnmatch.fnmatchcase(name, p) or p in name for p in patterns)


def _tensor_meta(handle, key: str) -> tuple[str, tuple[int, ...]]:
    sl = handle.get_slice(key)
    return sl.get_dtype(), tuple(sl.get_shape())


def _classify(key, dtype, shape, skel: _Skeleton, skip, summary: QuantizeSummary,
              experts: bool = True, routers: bool = False, head: bool = False) -> str | None:
    """"drop", "copy" or the module name to quantize."""
    if key.endswith(DROPPED_BUFFER_SUFFIXES):
        return "drop"
    module, _, leaf = key.rpartition(".")
    if skel.output_module is not None and module == skel.output_module:
        if head and leaf == "weight":
            return _check_quantizable(key, dtype, shape, skel.linears[module])
        if skel.tied_output and leaf == "weight":
            return "drop"  # re-tied at load, as in the reference's checkpoints
        return "copy"
    kind = skel.kind_of(module) if leaf == "weight" else None
    if kind is None:
        return "copy"
    kind, (out_f, in_f) = kind
    if (kind == "expert" and not experts) or (kind == "router" and not routers) or kind == "block_gate":
        container = _experts_container(module) if kind == "expert" else module
        summary.not_converted.append(container)
        if kind == "expert":
            summary.experts_kept.append(container)
        return "copy"
    if matches_skip(module, skip):
        summary.not_converted.append(_experts_container(module) if kind == "expert" else module)
        return "copy"
    return _check_quantizable(key, dtype, shape, (out_f, in_f))


def _check_quantizable(key: str, dtype: str, shape, expected: tuple[int, int]) -> str:
    """The module name of a weight tensor we can quantize."""
    if shape != expected:
        raise SinqCheckpointError(f"tensor {key!r} has shape {list(shape)}, the model expects {list(expected)}")
    if dtype not in _QUANTIZABLE_ST_DTYPES:
        raise SinqCheckpointError(f"tensor {key!r} has dtype {dtype}; only float weights can be quantized")
    return key.rpartition(".")[0]


def _plan_items(handles, weight_map, skel, skip, summary, experts=True, routers=False,
                group_size=64, aux=True, head=False) -> list[_Item]:
    items = []
    for key in sorted(weight_map, key=_natural_key):
        if key.endswith(".W_q"):
            raise SinqCheckpointError(f"source already holds SINQ tensors ({key!r}); start from the full-precision model")
        dtype, shape = _tensor_meta(handles[weight_map[key]], key)
        what = _classify(key, dtype, shape, skel, skip, summary, experts, routers, head)
        if what == "drop":
            summary.dropped.append(key)
        elif what == "copy":
            items.append(_Item(key, weight_map[key], dtype, shape))
        else:
            # A router has few rows (out_features = number of experts), a head an arbitrary
            # vocabulary: where quantAux's R % 32 == 0 fails they keep fp16 scales and zeros.
            lenient = what in skel.routers or what == skel.output_module
            aux_ok = not (aux and lenient) or _aux_fits(what, shape, group_size)
            items.append(_Item(key, weight_map[key], dtype, shape, module=what, aux_ok=aux_ok))
    if head and not any(it.module == skel.output_module for it in items):
        items.append(_tied_head_item(weight_map, handles, skel, group_size, aux))
    return items


def _aux_fits(module: str, shape, group_size: int) -> bool:
    g = effective_group_size(shape[1], group_size, module)
    groups = shape[0] * shape[1] // g
    if groups % SCALE_TILE:
        logger.info("'%s': %d groups are not a multiple of %d; stored without quantAux", module, groups, SCALE_TILE)
        return False
    return True


def _tied_head_item(weight_map, handles, skel: _Skeleton, group_size: int, aux: bool) -> _Item:
    """With tied embeddings the checkpoint usually stores only the input embedding: the
    quantized head is made from it (the embedding itself stays as stored)."""
    if skel.output_module is None:
        raise SinqConfigError("--quantize-lm-head: the model has no output embedding module")
    key = f"{skel.input_module}.weight"
    if not skel.tied_output or key not in weight_map:
        raise SinqCheckpointError(f"--quantize-lm-head: {skel.output_module}.weight is missing from the source checkpoint")
    dtype, shape = _tensor_meta(handles[weight_map[key]], key)
    _check_quantizable(key, dtype, shape, skel.linears[skel.output_module])
    aux_ok = not aux or _aux_fits(skel.output_module, shape, group_size)
    return _Item(key, weight_map[key], dtype, shape, module=skel.output_module, aux_ok=aux_ok)


def _check_coverage(items: list[_Item], skel: _Skeleton, skip, summary: QuantizeSummary, experts: bool = True) -> None:
    quantized = {it.module for it in items if it.module}
    for container, info in skel.experts.items():
        done = sum(1 for m in quantized if m.startswith(container + "."))
        if 0 < done < info.num_experts * len(info.shapes):
            # vLLM runs all experts of a layer with one method: all SINQ or all full precision
            raise SinqConfigError(
                f"--skip keeps only some experts of '{container}' in full precision ({done} of "
                f"{info.num_experts * len(info.shapes)} expert projections would be quantized); skip all of them "
                f"(--skip {container}) or none"
            )
    if experts:
        keys = {it.key for it in items}
        fused = [m for m in skel.experts if f"{m}.down_proj" in keys]
        if fused:
            # e.g. checkpoints that store the fused 3-D tensors: copied unchanged, vLLM loads them unquantized
            logger.warning("%d MoE experts module(s) have no per-expert 2-D weights in the checkpoint and stay in "
                           "full precision, e.g. %s", len(fused), fused[:3])
            summary.experts_kept.extend(fused)
    if not quantized and not summary.not_converted:
        raise SinqCheckpointError(
            "no checkpoint tensor matches a Linear weight of the model architecture "
            f"(expected keys like {next(iter(skel.linears), '?')}.weight)"
        )
    present = {it.key for it in items}
    absent = [m for m in skel.linears if m != skel.output_module and f"{m}.weight" not in present]
    if absent:
        # e.g. weights the checkpoint names differently from the Transformers modules
        logger.warning("%d Linear module(s) have no weight in the checkpoint and stay as they are, e.g. %s",
                       len(absent), absent[:3])
    names = [*skel.linears, *skel.routers,
             *(f"{c}.{e}.{p}" for c, info in skel.experts.items() for e in range(info.num_experts) for p in info.shapes)]
    unused = [p for p in skip if not any(matches_skip(m, [p]) for m in names)]
    if unused:
        logger.warning("--skip pattern(s) %s match no Linear module", unused)
    if skel.output_module and not skel.tied_output:
        if not any(it.key == f"{skel.output_module}.weight" for it in items):
            logger.warning("untied %s.weight is missing from the source checkpoint", skel.output_module)


def _specs_for(item: _Item, nbits: int, group_size: int, aux: bool) -> list[PlannedTensor]:
    if item.module is None:
        return [PlannedTensor(item.key, item.dtype, item.shape)]
    out_f, in_f = item.shape
    layout = quantized_layout(out_f, in_f, nbits, group_size, aux and item.aux_ok, item.module)
    return [PlannedTensor(f"{item.module}.{k}", st_dtype(dt), shape) for k, (dt, shape) in layout.items()]


# ---------------------------------------------------------------------------------------------
# Output


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for g in _OUTPUT_GLOBS for p in out.glob(g)]
    if stale and not overwrite:
        raise SinqConfigError(
            f"{str(out)!r} already holds a checkpoint ({stale[0].name}, ...); pass --overwrite or choose an empty folder"
        )
    for p in stale:
        p.unlink()


def _calibration(src: Path, handles, weight_map, items, skel: _Skeleton, options, summary,
                 method: str) -> BlockActivations:
    """Calibrated methods: the calibration samples and the block-by-block activation collector, with the
    first block already run, so that every problem shows before the output is touched."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fused = sorted(c for c in skel.experts if any(it.module and it.module.startswith(c + ".") for it in items))
    if fused:
        # Fused experts are not nn.Linear: no hook sees their inputs (the reference does not
        # quantize them at all, docs/format.md §2.9).
        raise SinqConfigError(
            f"--method {method}: the MoE experts of '{fused[0]}' have no calibration path (fused expert "
            "parameters, not nn.Linear modules); keep them in full precision with --no-experts or --skip, "
            "or use --method sinq"
        )
    config = AutoConfig.from_pretrained(str(src))
    with torch.device("meta"):
        # SDPA as in the reference's from_pretrained: causal without an attention mask
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    decoder_core(model, method)  # the architecture has a calibration path (or the error names where it looked)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, KeyError) as e:
        raise SinqConfigError(f"--method {method} needs the model's tokenizer in {str(src)!r}: {e}") from None
    calib = calibration_set(tokenizer, *options)
    summary.calibration = calib.describe()
    collector = BlockActivations(model, lambda key: handles[weight_map[key]].get_tensor(key), set(weight_map),
                                 calib.samples, method, sequential=get_method(method).sequential)
    logger.info("%s calibration: %s, %d decoder blocks at %s", method, calib.describe(), len(collector.blocks),
                collector.prefix)
    collector.start()
    return collector


def quantization_config(nbits, group_size, method, aux, not_converted) -> dict:
    """``config.json`` entry: Transformers' SinqConfig fields plus ``aux``."""
    return {
        "quant_method": "sinq",
        "nbits": nbits,
        "group_size": group_size,
        "tiling_mode": "1D",
        "method": get_method(method).format_name,  # Transformers' SinqConfig accepts only its own methods
        "modules_to_not_convert": not_converted,
        "aux": aux,
    }


def _untie(config: dict) -> None:
    """``tie_word_embeddings: false`` in the config and in its text sub-config, if any."""
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatchcase(p.name, g) for g in _COPIED_FILES):
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied


def _write_shard(out: Path, shard: Shard, handles, opts, summary, metas, bar, activations=None) -> None:
    nbits, group_size, method, aux = opts
    with ShardWriter(out / shard.filename, shard.specs, metadata={"format": "pt"}) as writer:
        for item in shard.items:
            tensor = handles[item.file].get_tensor(item.key)
            if item.module is None:
                writer.write(item.key, tensor)
                summary.copied += 1
            else:
                t0 = time.perf_counter()
                acts = activations.for_module(item.module) if activations is not None else None
                q = quantize_weight_detailed(tensor, nbits, group_size, method, aux and item.aux_ok, name=item.module,
                                             activations=acts)
                summary.quantize_seconds += time.perf_counter() - t0
                if q.calibrated:
                    summary.calibrated_layers.append(item.module)
                if q.dequantized is not None:
                    activations.quantized(item.module, q.dequantized)
                for k, v in q.tensors.items():
                    writer.write(f"{item.module}.{k}", v)
                metas.append(q.meta)
                summary.quantized.append(item.module)
                if q.kurtosis_gated:
                    summary.kurtosis_gated.append(item.module)
            del tensor
            bar.update(1)


def quantize_model(
    src_dir,
    out_dir,
    nbits: int | None = None,
    group_size: int = 64,
    method: str = "sinq",
    aux: bool = True,
    skip=(),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    experts: bool = True,
    routers: bool = False,
    lm_head: bool = False,
    calib_data: str | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int | None = None,
) -> QuantizeSummary:
    """Quantize every nn.Linear of a local HF safetensors model, the output head only if
    ``lm_head`` (a tied head is then untied in ``config.json``: the embedding stays as
    stored, the head becomes its own quantized matrix).

    MoE models: ``experts=True`` quantizes the routed experts per expert (modules
    ``...mlp.experts.{e}.gate_proj`` ...), ``experts=False`` keeps them in full precision.
    Router gates stay in full precision unless ``routers=True`` (a gate whose group count
    is not a multiple of 32 is then stored without quantAux).

    Writes the reference SINQ layout (shards, index, sidecar) plus a ``config.json``
    carrying ``quantization_config``, and copies tokenizer and generation files.
    Modules whose name matches a ``skip`` pattern (fnmatch or substring) stay in full
    precision. Everything is validated before the first byte is written.

    ``method`` is a row of ``quantizer/methods.py``; ``nbits`` defaults to the method's (4,
    3 for "sinq_nf3"). A-SINQ ("asinq") calibrates on the reference's built-in prompts or
    on ``calib_data`` (a text or jsonl file; ``calib_samples`` x ``calib_seqlen`` tokens),
    running the model's decoder blocks one at a time (``quantizer/activations.py``).
    """
    t_start = time.perf_counter()
    qm = get_method(method)
    nbits = qm.default_bits if nbits is None else nbits
    validate_options(nbits, group_size, method)
    calibration_options = (calib_data, calib_samples, calib_seqlen)
    if not qm.calibrated and any(v is not None for v in calibration_options):
        raise SinqConfigError(f"--calib-data/--calib-samples/--calib-seqlen calibrate the methods "
                              f"{calibrated_methods()}, "
                              f"not method {method!r}")
    if qm.calibrated:
        check_calibration_options(*calibration_options)
        if qm.calib_shape and calib_data is not None:
            # sinq_gptq: longer samples than A-SINQ's 128 tokens (benchmarks/results/quality_ablation.md §4b)
            calibration_options = (calib_data, calib_samples or qm.calib_shape[0], calib_seqlen or qm.calib_shape[1])
    skip = list(skip or ())
    src, out = Path(src_dir), Path(out_dir)
    _check_dirs(src, out)
    config = _read_config_json(src)
    weight_map = source_weight_map(src)
    skel = model_skeleton(src)
    summary = QuantizeSummary(str(out), nbits, group_size, method, aux)

    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(src / f, framework="pt")) for f in sorted(set(weight_map.values()))}
        items = _plan_items(handles, weight_map, skel, skip, summary, experts, routers, group_size, aux, lm_head)
        _check_coverage(items, skel, skip, summary, experts)
        summary.not_converted = list(dict.fromkeys(summary.not_converted))
        summary.experts_kept = list(dict.fromkeys(summary.experts_kept))
        shards = plan_shards(items, lambda it: _specs_for(it, nbits, group_size, aux), parse_size(max_shard_size))
        summary.source_size = sum(PlannedTensor(it.key, it.dtype, it.shape).nbytes for it in items)
        activations = None
        if qm.calibrated:
            activations = _calibration(src, handles, weight_map, items, skel, calibration_options, summary, method)
        _prepare_out_dir(out, overwrite)

        metas: list[LayerMeta] = []
        opts = (nbits, group_size, method, aux)
        desc = f"SINQ {method} {nbits}-bit g{group_size}"
        with tqdm(total=len(items), desc=desc, unit="tensor", disable=not progress) as bar:
            for shard in shards:
                _write_shard(out, shard, handles, opts, summary, metas, bar, activations)

    write_sidecar(out, metas)
    write_index(out, shards)
    head = [skel.output_module] if skel.output_module and not lm_head else []
    if lm_head and skel.tied_output:
        _untie(config)
    config["quantization_config"] = quantization_config(
        nbits, group_size, method, aux, head + sorted(set(summary.not_converted))
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(src, out)

    summary.shards = [s.filename for s in shards]
    summary.total_size = sum(s.nbytes for s in shards)
    summary.seconds = time.perf_counter() - t_start
    logger.info(
        "quantized %d Linear layers (%s, stored method %r) into %d shard(s), %.1f MB -> %.1f MB in %.1fs",
        len(summary.quantized), method, stored_method(method, aux), len(shards),
        summary.source_size / 1e6, summary.total_size / 1e6, summary.seconds,
    )
    return summary
