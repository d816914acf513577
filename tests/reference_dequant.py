"""Independent float32 oracle for SINQ checkpoints (docs/format.md §1.7, §2.3-2.7, §2.10).

Written from the specification only: it must NOT import ``sinq_vllm`` (the code under
test). Everything here is plain torch + safetensors and favours clarity over speed.

Math of a uniform 1D layer, ``W[N, K]``, effective group size ``g = W_q.shape[1]``::

    W[n, k] = (Q[n, k] - z[n*G + k//g]) * s[n*G + k//g] * t[k],   G = K // g
    y       = x @ W.T + bias

2D tiling (``meta.scale2.ndim == 3``, tile b = g)::

    W[n, k] = (Q[n, k] - z[tile, n%b]) * s[tile, n%b] * t[tile, k%b],  tile = (n//b)*(K//b) + k//b

Codes ``Q`` are packed planar along dim 0 of the grouped view ``[R, g]`` (R = N*K/g):
``packed[r] = sum_i Qpad[i*S + r] << (bits*(p-1-i))``, S = ceil(R/p).
quantAux (8-bit) scales/zeros are dequantized with the reference's own fp16 expression
``x * s + m`` so that they match it bit for bit; everything after that is float32.

NF4/NF3 (sidecar method containing ``nf4``/``nf3``, docs/format.md §1.4, §1.7): ``Q`` is
replaced by ``CB[Q]``, the table of docs/format.md §1.4 (copied below, not imported) rounded
to fp16 as the reference casts it; the arithmetic stays float32 (the reference's own
dequantization runs in fp16, so it differs from this by fp16 rounding, ~1e-3 relative).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = [
    "PACKINGS",
    "unpack_reference",
    "aux_dequant",
    "dequant_layer",
    "reference_linear",
    "load_checkpoint_layer",
    "quantized_modules",
    "dequantized_state_dict",
    "dequantized_model",
]

#: packing name -> (values per storage word, bits per value, storage dtype)
PACKINGS = {
    "8bit_u8": (1, 8, torch.uint8),
    "4bit_u8": (2, 4, torch.uint8),
    "2bit_u8": (4, 2, torch.uint8),
    "1bit_u8": (8, 1, torch.uint8),
    "3bit_32": (10, 3, torch.int32),
    "5bit_32": (6, 5, torch.int32),
    "6bit_32": (5, 6, torch.int32),
}

#: docs/format.md §1.4 (the reference's NF4_CODEBOOK / NF3_CODEBOOK, fp32 literals)
NF_CODEBOOKS = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "nf3": (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
            0.6229856610298157, 1.0),
}

INDEX_NAME = "model.safetensors.index.json"
SIDECAR_NAME = "model.safetensors.index.json.meta.json"
SINGLE_NAME = "model.safetensors"


# --------------------------------------------------------------------------------------
# layer level
# --------------------------------------------------------------------------------------

def unpack_reference(W_q: torch.Tensor, packing: str) -> torch.Tensor:
    """Unpack planar-packed codes: ``[S, g]`` words -> ``[p*S, g]`` int64 codes (slab i of
    the output comes from the i-th most significant field). Padding rows are kept; the
    caller keeps the first R rows."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {sorted(PACKINGS)}")
    p, bits, _ = PACKINGS[packing]
    if W_q.dtype == torch.int32:
        w = W_q.to(torch.int64) & 0xFFFFFFFF  # two's complement -> unsigned 32-bit word
    else:
        w = W_q.to(torch.uint8)  # byte words: logical shifts in uint8 are exact
    mask = (1 << bits) - 1
    return torch.cat([(w >> (bits * (p - 1 - i))) & mask for i in range(p)], dim=0).to(torch.int64)


def aux_dequant(tensors: dict, prefix: str, shape) -> torch.Tensor:
    """``prefix`` = "meta.scale" or "meta.zero": quantAux ``(x * s + m).view(shape)`` computed
    in the stored dtype (fp16, like the reference), or the plain stored tensor."""
    if prefix + ".x" in tensors:
        x, s, m = tensors[prefix + ".x"], tensors[prefix + ".s"], tensors[prefix + ".m"]
        v = x * s + m  # uint8 * fp16 -> fp16, exactly the reference expression
        return v.view(list(shape)) if shape is not None else v
    if prefix not in tensors:
        raise KeyError(f"layer has neither {prefix}.x/.s/.m nor {prefix}")
    v = tensors[prefix]
    return v.view(list(shape)) if shape is not None else v


def _as_words(W_q: torch.Tensor, meta: dict) -> torch.Tensor:
    if meta.get("view_as_float", False):
        packing = meta.get("packing", "8bit_u8")
        return W_q.view(PACKINGS[packing][2])
    return W_q


