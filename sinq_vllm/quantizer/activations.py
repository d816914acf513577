"""Calibration activations for A-SINQ, one decoder block at a time (docs/format.md §1.5).

What the reference's ``collect_activations_blockwise`` computes, on CPU, without ever
holding the model: the embedding, then every decoder block in turn, each built from the
model's architecture (meta device), filled with its own tensors read from the source
checkpoint, run in bf16 on every calibration sample and dropped. Hooks on the block's
``nn.Linear`` modules keep their inputs (bf16, ``[S, L, K]``), which the quantizer uses for
that block's layers before the next block runs; so the model is never in memory, let alone
twice, and only one block's activations are.

The forward is the reference's: the whole model cast to bf16 (its ``model.bfloat16()``, which
also rounds the rotary ``inv_freq`` buffers), then per sample
``block(h, position_ids=arange(L), position_embeddings=rotary_emb(h, position_ids),
cache_position=arange(L))`` with no attention mask (causal through SDPA). Models whose
rotary embedding takes the layer type (Gemma3: one table per attention type) get the table
of each block's type, as their own forward does; the reference's call fails there.
"""

from __future__ import annotations

import copy
import inspect
import re

import torch

from ..errors import SinqCheckpointError, SinqConfigError
from ..log import get_logger

logger = get_logger(__name__)

_DTYPE = torch.bfloat16  # the reference runs the calibration forward in bf16


def decoder_core(model: torch.nn.Module, method: str = "asinq") -> tuple[torch.nn.Module, str]:
    """``(module holding .layers, its name)`` as the reference's ``_get_transformer_core``
    finds it (``model.layers`` or ``model.language_model.layers``), or a SinqConfigError
    naming the module where it looked."""
    core, parts = model, []
    if hasattr(core, "model"):
        core, parts = core.model, ["model"]
    if hasattr(core, "language_model"):
        core, parts = core.language_model, [*parts, "language_model"]
    where = ".".join(parts) or "<root>"
    missing = [a for a in ("layers", "embed_tokens") if not hasattr(core, a)]
    if missing:
        raise SinqConfigError(
            f"--method {method}: {type(model).__name__} has no calibration path: module '{where}' "
            f"({type(core).__name__}) has no {' / '.join(missing)} (A-SINQ runs the decoder blocks at "
            "model.layers or model.language_model.layers one by one); quantize it with --method sinq"
        )
    return core, ".".join([*parts, "layers"])


