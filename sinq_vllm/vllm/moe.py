"""``SinqMoEMethod``: vLLM fused-MoE layers whose routed experts are SINQ-quantized.

A SINQ MoE checkpoint stores every expert projection as its own SINQ module
(``model.layers.L.mlp.experts.{e}.gate_proj`` ... with ``W_q``, ``meta.*`` and a sidecar
entry, exactly like a Linear). In vLLM 0.32 the experts of a block live in a
``RoutedExperts`` module (prefix ``...mlp.experts``) whose ``load_weights`` maps
``experts.{e}.gate_proj.<rest>`` to the parameter ``w13_<rest>`` (``up_proj``: ``w13``,
shard ``w3``; ``down_proj``: ``w2``) and calls its ``weight_loader(param, loaded_weight,
weight_name, shard_id=..., expert_id=..., return_success=True)``.

Loading therefore works like the dense ``SinqLinearMethod``, per expert:
* ``create_weights`` registers receivers ``w13_W_q``, ``w13_meta.scale2``,
  ``w13_meta.scale.x`` ... (and ``w2_*``). The names contain dots, which nn.Module
  cannot register, so they are plain instance attributes (found by ``getattr``, not
  listed by ``named_parameters``); their loader keeps the raw tensor per (expert, shard);
* ``process_weights_after_loading`` decodes each expert with ``assembly.assemble``
  (gate and up merged into one ``[2I, H]`` layer with a column-scale vector per shard,
  ``[2, H]``; down ``[H, I]``), cuts this tensor-parallel rank's part (gate/up rows,
  down K range), lets a kernel backend repack it and stacks the experts: resident
  parameters ``sinq_w13_<key>`` / ``sinq_w2_<key>`` of shape ``[E_local, ...]``.

Forward: vLLM's router picks ``topk_ids`` / ``topk_weights`` (the modular path), then
* on CUDA with Triton: one grouped GEMM per projection over expert-sorted token blocks
  with the SINQ dequant fused (``sinq_vllm.triton_kernels.sinq_moe``), on the torch
  backend's resident layout;
* elsewhere: per expert hit, the dense backend op (the C++ CPU kernel or the portable
  torch backend) on the tokens routed to it, wrapped in one opaque custom op so that
  torch.compile does not trace the data-dependent loop.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SinqCheckpointError, SinqConfigError
from ..format.layer_meta import LayerMeta
from ..format.tensor_specs import required_keys, stored_dtype
from ..kernels.contract import LayerSpec, SinqWeights, spec_of
from ..kernels.selection import requested_backend, select_backend
from ..log import get_logger
from .assembly import ShardSlice, assemble, check_k_split
from .compat import fused_moe_api, set_weight_attrs

logger = get_logger(__name__)

_api = fused_moe_api()
FusedMoEMethodBase = _api.FusedMoEMethodBase
MoEActivation = _api.MoEActivation

_RESIDENT_PREFIX = "sinq_"
#: vLLM shard ids per resident family, in merged order (gate rows first, then up)
_FAMILIES = {"w13": ("w1", "w3"), "w2": ("w2",)}
_ACTIVATIONS = {
    MoEActivation.SILU: F.silu,
    MoEActivation.GELU: F.gelu,
    MoEActivation.GELU_TANH: lambda v: F.gelu(v, approximate="tanh"),
}
#: SINQ_VLLM_MOE_KERNEL=auto|triton|loop; auto: Triton on CUDA when importable, else the loop
MOE_KERNEL_ENV = "SINQ_VLLM_MOE_KERNEL"


def sinq_moe_quant_method(layer: nn.Module, prefix: str, layer_metas: dict[str, LayerMeta],
                          bias_names: set[str] | None = None):
    """The quant method of a vLLM ``RoutedExperts`` layer, or None for any other layer.

    ``SinqMoEMethod`` when the checkpoint has SINQ experts under ``prefix``; vLLM's
    unquantized method when the experts are plain tensors (e.g. kept in bf16).
    """
    if not isinstance(layer, _api.RoutedExperts):
        return None
    moe = layer.moe_config
    projections = {"w1": layer.ckpt_gate_proj_name, "w2": layer.ckpt_down_proj_name, "w3": layer.ckpt_up_proj_name}
    names = {sid: [f"{prefix}.{e}.{p}" for e in range(moe.num_logical_experts)]
             for sid, p in projections.items() if p is not None}
    metas = {sid: [layer_metas.get(n) for n in ns] for sid, ns in names.items()}
    found = [m for ms in metas.values() for m in ms if m is not None]
    if not found:
        return _api.UnquantizedFusedMoEMethod(moe)
    missing = [n for sid, ns in names.items() for n, m in zip(ns, metas[sid]) if m is None]
    if missing:
        raise SinqCheckpointError(
            f"MoE layer '{prefix}': {len(found)} expert projections are SINQ-quantized but {len(missing)} are not "
            f"(e.g. '{missing[0]}'); quantize all experts of a layer or none"
        )
    with_bias = [n for ns in names.values() for n in ns if bias_names and f"{n}.bias" in bias_names]
    if with_bias:
        raise SinqCheckpointError(
            f"MoE layer '{prefix}': SINQ experts with biases ('{with_bias[0]}.bias') are not supported"
        )
    return SinqMoEMethod(moe, prefix, metas)


class SinqMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, prefix: str, metas: dict[str, list[LayerMeta]]):
        super().__init__(moe)
        self.prefix = prefix
        self.metas = metas  # shard id ("w1", "w2", "w3") -> one LayerMeta per logical expert
        self.kernel = "loop"  # or "triton"
        self.backends: dict[str, object] = {}
        self.specs: dict[str, LayerSpec] = {}
        self.resident_keys: dict[str, tuple[str, ...]] = {}
        self.intermediate = 0  # per-partition intermediate size

    # ---- parameters -------------------------------------------------------------------
    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition  # SINQ groups fix the layout: never pad

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self._check(layer, hidden_size, intermediate_size_per_partition)
        self.intermediate = intermediate_size_per_partition
        raw = {fam: [None] * num_experts for fam in _FAMILIES}  # family -> local expert -> (global id, shards)
        layer.sinq_moe_raw = raw
        layer.sinq_moe_receivers = []

        def weight_loader(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None,
                          return_success=False):
            family, key = param.sinq_family, param.sinq_key
            shards = _FAMILIES[family]
            if shard_id not in shards:
                raise SinqCheckpointError(
                    f"MoE layer '{self.prefix}': got {weight_name} for shard {shard_id!r} into {family}, expected "
                    f"one of {shards} (checkpoints with pre-fused gate_up experts are not SINQ checkpoints)"
                )
            local = layer._map_global_expert_id_to_local_expert_id(int(expert_id))
            if local < 0:
                return False if return_success else None  # another expert-parallel rank's expert
            entry = raw[family][local]
            if entry is None:
                entry = raw[family][local] = (int(expert_id), [dict() for _ in shards])
            entry[1][shards.index(shard_id)][key] = loaded_weight.detach()
            return True if return_success else None

        for family, shards in _FAMILIES.items():
            keys: dict[str, LayerMeta] = {}
            for sid in shards:
                for meta in self.metas[sid]:
                    for key in required_keys(meta):
                        keys.setdefault(key, meta)
            for key, meta in keys.items():
                param = nn.Parameter(torch.empty(0, dtype=stored_dtype(meta, key)), requires_grad=False)
                set_weight_attrs(param, {"weight_loader": weight_loader, "sinq_key": key, "sinq_family": family})
                name = f"{family}_{key}"
                # "w13_meta.scale.x" has dots: an instance attribute that RoutedExperts.load_weights
                # finds with getattr; nn.Module.register_parameter refuses such names.
                object.__setattr__(layer, name, param)
                layer.sinq_moe_receivers.append(name)

    def _check(self, layer, hidden: int, inter_local: int) -> None:
        moe = self.moe
        where = f"MoE layer '{self.prefix}'"
        if moe.activation not in _ACTIVATIONS or not moe.is_act_and_mul:
            raise SinqCheckpointError(
                f"{where}: activation {moe.activation.value!r} is not supported with SINQ experts "
                f"(supported: {[a.value for a in _ACTIVATIONS]})"
            )
        if moe.has_bias:
            raise SinqCheckpointError(f"{where}: experts with biases are not supported with SINQ experts")
        if getattr(layer, "is_fused_checkpoint_transposed", False):
            raise SinqCheckpointError(f"{where}: transposed fused expert checkpoints are not SINQ checkpoints")
        inter = moe.intermediate_size
        expected = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
        for sid, metas in self.metas.items():
            kinds = {(m.nbits, m.group_size, m.codebook or "uniform") for m in metas}
            if len(kinds) > 1:
                raise SinqCheckpointError(
                    f"{where}: the {sid} projections of its experts were quantized with different bits/group sizes/"
                    f"codebooks {sorted(kinds)}; re-quantize them alike"
                )
            for m in metas:
                if (m.out_features, m.in_features) != expected[sid]:
                    raise SinqCheckpointError(
                        f"layer '{m.name}': sidecar shape [{m.out_features}, {m.in_features}] does not match the model "
                        f"config's {list(expected[sid])}"
                    )
        if len({(m.nbits, m.group_size, m.codebook) for m in self.metas["w1"] + self.metas["w3"]}) > 1:
            raise SinqCheckpointError(f"{where}: gate_proj and up_proj experts were quantized differently")
        check_k_split(f"{where}: down_proj", inter, inter_local, self.metas["w2"][0].group_size)

    # ---- after loading ------------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "sinq_moe_raw"):
            return  # already processed
        raw = layer.sinq_moe_raw
        device = getattr(layer, layer.sinq_moe_receivers[0]).device
        for name in layer.sinq_moe_receivers:
            del layer.__dict__[name]
        del layer.sinq_moe_raw, layer.sinq_moe_receivers

        tp_rank = self.moe.moe_parallel_config.tp_rank
        i_local, hidden = self.intermediate, self.moe.hidden_dim
        rows = ShardSlice(tp_rank * i_local, (tp_rank + 1) * i_local, 0, hidden)
        cols = ShardSlice(0, hidden, tp_rank * i_local, (tp_rank + 1) * i_local)
        local_to_global = _local_to_global(layer, len(raw["w13"]))
        decoded: dict[str, list[SinqWeights]] = {fam: [] for fam in _FAMILIES}
        for local, expert in enumerate(local_to_global):
            for family, shards in _FAMILIES.items():
                metas = [self.metas[sid][expert] for sid in shards]
                entry = raw[family][local]
                tensors = entry[1] if entry is not None else [dict() for _ in shards]
                part = rows if family == "w13" else cols
                # missing tensors are reported by assemble's checks, naming the module
                decoded[family].append(assemble(metas, tensors, [part] * len(shards), device))
            raw["w13"][local] = raw["w2"][local] = None  # free the raw tensors as we go

        codebooks = sorted({m.codebook for ms in self.metas.values() for m in ms if m.codebook})
        self.kernel = _choose_kernel(device, codebooks)
        act_dtype = layer.params_dtype
        for family, weights in decoded.items():
            spec = spec_of(weights[0])
            if self.kernel == "triton":
                from ..kernels.torch_backend import TorchBackend  # the layout the Triton kernel reads

                backend = TorchBackend()
            else:
                backend = select_backend(spec, act_dtype, device, f"{self.prefix}.{family}")
            stacked: dict[str, list[torch.Tensor]] = {}
            for w in weights:
                for key, tensor in backend.prepare(w).items():
                    stacked.setdefault(key, []).append(tensor)
            for key, tensors in stacked.items():
                layer.register_parameter(f"{_RESIDENT_PREFIX}{family}_{key}",
                                         nn.Parameter(torch.stack(tensors), requires_grad=False))
            self.backends[family], self.specs[family] = backend, spec
            self.resident_keys[family] = tuple(stacked)
            weights.clear()
        _register_layer(self.prefix, self, layer)
        _log_kernel_once(self.kernel, {f: b.name for f, b in self.backends.items()}, device, act_dtype)

    def get_fused_moe_quant_config(self, layer: nn.Module):
        return None  # no vLLM modular kernel: apply() runs the SINQ experts itself

    # ---- forward ---------------------------------------------------------------------
    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        # Shared experts run in the runner before this call (SharedExpertsOrder.NO_OVERLAP).
        if self.kernel == "triton":
            return self._apply_triton(layer, x, topk_weights, topk_ids)
        return torch.ops.sinq_vllm.moe_experts(x, topk_weights, topk_ids, self.prefix)

    def resident(self, layer, family: str) -> dict[str, torch.Tensor]:
        return {k: getattr(layer, f"{_RESIDENT_PREFIX}{family}_{k}") for k in self.resident_keys[family]}

    def forward_loop(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Per expert: the dense SINQ op on the tokens routed to it (eager; not traced). While a
        CUDA graph is being captured nothing may be read back to the host, so there every local
        expert runs on all tokens with a routing weight of 0 for the tokens not routed to it."""
        ids = topk_ids.long()
        expert_map = layer.expert_map
        if expert_map is not None:
            ids = expert_map.long()[ids]  # global -> local expert, -1 when on another rank
        on_input = bool(layer.apply_router_weight_on_input)
        act = _ACTIVATIONS[self.moe.activation]
        w13, w2 = self.resident(layer, "w13"), self.resident(layer, "w2")
        b13, b2 = self.backends["w13"], self.backends["w2"]
        s13, s2 = self.specs["w13"], self.specs["w2"]
        inter = self.intermediate
        out = torch.zeros(x.shape[0], s2.out_features, dtype=torch.float32, device=x.device)
        capturing = _graph_capturing(x)
        experts = range(w13["qweight"].shape[0]) if capturing else torch.unique(ids).tolist()
        for e in experts:
            if e < 0:
                continue
            if capturing:  # static shapes, no host sync: every token, weight 0 where not routed
                tok = None
                weight = torch.where(ids == e, topk_weights.float(), 0.0).sum(1, keepdim=True)
                xe = x
            else:
                tok, slot = (ids == e).nonzero(as_tuple=True)
                weight = topk_weights[tok, slot].float().unsqueeze(1)
                xe = x[tok]
            if on_input:
                xe = (xe.float() * weight).to(x.dtype)
            h = b13.apply({k: v[e] for k, v in w13.items()}, s13, xe, None).float()
            h = (act(h[:, :inter]) * h[:, inter:]).to(x.dtype)
            y = b2.apply({k: v[e] for k, v in w2.items()}, s2, h, None).float()
            y = y if on_input else y * weight
            if tok is None:
                out += y
            else:
                out.index_add_(0, tok, y)
        return out.to(x.dtype)

    def _apply_triton(self, layer, x, topk_weights, topk_ids):
        from ..triton_kernels.sinq_moe import sinq_fused_moe

        return sinq_fused_moe(
            x, topk_weights, topk_ids, self.resident(layer, "w13"), self.resident(layer, "w2"),
            nbits13=self.specs["w13"].nbits, nbits2=self.specs["w2"].nbits, group13=self.specs["w13"].group_size,
            group2=self.specs["w2"].group_size, activation=self.moe.activation.value,
            apply_router_weight_on_input=bool(layer.apply_router_weight_on_input), expert_map=layer.expert_map,
            codebook13=self.specs["w13"].codebook, codebook2=self.specs["w2"].codebook,
        )