def dequant_layer(tensors: dict, meta: dict) -> torch.Tensor:
    """Float32 ``W [N, K]`` of one SINQ Linear.

    ``tensors``: this layer's tensors with the module prefix stripped (``"W_q"``,
    ``"meta.scale2"``, ``"meta.scale.x"`` ... or ``"meta.scale"``/``"meta.zero"``).
    ``meta``: the layer's sidecar entry (the inner ``"meta"`` dict; the outer
    ``{"meta": {...}}`` wrapper is accepted too).
    """
    if "meta" in meta and isinstance(meta["meta"], dict):
        meta = meta["meta"]
    method = str(meta.get("method", "")).lower()
    codebook = next((cb for cb in NF_CODEBOOKS if cb in method), None)
    N, K = (int(v) for v in meta["shape"])
    Wq = _as_words(tensors["W_q"], meta)
    s2 = tensors["meta.scale2"].float()
    two_d = s2.dim() == 3
    packing = meta.get("packing")

    # Effective group size (the tile may have been halved for odd K; meta.group_size lies).
    if Wq.numel() == N * K and packing not in (None, "8bit_u8"):
        # legacy (gemlite-era) checkpoint: codes stored unpacked despite meta.packing
        packing = "8bit_u8"
    g = int(Wq.shape[1]) if Wq.dim() == 2 else int(meta.get("group_size") or K)
    if packing is None:
        packing = "8bit_u8"
    if (N * K) % g:
        raise ValueError(f"N*K={N * K} is not a multiple of the group size {g}")
    R = N * K // g

    if packing == "8bit_u8" and Wq.numel() == N * K:
        q = Wq.reshape(R, g).to(torch.int64)
    else:
        q = unpack_reference(Wq, packing)
        if q.shape[0] < R or q.shape[1] != g:
            raise ValueError(f"unpacked codes {tuple(q.shape)} cannot hold R={R} rows of g={g}")
        q = q[:R]
    if codebook is not None:
        table = torch.tensor(NF_CODEBOOKS[codebook], dtype=torch.float32).half().float()
        if int(q.max()) >= table.numel():
            raise ValueError(f"code {int(q.max())} outside the {codebook.upper()} codebook")
        q = table[q]
    else:
        q = q.float()

    if two_d:
        default_shape = [s2.shape[0], g, 1]
    else:
        default_shape = [R, 1]
    s = aux_dequant(tensors, "meta.scale", meta.get("scale.shape", default_shape)).float()
    zshape = meta.get("zero.shape", default_shape)
    z = aux_dequant(tensors, "meta.zero", zshape).float()

    if not two_d:
        if s.numel() != R:
            raise ValueError(f"scale has {s.numel()} values, expected R={R}")
        zz = z.reshape(-1, 1) if z.numel() > 1 else z.reshape(1, 1)
        return ((q - zz) * s.reshape(R, 1)).reshape(N, K) * s2.reshape(1, K)

    b = g
    if N % b or K % b:
        raise ValueError(f"2D tiling needs N, K multiples of b={b}; got {N}x{K}")
    nh, nw = N // b, K // b
    q4 = q.reshape(nh, b, nw, b)                                   # codes row-major
    s4 = s.reshape(nh, nw, b, 1).permute(0, 2, 1, 3)               # per (tile, row of tile)
    z4 = (z.reshape(nh, nw, b, 1).permute(0, 2, 1, 3) if z.numel() > 1
          else z.reshape(1, 1, 1, 1))
    t4 = s2.reshape(nh, nw, 1, b).permute(0, 2, 1, 3)              # per (tile, column of tile)
    return ((q4 - z4) * s4 * t4).reshape(N, K)


