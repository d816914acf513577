"""CPU benchmarks of the SINQ linear op and of end-to-end vLLM decode.

(a) default: the op alone (``torch.ops.sinq_vllm.cpu_linear``) at Qwen3-0.6B shapes vs
    ``torch.nn.functional.linear`` in bf16, for M in {1, 4, 16, 64}, with the machine's
    streaming bandwidth measured in the same run. Two regimes:
      * cold: every call uses a different copy of the layer (footprint >> L3), as in real
        decode, where a model's weights never fit in the caches;
      * hot:  the same layer over and over (its weights stay in L2/L3).
    Effective GB/s counts the bytes the kernel must read or write: resident packed codes,
    fp16 scales and zeros, fp32 column scales, activations in, outputs out (bf16 linear:
    the bf16 weight + activations). Printed as a table and written as markdown to
    benchmarks/results/cpu_kernel.md.

        python benchmarks/bench_cpu.py [--group 64] [--threads N] [--quick]

(b) ``--e2e``: vLLM decode tokens/s on one random Qwen3-0.6B-shaped model: bf16 vs SINQ
    int4 (``sinq_vllm.quantizer.quantize_model``) vs vLLM's AWQ int4 (random AWQ tensors
    in the AutoAWQ layout), batch 1 and 16, 64 new tokens. Appended to the same file
    (benchmarks/results/cpu_e2e.md).

        python benchmarks/bench_cpu.py --e2e [--layers 28] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Qwen3-0.6B: hidden 1024, 16 q heads / 8 kv heads of 128, intermediate 3072, 28 layers
QWEN3_06B = {
    "hidden": 1024,
    "intermediate": 3072,
    "heads": 16,
    "kv_heads": 8,
    "head_dim": 128,
    "layers": 28,
    "vocab": 151936,
}
SHAPES = [
    # name, K, shard sizes along N
    ("qkv_proj", 1024, (2048, 1024, 1024)),
    ("o_proj", 2048, (1024,)),
    ("gate_up_proj", 1024, (3072, 3072)),
    ("down_proj", 3072, (1024,)),
]


# --------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------
def _time(fn, min_time=0.2, sample_time=0.01) -> float:
    """Seconds per call: the best of many short samples (robust to other processes
    sharing the CPU, which stall OpenMP barriers); about `min_time` seconds in all."""
    for _ in range(3):
        fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= sample_time:
            break
        n *= 2
    best = t / n
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _cpu_busy(interval=0.2) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat); -1 if unknown."""
    def snap():
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(max_wait: float, threshold=0.15) -> float:
    """Wait (up to max_wait s) until other processes leave the CPUs idle; returns the busy
    fraction last seen. Benchmarks on a shared 2-core machine are meaningless otherwise:
    one descheduled OpenMP thread stalls a whole parallel region for a scheduler slice."""
    busy = _cpu_busy()
    t_end = time.perf_counter() + max_wait
    while busy > threshold and time.perf_counter() < t_end:
        time.sleep(0.5)
        busy = _cpu_busy()
    return busy