class BlockActivations:
    """Inputs of the ``nn.Linear`` modules of each decoder block on the calibration samples.

    ``for_module(name)`` returns ``[S, L, K]`` bf16 for a Linear inside a decoder block (None
    outside the blocks, e.g. ``lm_head``, as in the reference). Blocks run in order on demand;
    asking for an earlier block than the last one run is an error (the quantizer writes
    modules in natural order, block after block).
    """

    def __init__(self, model: torch.nn.Module, read_tensor, keys: set[str], samples: list[torch.Tensor],
                 method: str = "asinq", sequential: bool = False):
        self.model = model  # meta-device architecture
        self.method = method  # the calibrated method, for error messages
        # sequential: a block's inputs come from the blocks before it with their quantized weights
        # (GPTQ's order, so each layer's error feedback also corrects what the earlier blocks'
        # rounding did to its inputs); else from the original weights, as the reference's A-SINQ
        self.sequential = sequential
        self._block: torch.nn.Module | None = None  # sequential: the last block run, and its inputs
        self._block_inputs: list[torch.Tensor] | None = None
        self._quantized: dict[str, torch.Tensor] = {}  # sequential: its layers' weights as readers get them
        self.core, self.prefix = decoder_core(model, method)
        self.blocks = self.core.layers
        self._read = read_tensor  # key -> tensor from the source checkpoint
        self._keys = keys
        self._samples = samples
        self._pattern = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.")
        self._rotary = self._materialize(self.core.rotary_emb, None) if hasattr(self.core, "rotary_emb") else None
        self._typed_rotary = self._rotary is not None and "layer_type" in inspect.signature(
            self._rotary.forward).parameters
        self._hidden: list[torch.Tensor] | None = None
        self._next = 0  # index of the next block to run
        self._acts: dict[str, torch.Tensor] = {}

    def block_of(self, module: str) -> int | None:
        m = self._pattern.match(module)
        return int(m.group(1)) if m and int(m.group(1)) < len(self.blocks) else None

    def start(self) -> None:
        """Embed the samples and run the first block: any failure of the calibration path shows
        here, before the quantizer writes anything."""
        if self._hidden is None:
            embed = self._materialize(self.core.embed_tokens, self._name(self.core.embed_tokens))
            with torch.inference_mode():
                self._hidden = [embed(ids) for ids in self._samples]
            del embed
        if self._next == 0:
            self._run(0)

    def for_module(self, module: str) -> torch.Tensor | None:
        block = self.block_of(module)
        if block is None:
            return None
        self.start()
        if block < self._next - 1:
            raise RuntimeError(f"A-SINQ calibration: '{module}' requested after block {self._next - 1} ran")
        while self._next <= block:
            self._run(self._next)
        return self._acts.get(module)

    def quantized(self, module: str, weight: torch.Tensor) -> None:
        """``module``'s weight as readers get it back: with ``sequential``, the next block's
        inputs are computed through it (ignored otherwise, and outside the blocks)."""
        block = self.block_of(module) if self.sequential else None
        if block is None:
            return
        if block != self._next - 1:
            raise RuntimeError(f"{self.method} calibration: '{module}' quantized out of block order")
        self._quantized[module] = weight

    # ---- internals ---------------------------------------------------------------------
    def _name(self, module: torch.nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    def _materialize(self, meta_module: torch.nn.Module, name: str | None) -> torch.nn.Module:
        """A CPU copy of a meta-device submodule: non-persistent buffers (rotary frequencies,
        Gemma's embedding scale) initialised by the model's own ``_init_weights``, parameters
        and persistent buffers read from the checkpoint under ``name``; then cast to bf16."""
        module = copy.deepcopy(meta_module).to_empty(device="cpu")
        for sub in module.modules():
            if getattr(sub, "_non_persistent_buffers_set", None):
                self.model._init_weights(sub)
        if name is not None:
            state = {}
            for key in module.state_dict():
                full = f"{name}.{key}"
                if full not in self._keys:
                    raise SinqCheckpointError(
                        f"--method {self.method}: tensor '{full}' (needed by the calibration forward) is not in the source checkpoint"
                    )
                state[key] = self._read(full)
            module.load_state_dict(state, strict=True)
        return module.to(_DTYPE).eval()

    def _forward(self, block: torch.nn.Module, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """``block`` (decoder block ``index``) on every sample of ``hidden``, as the model's forward calls it."""
        layer_type = None
        if self._typed_rotary:
            layer_type = self.model.config.get_text_config().layer_types[index]
        outputs = []
        with torch.inference_mode():
            for h in hidden:
                length = h.shape[1]
                position_ids = torch.arange(length).unsqueeze(0)
                emb = None
                if self._rotary is not None:
                    emb = (self._rotary(h, position_ids, layer_type) if self._typed_rotary
                           else self._rotary(h, position_ids))
                out = block(h, position_ids=position_ids, position_embeddings=emb, cache_position=torch.arange(length))
                outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    def _requantized_outputs(self) -> None:
        """sequential: the last block's outputs again, through its quantized weights."""
        if not self._quantized:
            return
        prefix = f"{self.prefix}.{self._next - 1}."
        for module, weight in self._quantized.items():
            linear = self._block.get_submodule(module[len(prefix):])
            linear.weight.data.copy_(weight.to(linear.weight.dtype))
        self._hidden = self._forward(self._block, self._next - 1, self._block_inputs)
        self._quantized = {}

    def _run(self, index: int) -> None:
        if self.sequential and self._block is not None:
            self._requantized_outputs()
        name = f"{self.prefix}.{index}"
        block = self._materialize(self.blocks[index], name)
        acts: dict[str, list[torch.Tensor]] = {}

        def hook(sub_name):
            def fn(mod, inputs, output):
                acts.setdefault(sub_name, []).append(inputs[0].detach().to("cpu", _DTYPE))
            return fn

        handles = [mod.register_forward_hook(hook(f"{name}.{sub}")) for sub, mod in block.named_modules()
                   if isinstance(mod, torch.nn.Linear)]
        try:
            outputs = self._forward(block, index, self._hidden)
        except Exception as e:  # noqa: BLE001 - any failure of a foreign forward: name the block
            raise SinqConfigError(
                f"--method {self.method}: the calibration forward of '{name}' ({type(block).__name__}) failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        finally:
            for h in handles:
                h.remove()
        if self.sequential:
            self._block, self._block_inputs = block, self._hidden
        self._hidden = outputs
        # q/k/v (and gate/up) receive the same input tensor: concatenate it once and let them
        # share it (memory, and sinq_gptq computes one Hessian for all of them)
        joined: dict[tuple, torch.Tensor] = {}
        self._acts = {}
        for k, v in acts.items():
            # hooks get a new detached view per module, of the same storage (all alive here)
            key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in v)
            if key not in joined:
                joined[key] = torch.cat(v)
            self._acts[k] = joined[key]
        self._next = index + 1
