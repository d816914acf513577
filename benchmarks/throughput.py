"""Throughput: offline vLLM generation, SINQ int4 vs bf16 vs vLLM's AWQ int4, same model.

Engines (one fresh process each, one after the other):
  * bf16: the plain bf16 HF folder;
  * SINQ int4: ``sinq_vllm.quantizer.quantize_model`` (4-bit, group 64, quantAux), served by
    this plugin (``quantization="sinq"``);
  * AWQ int4: the same weights RTN-quantized to 4 bits (group 64, integer zeros) and
    written in the AutoAWQ GEMM layout (``qweight``/``qzeros``/``scales``,
    ``quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 64,
    "zero_point": true, "version": "gemm"}``), served by vLLM's own AWQ path
    (on CPU: its WNA16 kernel).

Model: SmolLM2-135M-Instruct (real); ``--qwen3`` adds a random model of the Qwen3-0.6B
shape (hidden 1024, intermediate 3072, 28 layers, 16/8 heads, head_dim 128).

Per engine and batch size (1/16/64 by default): prompts of ``--prompt-len`` token ids,
``--new-tokens`` generated tokens with ``ignore_eos``. decode tok/s = (generated tokens
- one per sequence) / (generate time - prefill time), the prefill time being a
``max_tokens=1`` call on the same prompts; best of ``--repeats`` after a warm-up.
Also reported: weights memory (resident bytes of the quantized/linear layers in the
engine, ``sinq_vllm.vllm.memory.sinq_weight_bytes`` for SINQ, and the bf16 equivalent), the KV
cache the engine allocated, and the KV tokens the saved weight bytes would hold.

Finally it runs vLLM's own benchmark CLI on the SINQ checkpoint and records its
"Throughput:" line:

    vllm bench throughput --model DIR --quantization sinq --input-len 64 --output-len 32 --num-prompts 8
        --random-input-len 64 --random-output-len 32

(the last two because vLLM 0.32's random dataset otherwise uses its own 1024/128 defaults).

    python benchmarks/throughput.py [--batch-sizes 1,16,64] [--new-tokens 64] [--qwen3]
                                    [--repeats 3] [--rounds 1] [--compile] [--no-cli] [--cli-all]

Writes benchmarks/results/throughput.md and throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

C.setup_env()

QWEN3_06B = dict(hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936)
SANITY_PROMPT = "The capital of France is"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    ap.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per batch size, best kept (default 3)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engines this many times, interleaved (bf16, sinq, awq, bf16, ...), best kept; "
                         "2 or more on a busy machine (default 1)")
    ap.add_argument("--group-size", type=int, default=64, help="SINQ and AWQ group size (default 64)")
    ap.add_argument("--qwen3", action="store_true", help="also a random Qwen3-0.6B-shaped model")
    ap.add_argument("--qwen3-layers", type=int, default=28)
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 (e.g. with --qwen3)")
    ap.add_argument("--engines", default="bf16,sinq,awq")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (default: enforce_eager)")
    ap.add_argument("--no-cli", action="store_true", help="skip the `vllm bench throughput` run")
    ap.add_argument("--cli-all", action="store_true", help="run `vllm bench throughput` on every engine")
    ap.add_argument("--out", default="throughput", help="result file stem in benchmarks/results/")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one engine run
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------
# model preparation

def make_qwen3_bf16(path: Path, layers: int) -> Path:
    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = QWEN3_06B
    cfg = Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=layers, num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], max_position_embeddings=4096,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)
    cfg.dtype = torch.bfloat16
    torch.manual_seed(0)
    C.log(f"building a random Qwen3-0.6B-shaped model ({layers} layers) -> {path} ...")
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM nibble order within an int32


def awq_pack(codes_kn):
    """``[K, N]`` 4-bit codes -> AutoAWQ int32 ``[K, N/8]`` (nibble i holds column 8c+ORDER[i])."""
    import torch

    k, n = codes_kn.shape
    q = codes_kn.to(torch.int64).view(k, n // 8, 8)[:, :, list(_AWQ_ORDER)]
    shifts = torch.arange(8, dtype=torch.int64) * 4
    packed = (q << shifts).sum(-1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # wrap into signed int32


def awq_quantize(w, group: int):
    """RTN 4-bit, integer zeros, AutoAWQ conventions: W^T[k, n] ~ (q - z[k//g, n]) * s[k//g, n]."""
    import torch

    n, k = w.shape
    wt = w.float().t().contiguous().view(k // group, group, n)  # groups along K
    wmax, wmin = wt.amax(1), wt.amin(1)
    s = ((wmax - wmin).clamp_min(1e-5) / 15)
    z = torch.round(-wmin / s).clamp(0, 15)
    q = torch.round(wt / s[:, None] + z[:, None]).clamp(0, 15).view(k, n)
    return awq_pack(q), awq_pack(z), s.half()


def make_awq(bf16_dir: Path, out: Path, group: int) -> Path:
    """AutoAWQ-layout int4 checkpoint of ``bf16_dir`` (RTN weights; for throughput, loading is
    what matters, but the weights are real so the model still talks)."""
    marker = out / ".sinq_bench_awq.json"
    if marker.is_file() and json.loads(marker.read_text()).get("group") == group:
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    C.log(f"writing an AWQ int4 g{group} checkpoint of {bf16_dir.name} -> {out} ...")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(bf16_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                t = h.get_tensor(key)
                if key.endswith("_proj.weight") and ".layers." in key and t.dim() == 2:
                    p = key[: -len(".weight")]
                    qw, qz, s = awq_quantize(t, group)
                    tensors[p + ".qweight"], tensors[p + ".qzeros"], tensors[p + ".scales"] = qw, qz, s
                else:
                    tensors[key] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                  "zero_point": True, "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in bf16_dir.iterdir():
        if p.is_file() and (p.name.startswith("tokenizer") or p.name in (
                "generation_config.json", "special_tokens_map.json", "chat_template.jinja")):
            shutil.copy2(p, out / p.name)
    marker.write_text(json.dumps({"group": group}))
    return out


# --------------------------------------------------------------------------------------
# worker: one engine, in its own process

def worker(spec: dict, result_file: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="bfloat16", quantization=spec["quantization"],
              max_model_len=spec["prompt_len"] + spec["new_tokens"] + 16, seed=0,
              enforce_eager=not spec["compile"], skip_tokenizer_init=not spec["has_tokenizer"],
              max_num_seqs=max(spec["batch_sizes"]), disable_log_stats=False)
    res: dict = {"load_s": time.perf_counter() - t0}
    res.update(C.kv_cache_info(llm))
    try:
        res["mem"] = llm.apply_model(C.layer_bytes)[0]
        if spec["quantization"] == "sinq":
            from sinq_vllm.vllm.memory import sinq_weight_bytes

            res["sinq_mem"] = llm.apply_model(sinq_weight_bytes)[0]
    except Exception as e:  # noqa: BLE001 - memory accounting is best effort
        res["mem_error"] = f"{type(e).__name__}: {e}"
    if spec["has_tokenizer"]:
        o = llm.generate([SANITY_PROMPT], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
        res["sample"] = o[0].outputs[0].text

    plen, new = spec["prompt_len"], spec["new_tokens"]
    vocab = spec["vocab"]
    res["batches"] = {}
    gen = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0, detokenize=False)
    for bs in spec["batch_sizes"]:
        prompts = [TokensPrompt(prompt_token_ids=[(7919 * i + 104729 * j + 17) % (vocab - 200) + 100
                                                  for j in range(plen)]) for i in range(bs)]
        llm.generate(prompts, gen, use_tqdm=False)  # warm-up
        best = None
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            out = llm.generate(prompts, gen, use_tqdm=False)
            wall = time.perf_counter() - t0
            n_tok = sum(len(o.outputs[0].token_ids) for o in out)
            # Engine-core timestamps of the same run: decode = first token -> last token.
            first = min(o.metrics.first_token_ts for o in out)
            last = max(o.metrics.last_token_ts for o in out)
            sched = min(o.metrics.scheduled_ts for o in out)
            cur = {"wall_s": wall, "tokens": n_tok, "prefill_s": first - sched, "decode_s": last - first,
                   "decode_tok_s": (n_tok - bs) / max(last - first, 1e-9), "output_tok_s": n_tok / wall}
            if best is None or cur["decode_tok_s"] > best["decode_tok_s"]:
                best = cur
        res["batches"][str(bs)] = best
        print(f"WORKER bs={bs}: decode {best['decode_tok_s']:.1f} tok/s", flush=True)
    Path(result_file).write_text(json.dumps(res))
    C.shutdown_engine(llm)
    return 0


def run_engine(spec: dict, work: Path, label: str) -> dict:
    res_file = work / f"result-{label}.json"
    res_file.unlink(missing_ok=True)
    log_path = work / f"log-{label}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec),
           "--result-file", str(res_file)]
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default process layout
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    if not res_file.is_file():  # a crash at interpreter exit after the results is tolerated
        raise RuntimeError(f"engine {label} failed (rc {proc.returncode}); log {log_path}:\n{text[-3000:]}")
    res = json.loads(res_file.read_text())
    res["wall_s"] = wall
    m = re.search(r"KV cache size: ([\d,]+) tokens", text)
    if m:
        res["kv_tokens_log"] = int(m.group(1).replace(",", ""))
    return res


def run_cli(model_dir: Path, quantization: str | None, work: Path, label: str) -> dict:
    """`vllm bench throughput` (random dataset) as a subprocess; its Throughput line."""
    # the CLI of *this* environment (make runs .venv/bin/python without activating the venv)
    local = Path(sys.executable).parent / "vllm"
    exe = str(local) if local.is_file() else (shutil.which("vllm") or "vllm")
    cmd = [exe, "bench", "throughput", "--model", str(model_dir)]
    if quantization:
        cmd += ["--quantization", quantization]
    # vLLM 0.32: with the (default) random dataset, --input-len/--output-len lose against
    # --random-input-len/--random-output-len, whose defaults are 1024/128; pass both.
    cmd += ["--input-len", "64", "--output-len", "32", "--num-prompts", "8",
            "--random-input-len", "64", "--random-output-len", "32"]
    log_path = work / f"cli-{label}.txt"
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=600,
                                  cwd=str(C.ARTIFACTS))  # not the repo root (triton_kernels/)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    text = log_path.read_text()
    line = next((ln.strip() for ln in text.splitlines() if ln.startswith("Throughput:")), None)
    shown = " ".join(Path(c).name if c == exe else c for c in cmd)
    shown = shown.replace(str(model_dir), model_dir.name)
    return {"cmd": shown, "rc": rc, "line": line, "seconds": time.perf_counter() - t0,
            "tail": None if line else text[-1500:]}


# --------------------------------------------------------------------------------------
# report

def kv_bytes_per_token(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kvh * hd * 2  # K and V, bf16


def markdown(models: list[dict], args, machine: str, elapsed: float) -> str:
    bss = [int(b) for b in args.batch_sizes.split(",")]
    out = [
        "# Throughput: SINQ int4 vs bf16 vs AWQ int4 in vLLM (offline `LLM.generate`)",
        "",
        f"- machine: {machine}",
        f"- command: `{C.command_line('throughput.py')}` ({elapsed / 60:.1f} min)",
        f"- {args.prompt_len}-token prompts, {args.new_tokens} new tokens per sequence (`ignore_eos`), greedy; "
        "decode tok/s = (generated tokens - 1 per sequence) / (last token - first token), from vLLM's "
        f"engine-core timestamps (`RequestOutput.metrics`) of one `generate` call; best of {args.repeats} "
        f"after a warm-up{f', over {args.rounds} interleaved rounds' if args.rounds > 1 else ''}; every engine "
        "in a fresh process (vLLM's default process layout), one at a time"
        + ("; torch.compile" if args.compile else "; `enforce_eager=True`") + ".",
        f"- SINQ: 4-bit, group {args.group_size}, quantAux, this plugin. AWQ: 4-bit, group {args.group_size}, "
        "AutoAWQ GEMM layout (RTN weights), vLLM's own AWQ path. bf16: the unquantized model.",
        "",
    ]
    for m in models:
        eng = m["engines"]
        base = eng.get("bf16")
        out += [f"## {m['name']}", ""]
        hdr = ["engine"]
        for bs in bss:
            hdr += [f"bs {bs} tok/s", "vs bf16"]
        rows = []
        for label, r in eng.items():
            if "error" in r:
                rows.append([label, r["error"]] + [""] * (2 * len(bss) - 1))
                continue
            line = [label]
            for bs in bss:
                v = r["batches"][str(bs)]["decode_tok_s"]
                b = base["batches"][str(bs)]["decode_tok_s"] if base and "batches" in base else None
                line += [f"{v:.1f}", f"{v / b:.2f}x" if b else ""]
            rows.append(line)
        out += ["Decode throughput (tokens/s, all sequences together):", "", C.md_table(hdr, rows), ""]
        if "sinq" in eng and "awq" in eng and "batches" in eng["sinq"] and "batches" in eng["awq"]:
            out += ["SINQ / AWQ: " + ", ".join(
                f"bs {bs} {eng['sinq']['batches'][str(bs)]['decode_tok_s'] / eng['awq']['batches'][str(bs)]['decode_tok_s']:.2f}x"
                for bs in bss), ""]
        # end-to-end
        rows = []
        for label, r in eng.items():
            if "batches" not in r:
                continue
            rows.append([label] + [f"{r['batches'][str(bs)]['output_tok_s']:.1f}" for bs in bss]
                        + [f"{r['batches'][str(bss[-1])]['prefill_s'] * 1000:.0f}"])
        out += ["Output tokens/s of the whole `generate` call (prefill and Python overhead included), and the "
                "prefill time of the largest batch:", "",
                C.md_table(["engine"] + [f"bs {bs}" for bs in bss] + [f"prefill ms (bs {bss[-1]})"], rows), ""]
        # memory
        kvb = m["kv_bytes_per_token"]
        rows = []
        for label, r in eng.items():
            mem = r.get("mem")
            if not mem:
                continue
            dense = mem["linear_bf16_equivalent"]
            # vLLM CPU moves bf16 linear weights into oneDNN handles (no tensor left to count):
            # the bf16 row shows the N*K*2 bytes those handles hold.
            lin = dense if label == "bf16" else mem["linear_bytes"]
            sm = r.get("sinq_mem")
            kv = r.get("kv_tokens")
            rows.append([label, C.mib(lin) + (" (N*K*2)" if label == "bf16" else ""), f"{lin / dense:.3f}x",
                         C.mib(sm["sinq_bytes"]) if sm else "",
                         f"{kv:,}" if isinstance(kv, int) else "n/a",
                         f"{(dense - lin) / kvb:,.0f}" if label != "bf16" else ""])
        out += [
            "Weights memory in the engine and KV cache:", "",
            C.md_table(["engine", "linear-layer weights resident", "vs bf16", "sinq_weight_bytes",
                        "KV cache tokens allocated", "extra KV tokens the saved bytes hold"], rows), "",
            "'linear-layer weights resident': parameters + buffers of vLLM's linear layers (q/k/v/o, "
            "gate/up/down) after loading (for bf16, vLLM CPU keeps them in oneDNN handles, so N*K*2 "
            "is shown); embeddings, lm_head and norms are the same for all engines and left out. "
            f"KV cache: {kvb:,} bytes per token (bf16 K and V, all layers). On CPU its size is fixed by "
            f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB, so every engine gets the "
            "same number of tokens; on a GPU vLLM gives the KV cache what the weights leave of "
            "gpu_memory_utilization, so the weight bytes saved against bf16 become KV capacity (last "
            "column: saved bytes / KV bytes per token).", "",
        ]
        samples = [(label, r.get("sample")) for label, r in eng.items() if r.get("sample") is not None]
        if samples:
            out += [f"Greedy sanity check, `{SANITY_PROMPT}` ->", ""]
            out += [f"- {label}: `{' '.join(s.split())}`" for label, s in samples] + [""]
        timing = [[label, f"{r.get('load_s', 0):.1f}", f"{r.get('wall_s', 0):.1f}"] for label, r in eng.items()]
        out += ["<details><summary>engine timings (s)</summary>", "",
                C.md_table(["engine", "engine load", "process wall"], timing), "", "</details>", ""]
        if m.get("note"):
            out += [m["note"], ""]
    clis = [(m["name"], c) for m in models for c in m.get("cli", [])]
    if clis:
        out += ["## vLLM's benchmark CLI on the SINQ checkpoint", ""]
        for name, c in clis:
            out += [f"`{c['cmd']}` ({name}, {c['seconds']:.0f} s, rc {c['rc']}):", "",
                    "    " + (c["line"] or "no Throughput line; tail of the log:\n" + (c["tail"] or "")), ""]
        out += ["(random dataset, vLLM's defaults otherwise: torch.compile, multi-process engine; its timing "
                "covers all 8 prompts scheduled at once, prefill included. In vLLM 0.32 `--input-len/--output-len` "
                "alone are overridden by the random dataset's `--random-input-len/--random-output-len` defaults "
                "(1024/128), so both are passed.)", ""]
    out += ["Noise: measured on a shared machine; the ratios come from engines run back to back in "
            "one invocation.", ""]
    return "\n".join(out)


def plot(models: list[dict], args, path: Path) -> bool:
    plt = C.pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import LogFormatter

    bss = [int(b) for b in args.batch_sizes.split(",")]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    colors = {"bf16": "0.3", "sinq": "tab:red", "awq": "tab:green"}
    for row, m in zip(axes, models):
        eng = {lb: r for lb, r in m["engines"].items() if "batches" in r}
        labels = list(eng)
        width = 0.8 / max(len(labels), 1)
        base = eng.get("bf16")
        for i, lb in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(bss))]
            vals = [eng[lb]["batches"][str(bs)]["decode_tok_s"] for bs in bss]
            row[0].bar(xs, vals, width, label=lb, color=colors.get(lb))
            if base:
                ratios = [v / base["batches"][str(bs)]["decode_tok_s"] for v, bs in zip(vals, bss)]
                bars = row[1].bar(xs, ratios, width, label=lb, color=colors.get(lb))
                for rect, v in zip(bars, ratios):
                    row[1].annotate(f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, v), ha="center",
                                    va="bottom", fontsize=7)
        row[0].set_yscale("log")
        row[0].yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        row[0].yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        row[0].set_ylabel("decode tokens/s (log)")
        row[0].set_title(f"{m['name']}: vLLM CPU decode")
        row[1].axhline(1.0, color="k", linewidth=0.8)
        row[1].set_ylabel("decode speed vs bf16")
        row[1].set_title(f"{m['name']}: ratio to bf16 (same run)")
        for ax in row:
            ax.set_xticks(range(len(bss)), [f"batch {b}" for b in bss])
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    C.log(f"wrote {C.rel(path)}")
    return True