def _graph_capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _local_to_global(layer, num_local: int) -> list[int]:
    expert_map = layer.expert_map
    if expert_map is None:
        return list(range(num_local))
    out = [-1] * num_local
    for g, local in enumerate(expert_map.tolist()):
        if 0 <= local < num_local:
            out[local] = g
    return out


def _choose_kernel(device: torch.device, codebooks=()) -> str:
    want = os.environ.get(MOE_KERNEL_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "triton", "loop"):
        raise SinqConfigError(f"{MOE_KERNEL_ENV}={want!r}; valid values: auto, triton, loop")
    triton_ok = device.type == "cuda" and _triton_importable()
    if want == "triton" and not triton_ok:
        raise SinqConfigError(f"{MOE_KERNEL_ENV}=triton needs a CUDA device and Triton")
    if codebooks:
        # The grouped Triton MoE kernel computes uniform codes only: NF experts run per expert
        # through a backend whose `codebooks` include theirs (docs/design.md §3.5).
        if want == "triton":
            raise SinqConfigError(f"{MOE_KERNEL_ENV}=triton: the Triton MoE kernel does not compute "
                                  f"{'/'.join(c.upper() for c in codebooks)} codebook experts; use auto or loop")
        return "loop"
    if want == "loop" or requested_backend() != "auto":
        return "loop"  # a forced SINQ_VLLM_BACKEND runs per expert through that backend
    return "triton" if triton_ok else "loop"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_logged: set = set()


def _log_kernel_once(kernel: str, backends: dict, device, dtype) -> None:
    key = (kernel, tuple(sorted(backends.items())), device.type, str(dtype))
    if key not in _logged:
        _logged.add(key)
        what = "Triton grouped GEMM (sinq_moe)" if kernel == "triton" else f"per-expert loop over backends {backends}"
        logger.info("SINQ: MoE experts on %s/%s use the %s", device.type, str(dtype).replace("torch.", ""), what)


# ---- the opaque op around the per-expert loop --------------------------------------------------
_layers: dict[str, tuple] = {}


def _register_layer(prefix: str, method: SinqMoEMethod, layer: nn.Module) -> None:
    _layers[prefix] = (weakref.ref(method), weakref.ref(layer))


@torch.library.custom_op("sinq_vllm::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    method_ref, layer_ref = _layers[layer_name]
    method, layer = method_ref(), layer_ref()
    if method is None or layer is None:
        raise RuntimeError(f"SINQ MoE layer '{layer_name}' is gone")
    return method.forward_loop(layer, x, topk_weights, topk_ids)


@_moe_experts.register_fake
def _moe_experts_fake(x, topk_weights, topk_ids, layer_name):
    return torch.empty_like(x)
