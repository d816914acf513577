"""GPU benchmark of the SINQ linear op per layer shape and batch size M.

For Llama-3-8B and Qwen3-8B layer shapes (q/k/v merged, o, gate/up merged, down) and
M in {1, 2, 4, 8, 16, 32, 64, 128, 256, 1024}, in one run on one GPU:

* ``sinq-cuda``: ``torch.ops.sinq_vllm.cuda_linear`` (CUDA decode kernel for M <= 16,
  Triton GEMM above), 4-bit, bf16 activations, float zeros, per-shard column scales;
* ``sinq-triton``: ``torch.ops.sinq_vllm.triton_linear`` (Triton for every M), same weights;
* ``bf16``: ``torch.matmul`` with the dense bf16 weight (the baseline);
* ``marlin``: vLLM's Marlin with float zero points (``is_zp_float``, HQQ style), fp16
  activations only and no column scale, where vLLM's CUDA ops are installed. A comparison
  point only: it is never used for serving (it cannot do bf16, nor SINQ's column scale).

Reported per row: time per call, effective GB/s (bytes each kernel must move: resident
packed codes + scales/zeros + column scales + activations in + outputs out; bf16: the
bf16 weight + activations), % of the GPU's peak HBM bandwidth (table by device name;
"unknown" otherwise) and of the device-to-device copy bandwidth measured in the same run,
and speedups vs bf16 and vs Marlin.

Timing: every variant is captured in a CUDA graph of back-to-back calls (launch overhead
as in vLLM's decode), cycling through enough copies of the layer that the footprint is
>= 3x the L2 cache, so weights come from HBM as in real decode; median of several replays.

    python benchmarks/bench_kernels.py [--models llama3-8b qwen3-8b] [--ms 1 16 128]
        [--group 64] [--autotune] [--no-marlin] [--reps 50] [--out benchmarks/results]

Writes ``kernels_<gpu>.md`` and ``kernels_<gpu>.png`` to the output folder. Triton runs
its fixed default configs (as in serving) unless ``--autotune`` (slow: each config
compiles); the table says which.

Without a CUDA device the script exits with a message; ``--interpret-smoke`` instead runs
one tiny shape through the Triton kernels in Triton's interpreter on CPU and goes through
the same accounting and report code (numbers meaningless; it proves the plumbing).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_env()

import torch  # noqa: E402

MODELS = {
    # name: hidden, intermediate, q heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "qwen3-8b": (4096, 12288, 32, 8, 128),
}
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)

# Peak HBM bandwidth (GB/s, vendor specs) by device name; first match wins.
PEAK_GBPS = [
    (r"H200", 4800.0),
    (r"GH200", 4000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    (r"H800", 3350.0),
    (r"A100.*80GB.*PCIe", 1935.0),
    (r"A100-SXM4-80GB|A100 80GB", 2039.0),
    (r"A100", 1555.0),
    (r"L40S|L40\b", 864.0),
    (r"RTX 4090", 1008.0),
    (r"A10G|\bA10\b", 600.0),
    (r"\bL4\b", 300.0),
    (r"B200", 8000.0),
]


def peak_bandwidth(name: str) -> float | None:
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, name):
            return gbps
    return None


def layer_shapes(model: str) -> list[tuple[str, int, tuple[int, ...]]]:
    hidden, inter, heads, kv, hd = MODELS[model]
    return [
        ("qkv_proj", hidden, (heads * hd, kv * hd, kv * hd)),
        ("o_proj", heads * hd, (hidden,)),
        ("gate_up_proj", hidden, (inter, inter)),
        ("down_proj", inter, (hidden,)),
    ]


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------


def random_sinq_weights(k: int, shards: tuple[int, ...], nbits: int, group: int, device, seed: int = 0):
    from sinq_vllm.kernels.contract import SinqWeights

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = sum(shards)
    offs = [0]
    for s in shards:
        offs.append(offs[-1] + s)
    qmax = 2**nbits - 1
    codes = torch.randint(0, qmax + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.01 + 0.002).half()
    zeros = (torch.rand(n, k // group, generator=gen) * qmax).half()
    col = (torch.rand(len(shards), k, generator=gen) * 1.5 + 0.25).half()
    return SinqWeights(codes.to(device), scales.to(device), zeros.to(device), col.to(device), tuple(offs), nbits, group)


def dequant_no_t(w) -> torch.Tensor:
    """float32 ``(Q - z) * s`` [N, K] (no column scale)."""
    n, k = w.codes.shape
    g = w.group_size
    return ((w.codes.float().view(n, k // g, g) - w.zeros.float()[..., None]) * w.scales.float()[..., None]).view(n, k)


def reference(w, x, deq=None):
    """float32 oracle (DESIGN.md §1); ``deq`` caches :func:`dequant_no_t`."""
    deq = dequant_no_t(w) if deq is None else deq
    outs = []
    o = w.shard_offsets
    for s in range(len(o) - 1):
        outs.append((x.float() * w.col_scales[s].float()) @ deq[o[s] : o[s + 1]].T)
    return torch.cat(outs, dim=1)


def resident_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Marlin:
    """vLLM's Marlin float-zero-point GEMM (HQQ style: (q - z) * s, fp16 only), or why not."""

    def __init__(self):
        self.error = None
        try:
            from vllm import _custom_ops as ops  # noqa: PLC0415
            from vllm.model_executor.layers.quantization.utils import marlin_utils as mu  # noqa: PLC0415
            from vllm.scalar_type import scalar_types  # noqa: PLC0415

            if not hasattr(torch.ops._C, "marlin_gemm"):
                raise RuntimeError("this vLLM build has no torch.ops._C.marlin_gemm (CPU wheel?)")
            self.ops, self.mu, self.qtype = ops, mu, scalar_types.uint4
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"

    def prepare(self, w) -> dict:
        """codes/scales/zeros -> Marlin tensors (column scale t is NOT applied: timing only)."""
        n, k = w.codes.shape
        c = w.codes.t().contiguous().to(torch.int32).view(k // 8, 8, n)
        packed = torch.zeros(k // 8, n, dtype=torch.int32, device=w.codes.device)
        for i in range(8):
            packed |= c[:, i, :] << (4 * i)
        q = self.ops.gptq_marlin_repack(packed, k, n, 4)
        s = self.mu.marlin_permute_scales(w.scales.t().contiguous(), k, n, w.group_size)
        z = self.mu.marlin_permute_scales(w.zeros.t().contiguous(), k, n, w.group_size)
        ws = self.mu.marlin_make_workspace_new(w.codes.device, 4)
        return {"q": q, "s": s, "z": z, "ws": ws, "n": n, "k": k}

    def __call__(self, t: dict, x: torch.Tensor) -> torch.Tensor:
        return self.ops.marlin_gemm(x, None, t["q"], None, t["s"], None, None, t["z"], t["ws"], self.qtype,
                                    x.shape[0], t["n"], t["k"], False, True, True)

    @staticmethod
    def nbytes(t: dict) -> int:
        return sum(v.numel() * v.element_size() for key, v in t.items() if key in ("q", "s", "z"))


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(3 * l2_bytes() / max(1, nbytes)))


def time_graph(calls: list, reps: int, replays: int = 5) -> float:
    """Seconds per call: ``calls`` (one closure per weight copy) cycled ``reps`` times in a
    CUDA graph, median over ``replays`` replays."""
    for f in calls:  # warm-up (compilation, autotuning) outside the graph
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            calls[r % len(calls)]()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB (read + write bytes per second)."""
    n = 2**30 // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)], reps=10, replays=5)
    return 2 * a.numel() * 4 / t / 1e9


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    layer: str
    n: int
    k: int
    m: int
    variant: str
    seconds: float | None
    nbytes: int
    err: float | None = None
    note: str = ""

    @property
    def gbps(self) -> float | None:
        return None if not self.seconds else self.nbytes / self.seconds / 1e9


def run_shape(model, layer, k, shards, ms, args, marlin, device) -> list[Row]:
    from sinq_vllm.kernels import cuda_backend, triton_backend  # noqa: F401,PLC0415 (register the ops)
    from sinq_vllm.kernels.gpu_layout import repack  # noqa: PLC0415

    n = sum(shards)
    w = random_sinq_weights(k, shards, 4, args.group, device)
    layout = repack(w)
    res_bytes = resident_bytes(layout)
    sinq_copies = [layout] + [{kk: v.clone() for kk, v in layout.items()} for _ in range(copies_for(res_bytes) - 1)]
    deq = dequant_no_t(w)
    dense = w.dequantize().to(torch.bfloat16)
    dense_copies = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * 2) - 1)]
    mar = None
    if marlin is not None and marlin.error is None:
        try:
            mt = marlin.prepare(w)
            mar = [mt] + [{kk: (v.clone() if torch.is_tensor(v) else v) for kk, v in mt.items()}
                          for _ in range(copies_for(Marlin.nbytes(mt)) - 1)]
        except Exception as e:  # noqa: BLE001
            marlin.error = f"{type(e).__name__}: {e}"
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        xh = x.half()
        io = m * k * 2 + m * n * 2
        ref = reference(w, x, deq)

        def sinq_op(op, t, xx=x):
            return lambda: op(xx, t["qweight"], t["scales_zeros"], t["col_scales"], t["blk"], None, 4, args.group, n)

        for variant, op in (("sinq-cuda", torch.ops.sinq_vllm.cuda_linear),
                            ("sinq-triton", torch.ops.sinq_vllm.triton_linear)):
            if variant == "sinq-cuda" and cuda_backend.load_extension() is None:
                rows.append(Row(model, layer, n, k, m, variant, None, res_bytes + io,
                                note=f"unavailable: {cuda_backend.extension_error()}"))
                continue
            try:
                y = sinq_op(op, layout)()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                sec = time_graph([sinq_op(op, t) for t in sinq_copies], args.reps)
                rows.append(Row(model, layer, n, k, m, variant, sec, res_bytes + io, err))
            except Exception as e:  # noqa: BLE001
                rows.append(Row(model, layer, n, k, m, variant, None, res_bytes + io, note=f"{type(e).__name__}: {e}"))
        sec = time_graph([(lambda d=d: torch.matmul(x, d.t())) for d in dense_copies], args.reps)
        rows.append(Row(model, layer, n, k, m, "bf16", sec, n * k * 2 + io))
        if mar is not None:
            try:
                # Marlin has no column scale: compare with the reference of t = 1
                y = marlin(mar[0], xh)
                ref1 = xh.float() @ deq.T
                err = ((y.float() - ref1).abs().max() / ref1.abs().max()).item()
                sec = time_graph([(lambda t=t: marlin(t, xh)) for t in mar], args.reps)
                rows.append(Row(model, layer, n, k, m, "marlin", sec, Marlin.nbytes(mar[0]) + io, err,
                                note="fp16, no column scale"))
            except Exception as e:  # noqa: BLE001
                rows.append(Row(model, layer, n, k, m, "marlin", None, 0, note=f"{type(e).__name__}: {e}"))
        common.log(f"  {model} {layer} M={m}: " + ", ".join(
            f"{r.variant} {r.seconds * 1e6:.1f}us" if r.seconds else f"{r.variant} n/a" for r in rows[-4:] if r.m == m))
    del sinq_copies, dense_copies, mar, deq, dense
    torch.cuda.empty_cache()
    return rows




# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def report(rows: list[Row], device_name: str, peak: float | None, copy_gbps: float | None, args, out: Path,
           header_note: str = "") -> tuple[Path, Path | None]:
    by_key = {(r.model, r.layer, r.m, r.variant): r for r in rows}
    headers = ["model", "layer", "N x K", "M", "sinq-cuda us", "GB/s", "% peak", "% copy", "sinq-triton us",
               "GB/s", "bf16 us", "marlin us", "cuda vs bf16", "triton vs bf16", "cuda vs marlin", "max rel err"]
    table = []
    seen = []
    for r in rows:
        key = (r.model, r.layer, r.m)
        if key in seen:
            continue
        seen.append(key)
        c = by_key.get((*key, "sinq-cuda"))
        t = by_key.get((*key, "sinq-triton"))
        b = by_key.get((*key, "bf16"))
        mz = by_key.get((*key, "marlin"))

        def us(x):
            return common.fmt(x.seconds * 1e6, 1) if x is not None and x.seconds else "n/a"

        def ratio(a, bb):
            return common.fmt(bb.seconds / a.seconds, 2) if a and bb and a.seconds and bb.seconds else "n/a"

        def pct(x, ref):
            return common.fmt(100 * x.gbps / ref, 0) if x is not None and x.gbps and ref else "unknown" if not ref else "n/a"

        errs = [x.err for x in (c, t) if x is not None and x.err is not None]
        table.append([r.model, r.layer, f"{r.n} x {r.k}", r.m, us(c), common.fmt(c.gbps if c else None, 0),
                      pct(c, peak), pct(c, copy_gbps), us(t), common.fmt(t.gbps if t else None, 0), us(b), us(mz),
                      ratio(c, b), ratio(t, b), ratio(c, mz), common.fmt(max(errs), 4) if errs else "n/a"])
    notes = sorted({f"{r.variant}: {r.note}" for r in rows if r.note})
    lines = [
        f"# SINQ kernels on {device_name}",
        "",
        f"{common.machine_info()}",
        "",
        f"Peak HBM bandwidth: {f'{peak:.0f} GB/s (vendor spec)' if peak else 'unknown for this device'}; "
        f"device-to-device copy measured in this run: {common.fmt(copy_gbps, 0)} GB/s.",
        f"4-bit, group {args.group}, bf16 activations (Marlin: fp16). Triton configs: "
        f"{'autotuned (SINQ_VLLM_TRITON_AUTOTUNE=1)' if args.autotune else 'fixed defaults'}. "
        f"CUDA-graph timing, weights cycled through >= 3x L2 ({l2_bytes() // 2**20 if torch.cuda.is_available() else 0} MiB).",
        "GB/s counts resident packed codes + scales/zeros + column scales + x + y (bf16: weight + x + y). "
        "Speedups are time ratios (> 1: faster than the other). max rel err: max |y - ref| / max |ref| "
        "against a float32 reference.",
        header_note,
        "",
        common.md_table(headers, table),
        "",
    ]
    if notes:
        lines += ["Notes:", ""] + [f"* {n}" for n in notes] + [""]
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "device"
    md = out / f"kernels_{slug}.md"
    md.write_text("\n".join(lines))
    common.log(f"wrote {md}")
    png = plot(rows, device_name, peak, out / f"kernels_{slug}.png")
    return md, png


def plot(rows: list[Row], device_name: str, peak: float | None, path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    shapes = []
    for r in rows:
        if (r.model, r.layer) not in shapes:
            shapes.append((r.model, r.layer))
    cols = 4
    nrows = max(1, math.ceil(len(shapes) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (model, layer) in zip(axes.flat, shapes):
        for variant, style in (("sinq-cuda", "o-"), ("sinq-triton", "s--"), ("bf16", "k^-"), ("marlin", "d:")):
            pts = [(r.m, r.gbps) for r in rows if (r.model, r.layer, r.variant) == (model, layer, variant) and r.gbps]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant, markersize=4)
        if peak:
            ax.axhline(peak, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("effective GB/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"SINQ 4-bit linear: effective bandwidth on {device_name}" + (f" (peak {peak:.0f} GB/s)" if peak else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    common.log(f"wrote {path}")
    return path


# --------------------------------------------------------------------------------------
# interpreter smoke (no GPU)
# --------------------------------------------------------------------------------------


def interpret_smoke(args) -> int:
    """One tiny merged layer through the Triton kernels in the interpreter, through the same
    accounting and report code; numbers are wall-clock seconds of the interpreter."""
    from sinq_vllm.kernels.gpu_layout import repack  # noqa: PLC0415
    from sinq_vllm.triton_kernels import sinq_gemm  # noqa: PLC0415

    kernels = sinq_gemm.load_interpreted()
    shards, k, group = (48, 16, 16), 128, 32
    args.group = group
    w = random_sinq_weights(k, shards, 4, group, "cpu")
    layout = repack(w, align=32)
    n = sum(shards)
    rows = []
    for m in (1, 16):
        x = torch.randn(m, k).to(torch.bfloat16)
        ref = reference(w, x)
        io = m * k * 2 + m * n * 2
        t0 = time.perf_counter()
        y = kernels.sinq_linear(x, layout["qweight"], layout["scales_zeros"], layout["col_scales"], layout["blk"],
                                None, 4, group, n)
        sec = time.perf_counter() - t0
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        rows.append(Row("tiny", "qkv", n, k, m, "sinq-triton", sec, resident_bytes(layout) + io, err))
        t0 = time.perf_counter()
        torch.matmul(x, w.dequantize().to(torch.bfloat16).t())
        rows.append(Row("tiny", "qkv", n, k, m, "bf16", time.perf_counter() - t0, n * k * 2 + io))
        common.log(f"  interpreter: M={m} rel err {err:.2e}")
        if err > 1e-2:
            common.log("interpret smoke: kernel disagrees with the reference")
            return 1
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sinq_bench_smoke_"))
    report(rows, "triton-interpreter", None, None, args, out,
           header_note="**Interpreter smoke run: plumbing check only, the numbers mean nothing.**")
    return 0


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--layers", nargs="+", default=None, help="subset of qkv_proj o_proj gate_up_proj down_proj")
    ap.add_argument("--ms", nargs="+", type=int, default=list(DEFAULT_MS))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--autotune", action="store_true", help="let Triton autotune (slow: every config compiles)")
    ap.add_argument("--no-marlin", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="no GPU: one tiny shape through the Triton kernels in the interpreter")
    args = ap.parse_args(argv)

    if args.interpret_smoke:
        return interpret_smoke(args)
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device here; this benchmark needs an NVIDIA GPU "
              "(use --interpret-smoke to check the script's plumbing on CPU)", file=sys.stderr)
        return 2
    os.environ["SINQ_VLLM_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bandwidth(name)
    common.log(f"{name}: peak {peak or 'unknown'} GB/s, L2 {l2_bytes() // 2**20} MiB")
    copy_gbps = copy_bandwidth_gbps()
    common.log(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    marlin = None if args.no_marlin else Marlin()
    if marlin is not None and marlin.error:
        common.log(f"marlin unavailable: {marlin.error}")
    rows: list[Row] = []
    for model in args.models:
        for layer, k, shards in layer_shapes(model):
            if args.layers and layer not in args.layers:
                continue
            rows += run_shape(model, layer, k, shards, args.ms, args, marlin, device)
    note = f"Marlin: {marlin.error}" if marlin is not None and marlin.error else ""
    report(rows, name, peak, copy_gbps, args, Path(args.out) if args.out else common.RESULTS, header_note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