# --------------------------------------------------------------------------------------

def bench_model(name: str, bf16: Path, has_tok: bool, vocab: int, args, work: Path) -> dict:
    sinq, _ = C.quantized_checkpoint(bf16, C.QuantSpec("sinq", 4, args.group_size, True), name=name)
    awq = make_awq(bf16, C.artifacts_dir("bench") / f"{name}-awq-w4g{args.group_size}", args.group_size)
    dirs = {"bf16": (bf16, None), "sinq": (sinq, "sinq"), "awq": (awq, "awq")}
    engines: dict = {}
    labels = [e for e in args.engines.split(",") if e]
    for rnd in range(args.rounds):  # rounds interleave the engines: bf16, sinq, awq, bf16, ...
        for label in labels:
            d, q = dirs[label]
            spec = {"model": str(d), "quantization": q,
                    "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "compile": args.compile, "has_tokenizer": has_tok, "vocab": vocab}
            C.log(f"[{name}] {label}: {d.name}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
                  + " ...")
            try:
                r = run_engine(spec, work, f"{name}-{label}")
                C.log(f"    load {r['load_s']:.1f} s; " + ", ".join(
                    f"bs {bs}: {v['decode_tok_s']:.1f} tok/s" for bs, v in r["batches"].items()))
            except Exception as e:  # noqa: BLE001 - report the failure, keep the other engines
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                C.log(f"    {label} failed: {e}")
                engines.setdefault(label, {"error": f"failed: {first}"})
                continue
            prev = engines.get(label)
            if prev is None or "batches" not in prev:
                engines[label] = r
            else:  # keep the best round per batch size
                for bs, v in r["batches"].items():
                    if v["decode_tok_s"] > prev["batches"][bs]["decode_tok_s"]:
                        prev["batches"][bs] = v
                prev["wall_s"] += r["wall_s"]
    res = {"name": name, "engines": engines, "kv_bytes_per_token": kv_bytes_per_token(bf16), "cli": []}
    if not args.no_cli and has_tok:
        targets = [("sinq", sinq, "sinq")]
        if args.cli_all:
            targets = [("bf16", bf16, None)] + targets + [("awq", awq, "awq")]
        for label, d, q in targets:
            C.log(f"[{name}] vllm bench throughput on {label} ...")
            c = run_cli(d, q, work, f"{name}-{label}")
            C.log(f"    {c['line'] or 'FAILED, see ' + str(work / f'cli-{name}-{label}.txt')}")
            res["cli"].append(c)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker), args.result_file)
    t_start = time.perf_counter()
    machine = C.machine_info()
    work = C.artifacts_dir("bench", "throughput")
    models = []
    if not args.no_smollm2:
        bf16 = C.smollm2_bf16()
        vocab = json.loads((bf16 / "config.json").read_text())["vocab_size"]
        models.append(bench_model("smollm2-135m", bf16, True, vocab, args, work))
    if args.qwen3:
        bf16 = make_qwen3_bf16(C.artifacts_dir("bench") / f"qwen3-0.6b-shape-L{args.qwen3_layers}-bf16",
                               args.qwen3_layers)
        r = bench_model(f"qwen3-0.6b-shape-L{args.qwen3_layers}", bf16, False, QWEN3_06B["vocab"], args, work)
        r["note"] = ("Random weights of the Qwen3-0.6B shape (no tokenizer): throughput and memory only; "
                     "the vLLM CLI run needs a tokenizer and is skipped for it.")
        models.append(r)
    elapsed = time.perf_counter() - t_start
    png = C.RESULTS / f"{args.out}.png"
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    has_plot = plot(models, args, png)
    md = markdown(models, args, machine, elapsed)
    if has_plot:
        md += f"\n![decode tokens/s]({png.name})\n"
    return C.publish("throughput.py", args.out, md, elapsed)


if __name__ == "__main__":
    sys.exit(main())