def streaming_bandwidth(nbytes=1 << 30) -> dict[str, float]:
    """GB/s of large (1 GiB >> L3) reads and a copy with torch's threads. "read" is the best
    of several read-only reductions (torch's fp32 sum alone is not bandwidth-bound here)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    h = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    reads = {
        "fp32 dot": nbytes / _time(lambda: torch.dot(a, a), min_time=1.0) / 1e9,
        "fp32 amax": nbytes / _time(lambda: a.amax(), min_time=1.0) / 1e9,
        "bf16 sum": nbytes / _time(lambda: h.sum(), min_time=1.0) / 1e9,
    }
    del h
    b = torch.empty_like(a)
    copy = 2 * nbytes / _time(lambda: b.copy_(a), min_time=1.0) / 1e9
    best = max(reads, key=reads.get)
    return {"read": reads[best], "read_kernel": best, "reads": reads, "copy": copy}


# --------------------------------------------------------------------------------------
# random SINQ layers
# --------------------------------------------------------------------------------------
def random_sinq_weights(n_sizes, k, nbits=4, group=64, seed=0):
    from sinq_vllm.kernels.contract import SinqWeights

    gen = torch.Generator().manual_seed(seed)
    n = sum(n_sizes)
    offs = [0]
    for s in n_sizes:
        offs.append(offs[-1] + s)
    codes = torch.randint(0, 2**nbits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, k // group, generator=gen) * (2**nbits - 1)).half()
    col = (torch.rand(len(n_sizes), k, generator=gen) + 0.5).half()
    return SinqWeights(codes, scales, zeros, col, tuple(offs), nbits, group)


def resident_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench_op(args) -> str:
    from sinq_vllm.kernels import cpu_backend as cb
    from sinq_vllm.kernels.contract import spec_of

    mod = cb.load_extension()
    if mod is None:
        sys.exit(f"CPU kernel unavailable: {cb.extension_error()}")
    if args.isa:
        mod.set_isa(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    l3 = _l3_bytes()
    cold_footprint = max(8 * l3, 256 << 20)
    wait_idle(args.wait_idle)
    bw = streaming_bandwidth()
    stream = bw["read"]
    print(f"streaming bandwidth: read {bw['read']:.1f} GB/s ({bw['read_kernel']}), copy {bw['copy']:.1f} GB/s (read+write); "
          f"threads {torch.get_num_threads()}, ISA {mod.isa()}")
    ms = [1, 4, 16, 64] if not args.quick else [1, 16]
    rows = []
    for name, k, n_sizes in SHAPES:
        n = sum(n_sizes)
        w = random_sinq_weights(n_sizes, k, args.bits, args.group)
        spec = spec_of(w)
        base = cb.repack(w)
        wbytes = resident_bytes(base)
        copies_q = max(2, cold_footprint // wbytes + 1)
        layers_q = [base] + [{kk: v.clone() for kk, v in base.items()} for _ in range(copies_q - 1)]
        wb = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        copies_b = max(2, cold_footprint // wb.nbytes + 1)
        layers_b = [wb] + [wb.clone() for _ in range(copies_b - 1)]
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            act_bytes = 2 * m * k + 2 * m * n
            res = {}
            busy = wait_idle(args.wait_idle)
            for regime in ("cold", "hot"):
                it_q = _cycler(layers_q if regime == "cold" else [base])
                it_b = _cycler(layers_b if regime == "cold" else [wb])
                t_q = _time(lambda: cb.cpu_linear(next(it_q), spec, x, None), min_time=args.min_time)
                t_b = _time(lambda: F.linear(x, next(it_b)), min_time=args.min_time)
                res[regime] = (t_q, t_b)
            t_q, t_b = res["cold"]
            th_q, th_b = res["hot"]
            row = {
                "shape": f"{name} {k}->{n}",
                "M": m,
                "bf16_us": t_b * 1e6,
                "sinq_us": t_q * 1e6,
                "speedup": t_b / t_q,
                "sinq_GBs": (wbytes + act_bytes) / t_q / 1e9,
                "bf16_GBs": (wb.nbytes + act_bytes) / t_b / 1e9,
                "hot_bf16_us": th_b * 1e6,
                "hot_sinq_us": th_q * 1e6,
                "hot_speedup": th_b / th_q,
                "hot_sinq_GBs": (wbytes + act_bytes) / th_q / 1e9,
                "tflops": 2 * m * n * k / t_q / 1e12,
                "busy": busy,
            }
            row["sinq_frac"] = row["sinq_GBs"] / stream
            row["bf16_frac"] = row["bf16_GBs"] / stream
            rows.append(row)
            print(
                f"{row['shape']:>24} M={m:<3} cold: bf16 {row['bf16_us']:8.1f} us  sinq {row['sinq_us']:8.1f} us "
                f"x{row['speedup']:5.2f}  sinq {row['sinq_GBs']:5.1f} GB/s ({100 * row['sinq_frac']:3.0f}% stream) "
                f"| hot: bf16 {row['hot_bf16_us']:7.1f} sinq {row['hot_sinq_us']:7.1f} x{row['hot_speedup']:5.2f}"
                f" | other load {100 * busy:.0f}%",
                flush=True,
            )
        del layers_q, layers_b
    # whole decode step of the 28 linear layers of a block stack (sum over shapes), cold
    totals = {}
    for m in ms:
        sel = [r for r in rows if r["M"] == m]
        totals[m] = (sum(r["bf16_us"] for r in sel), sum(r["sinq_us"] for r in sel))
    md = _markdown(rows, bw, stream, mod.isa(), args, totals, l3)
    print()
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cpu_kernel.md"
    out.write_text(md)
    print(f"written to {out}")
    return md


def _cycler(items):
    i = 0
    while True:
        yield items[i]
        i = (i + 1) % len(items)


def _l3_bytes() -> int:
    try:
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        best = 0
        for idx in base.glob("index*"):
            if (idx / "level").read_text().strip() == "3":
                txt = (idx / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
                best = max(best, int(txt.rstrip("KM")) * mult)
        return best or (32 << 20)
    except OSError:
        return 32 << 20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _markdown(rows, bw, stream, isa, args, totals, l3) -> str:
    lines = [
        "# SINQ CPU kernel vs bf16 linear (Qwen3-0.6B shapes)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, L3 {l3 >> 20} MiB",
        f"- torch {torch.__version__}; kernel ISA `{isa}`; SINQ {args.bits}-bit, group {args.group}, bf16 activations",
        f"- streaming bandwidth (1 GiB buffers, same run): read {bw['read']:.1f} GB/s (best of "
        + ", ".join(f"{k} {v:.1f}" for k, v in bw["reads"].items())
        + f"), copy {bw['copy']:.1f} GB/s (read+write bytes). Fractions below are of the best read bandwidth.",
        "- cold: each call uses another copy of the layer (footprint >= 8x L3, as in decode of a real model);"
        " hot: the same layer each call (weights cached). Effective GB/s = (resident packed codes + fp16"
        " scales/zeros + fp32 column scales + activations in/out) / time; bf16: bf16 weight + activations.",
        "",
        "## Cold (weights streamed from DRAM)",
        "",
        "| layer (K->N) | M | bf16 us | SINQ us | speedup | SINQ GB/s | SINQ % stream | bf16 GB/s | bf16 % stream | SINQ TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['sinq_us']:.1f} | {r['speedup']:.2f}x | "
            f"{r['sinq_GBs']:.1f} | {100 * r['sinq_frac']:.0f}% | {r['bf16_GBs']:.1f} | {100 * r['bf16_frac']:.0f}% | "
            f"{r['tflops']:.2f} |"
        )
    lines += [
        "",
        "Sum over the four linear layers of one decoder block (cold):",
        "",
        "| M | bf16 us | SINQ us | speedup |",
        "|---:|---:|---:|---:|",
    ]
    for m, (tb, tq) in totals.items():
        lines.append(f"| {m} | {tb:.1f} | {tq:.1f} | {tb / tq:.2f}x |")
    lines += [
        "",
        "## Hot (same layer every call, weights in L2/L3)",
        "",
        "| layer (K->N) | M | bf16 us | SINQ us | speedup | SINQ GB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['hot_bf16_us']:.1f} | {r['hot_sinq_us']:.1f} | {r['hot_speedup']:.2f}x | "
            f"{r['hot_sinq_GBs']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# (b) end-to-end vLLM decode
# --------------------------------------------------------------------------------------
def _qwen3_config(layers: int):
    from transformers import Qwen3Config

    c = QWEN3_06B
    return Qwen3Config(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    )


def make_bf16_model(path: Path, layers: int) -> None:
    from transformers import Qwen3ForCausalLM

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(_qwen3_config(layers)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)


def make_sinq_model(bf16_path: Path, path: Path, group: int, lm_head: bool = False) -> None:
    if (path / "config.json").exists():
        return
    from sinq_vllm.quantizer import quantize_model

    quantize_model(str(bf16_path), str(path), nbits=4, group_size=group, overwrite=True, progress=False,
                   lm_head=lm_head)


def make_awq_model(bf16_path: Path, path: Path, group: int = 128) -> None:
    """Random AWQ int4 tensors in the AutoAWQ GEMM layout (throughput only, not accuracy)."""
    if (path / "config.json").exists():
        return
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for f in sorted(bf16_path.glob("*.safetensors")):
        for key, t in load_file(str(f)).items():
            proj = key.endswith("_proj.weight") and ".layers." in key
            if not proj:
                out[key] = t
                continue
            n, k = t.shape
            p = key[: -len(".weight")]
            out[p + ".qweight"] = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), generator=gen, dtype=torch.int32)
            out[p + ".qzeros"] = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), generator=gen, dtype=torch.int32)
            out[p + ".scales"] = (torch.rand(k // group, n, generator=gen) * 0.002).half()
    save_file(out, str(path / "model.safetensors"))
    cfg = json.loads((bf16_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm"}
    cfg["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json",):
        if (bf16_path / extra).exists():
            (path / extra).write_text((bf16_path / extra).read_text())


def _run_vllm(model: str, dtype: str, batch_sizes, new_tokens: int, quantization: str | None,
              wait_idle: float = 0.0, repeats: int = 3) -> dict[int, float]:
    """Decode tokens/s per batch size; runs in a subprocess so every engine starts clean."""
    import subprocess

    code = f"""