def reference_linear(x: torch.Tensor, tensors: dict, meta: dict,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x.float() @ W.T + bias`` in float32. ``bias=None`` uses ``tensors["bias"]`` when the
    layer has one."""
    W = dequant_layer(tensors, meta)
    if bias is None:
        bias = tensors.get("bias")
    y = x.float() @ W.t()
    if bias is not None:
        y = y + bias.float()
    return y


# --------------------------------------------------------------------------------------
# checkpoint level
# --------------------------------------------------------------------------------------

def _weight_map(ckpt_dir: Path) -> dict[str, str]:
    idx = ckpt_dir / INDEX_NAME
    if idx.is_file():
        return dict(json.loads(idx.read_text())["weight_map"])
    single = ckpt_dir / SINGLE_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise FileNotFoundError(f"{ckpt_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def _sidecar(ckpt_dir: Path) -> dict:
    p = ckpt_dir / SIDECAR_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def _read_tensors(ckpt_dir: Path, wmap: dict[str, str], keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(wmap[k], []).append(k)
    out = {}
    for fname, ks in by_file.items():
        with safe_open(str(ckpt_dir / fname), framework="pt") as f:
            for k in ks:
                out[k] = f.get_tensor(k)
    return out


def _canonical(name: str) -> str:
    """Undo the legacy extra ``model.`` prefix (docs/format.md §2.11)."""
    if name.startswith("model.model."):
        return name[len("model."):]
    if name.startswith("model.lm_head"):
        return name[len("model."):]
    return name


def quantized_modules(ckpt_dir: str | os.PathLike) -> list[str]:
    """Names (as stored) of the modules that carry ``W_q`` in the checkpoint."""
    wmap = _weight_map(Path(ckpt_dir))
    return sorted(k[: -len(".W_q")] for k in wmap if k.endswith(".W_q"))


def load_checkpoint_layer(ckpt_dir: str | os.PathLike, module_name: str, *,
                          _wmap: dict | None = None, _side: dict | None = None
                          ) -> tuple[dict, dict]:
    """``(tensors, meta)`` of one SINQ module: its tensors with the ``module_name + "."``
    prefix stripped, and its sidecar meta (the inner dict). ``module_name`` may be given with
    or without the legacy extra ``model.`` prefix."""
    d = Path(ckpt_dir)
    wmap = _weight_map(d) if _wmap is None else _wmap
    side = _sidecar(d) if _side is None else _side
    cands = [module_name, _canonical(module_name), "model." + module_name]
    for name in cands:
        pre = name + "."
        keys = [k for k in wmap if k.startswith(pre) and _is_leaf_key(k[len(pre):])]
        if keys:
            tensors = {k[len(pre):]: v for k, v in _read_tensors(d, wmap, keys).items()}
            entry = side.get(name) or side.get(_canonical(name)) or {}
            meta = entry.get("meta", entry)
            if "W_q" in tensors and not meta:
                raise KeyError(f"{name}: no entry in {SIDECAR_NAME}")
            return tensors, dict(meta)
    raise KeyError(f"module {module_name!r} not found in {d}")


def _is_leaf_key(rest: str) -> bool:
    """True for the keys that belong to the module itself (not to a child module)."""
    return rest in ("W_q", "bias", "weight") or rest.startswith("meta.")


def dequantized_state_dict(ckpt_dir: str | os.PathLike,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Plain HF state dict of a SINQ checkpoint: every SINQ module ``P`` becomes
    ``P.weight`` (float32 dequant, cast to ``dtype``) plus ``P.bias``; all other tensors
    are passed through (floating ones cast to ``dtype``). Keys get the legacy extra
    ``model.`` prefix removed; buffers such as ``rotary_emb.inv_freq`` are dropped."""
    d = Path(ckpt_dir)
    wmap = _weight_map(d)
    qmods = sorted(k[: -len(".W_q")] for k in wmap if k.endswith(".W_q"))
    qset = set(qmods)
    side = _sidecar(d)
    sd: dict[str, torch.Tensor] = {}
    for mod in qmods:
        tensors, meta = load_checkpoint_layer(d, mod, _wmap=wmap, _side=side)
        name = _canonical(mod)
        sd[name + ".weight"] = dequant_layer(tensors, meta).to(dtype)
        if "bias" in tensors:
            sd[name + ".bias"] = tensors["bias"].to(dtype)
    rest = [k for k in wmap
            if k.rsplit(".", 1)[0] not in qset and not any(
                k.startswith(m + ".meta.") for m in qset)
            and "rotary_emb." not in k]
    for k, v in _read_tensors(d, wmap, rest).items():
        sd[_canonical(k)] = v.to(dtype) if v.is_floating_point() else v
    return sd


def _fuse_experts(sd: dict[str, torch.Tensor], model) -> None:
    """Transformers v5 MoE models hold the experts of a block fused (``experts.gate_up_proj``
    ``[E, 2I, H]`` = gate rows then up rows per expert, ``experts.down_proj`` ``[E, H, I]``)
    while checkpoints hold them per expert (``experts.{e}.gate_proj.weight`` ...): stack them
    the way Transformers' own loading conversion does (MergeModulelist + Concatenate)."""
    import re

    per_expert = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    fused_names = set(model.state_dict())
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key in list(sd):
        m = per_expert.match(key)
        if m and f"{m.group(1)}.down_proj" in fused_names:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = sd.pop(key)
    for prefix, projs in groups.items():
        n = len(projs["down_proj"])
        if "gate_proj" in projs:
            sd[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]], 0) for e in range(n)])
        else:
            sd[f"{prefix}.up_proj"] = torch.stack([projs["up_proj"][e] for e in range(n)])
        sd[f"{prefix}.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])


def dequantized_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A Transformers ``AutoModelForCausalLM`` holding the dequantized weights (eval mode).

    The ``quantization_config`` in ``config.json`` (if any) is ignored. With tied
    embeddings, a checkpoint without ``lm_head.weight`` is re-tied; one that stores a
    separate (e.g. quantized) ``lm_head`` is loaded untied so both matrices are exact.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(ckpt_dir)
    sd = dequantized_state_dict(d, dtype)
    cfg = AutoConfig.from_pretrained(str(d))
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in sd:
        emb = sd.get("model.embed_tokens.weight")
        if emb is None or not torch.equal(emb, sd["lm_head.weight"]):
            cfg.tie_word_embeddings = False
            tied = False
    if tied:
        sd.pop("lm_head.weight", None)
    cfg.dtype = dtype
    try:  # skip the random init: every parameter is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _fuse_experts(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"dequantized state dict does not fit {type(model).__name__}: "
                       f"missing={missing[:8]} unexpected={unexpected[:8]}")
    if tied:
        model.tie_weights()
    return model.eval()