import json, time, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_cpu import wait_idle
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={model!r}, dtype={dtype!r}, quantization={quantization!r}, skip_tokenizer_init=True,
          max_model_len=512, enforce_eager=False, seed=0)
res = {{}}
for bs in {list(batch_sizes)!r}:
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 10 for j in range(16)]) for i in range(bs)]
    sp_pre = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    sp = SamplingParams(max_tokens={new_tokens}, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up
    t_pre, t_all, n = [], [], 0
    for _ in range({repeats!r}):  # best of several runs: the CPUs may be shared
        wait_idle({wait_idle!r})
        t0 = time.perf_counter(); llm.generate(prompts, sp_pre, use_tqdm=False); t_pre.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); out = llm.generate(prompts, sp, use_tqdm=False); t_all.append(time.perf_counter() - t0)
        n = sum(len(o.outputs[0].token_ids) for o in out)
    # decode tokens/s: tokens after the first over (fastest full run - fastest prefill-only run)
    res[bs] = (n - bs) / max(min(t_all) - min(t_pre), 1e-3)
print("RESULT" + json.dumps(res))
"""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return {int(k): v for k, v in json.loads(line[6:]).items()}
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"vLLM run failed for {model} ({quantization}):\n{tail}")


def bench_e2e(args) -> str:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / f"qwen3-0.6b-shape-L{args.layers}-bf16"
    sinq = work / f"qwen3-0.6b-shape-L{args.layers}-sinq4-g{args.group}"
    sinq_head = work / f"qwen3-0.6b-shape-L{args.layers}-sinq4-g{args.group}-head"
    awq = work / f"qwen3-0.6b-shape-L{args.layers}-awq4-g128"
    make_bf16_model(bf16, args.layers)
    batches = (1, 16)
    results: dict[str, dict[int, float] | str] = {}
    results["bf16"] = _run_vllm(str(bf16), "bfloat16", batches, args.new_tokens, None, args.wait_idle, args.repeats)
    for label, maker, path, dtype, quant in (
        ("SINQ int4", lambda: make_sinq_model(bf16, sinq, args.group), sinq, "bfloat16", None),
        ("SINQ int4 + int4 lm_head", lambda: make_sinq_model(bf16, sinq_head, args.group, lm_head=True), sinq_head,
         "bfloat16", None),
        ("AWQ int4", lambda: make_awq_model(bf16, awq), awq, "bfloat16", "awq"),
    ):
        try:
            maker()
            results[label] = _run_vllm(str(path), dtype, batches, args.new_tokens, quant, args.wait_idle, args.repeats)
        except Exception as e:  # noqa: BLE001 - report and continue with the other engines
            results[label] = f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            print(f"{label}: {e}", file=sys.stderr)
    lines = [
        "# End-to-end vLLM CPU decode, random Qwen3-0.6B-shaped model",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; CPU: {_cpu_name()}, "
        f"{os.cpu_count()} logical CPUs; {args.layers} layers; {args.new_tokens} new tokens, 16-token prompts",
        "- decode tokens/s = generated tokens after the first / (fastest generate time - fastest prefill-only"
        f" time) over {args.repeats} runs, each started once the CPUs were idle (up to {args.wait_idle:.0f} s wait)",
        "- SINQ: 4-bit g" + str(args.group) + " checkpoint from sinq_vllm.quantizer (lm_head / embeddings stay bf16);"
        " 'SINQ int4 + int4 lm_head': the same with `--quantize-lm-head` (the tied 151936 x 1024 head, 311 MB in"
        " bf16, read once per decoded token, served packed; embeddings stay bf16);"
        " AWQ: random int4 g128 tensors in the AutoAWQ GEMM layout, vLLM's own CPU AWQ path (lm_head bf16)",
        "- vLLM's CPU backend binds its worker to one core of this 2-core machine (the other is reserved for the"
        " engine), so every engine decodes on one thread",
        "",
        "| engine | batch 1 tok/s | vs bf16 | batch 16 tok/s | vs bf16 |",
        "|---|---:|---:|---:|---:|",
    ]
    ref = results["bf16"]
    for label, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {label} | {r} | | | |")
            continue
        lines.append(
            f"| {label} | {r[1]:.1f} | {r[1] / ref[1]:.2f}x | {r[16]:.1f} | {r[16] / ref[16]:.2f}x |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_e2e.md").write_text(md)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", action="store_true", help="end-to-end vLLM decode instead of the op benchmark")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--isa", default="", help="force the kernel ISA (avx512bf16, avx2, scalar)")
    ap.add_argument("--quick", action="store_true", help="M in {1, 16} only")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="seconds to wait for other processes to leave the CPUs idle before each measurement")
    ap.add_argument("--repeats", type=int, default=3, help="e2e: timed generate runs per batch size (best kept)")
    ap.add_argument("--layers", type=int, default=QWEN3_06B["layers"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workdir", default=str(ROOT / "artifacts" / "bench_cpu"))
    args = ap.parse_args(argv)
    if args.e2e:
        bench_e2e(args)
    else:
        bench_op(args)


if __name__ == "__main__":
    main()
