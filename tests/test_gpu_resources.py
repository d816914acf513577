"""Offline resource check of every GPU kernel variant the backends can launch; no GPU needed.

* The CUDA kernels (csrc/cuda/*.cu) compiled by scripts/compile_cuda.sh with nvcc for sm_80
  and sm_90a (warnings and register spills are errors there), and every Triton kernel variant
  that the fixed default configs can select (``sinq_gemm.selectable_variants``,
  ``sinq_moe.selectable_variants``) compiled for sm_80 and sm_90 with Triton's bundled ptxas
  (``triton.compile`` with a ``GPUTarget``).
* Each compiled kernel's registers, stack, local memory and shared memory are read with
  cuobjdump (``--dump-resource-usage``; Triton's dynamic shared memory from its metadata),
  and every variant must have no spills (no stack or local memory), shared memory within a
  CTA's limit (227 KB on sm_90, 163 KB on sm_80), and registers and shared memory that let
  at least 2 CTAs reside on an SM (docs/design.md §4.2). The table is printed in the test
  log (one row per kernel and configuration, the worst over its dtype/bits/codebook/split
  variants).
* The decode kernel's host-side split-K planner, built with nvcc into a small program and run
  on CPU, against the rules of docs/design.md §4.2.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per CTA
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _cuobjdump() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

        ptxas = get_ptxas(90)
        path = Path(getattr(ptxas, "path", ptxas)).parent / "cuobjdump"
        return str(path) if path.exists() else shutil.which("cuobjdump")
    except Exception:  # noqa: BLE001
        return shutil.which("cuobjdump")


CUOBJDUMP = _cuobjdump()
pytestmark = pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (Triton's NVIDIA backend is missing)")


def resource_usage(binary: str) -> list[dict]:
    """[{arch, function, REG, STACK, SHARED, LOCAL}] of every kernel in a cubin or object file."""
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", binary], capture_output=True, text=True,
                         check=True).stdout
    rows, arch, function = [], None, None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif "REG:" in line and function:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(arch=arch, function=function, **{k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}))
            function = None
    return rows


def ctas_per_sm(regs: int, threads: int, smem: int, arch: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256),
    shared memory (1 KB reserved per CTA) and threads (2048 per SM, 32 CTAs at most)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM[arch] // (smem + 1024) if smem else 32
    return min(by_regs, by_smem, 2048 // threads, 32)


# ---- Triton ---------------------------------------------------------------------------------
def _triton_variants() -> list[dict]:
    from sinq_vllm.triton_kernels import sinq_gemm, sinq_moe

    out = []
    for v in sinq_gemm.selectable_variants():
        cfg = v["config"]
        out.append(dict(module="sinq_gemm", kernel=v["kernel"], dtype=v["dtype"], bits=v["bits"],
                        codebook=v["codebook"], split=v["split"], group=v["group"],
                        config=(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)))
    for v in sinq_moe.selectable_variants():
        out.append(dict(module="sinq_moe", kernel="moe", dtype=v["dtype"], bits=v["nbits"], codebook=v["codebook"],
                        split=False, group=v["group"],
                        config=(v["block_m"], v["block_n"], v["block_k"], sinq_moe.NUM_WARPS, sinq_moe.NUM_STAGES)))
    return out


def _compile_one(job: tuple[dict, int]) -> dict:
    variant, arch = job
    from sinq_vllm.triton_kernels import sinq_gemm, sinq_moe

    bm, bn, bk, warps, stages = variant["config"]
    if variant["module"] == "sinq_gemm":
        kernel = sinq_gemm.compile_for_target(variant["kernel"], variant["dtype"], variant["bits"], variant["group"],
                                              sinq_gemm.Config(bm, bn, bk, warps, stages), split=variant["split"],
                                              codebook=variant["codebook"], arch=arch)
    else:
        kernel = sinq_moe.compile_for_target(variant["dtype"], variant["bits"], variant["group"], variant["codebook"],
                                             bm, bn, bk, arch=arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        (usage,) = resource_usage(f.name)
    ptx = kernel.asm["ptx"]
    return dict(variant, arch=arch, threads=32 * warps, regs=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
                smem=usage["SHARED"] + int(kernel.metadata.shared), mma="mma" in ptx or "wgmma" in ptx)


def _compile_all(jobs: list) -> list[dict]:
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        return [_compile_one(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=4))


# ---- CUDA -----------------------------------------------------------------------------------
def _demangle(function: str) -> tuple[str, str]:
    """(kernel, template arguments) of sinq_cuda::<anon>::sinq_<name>_kernel<...>."""
    m = re.search(r"sinq_(gemv|dequant)_kernelI(.*)EEvN", function)
    name, args = m.group(1), m.group(2)
    dtype = "bf16" if "nv_bfloat16" in args else "fp16"
    values = [int(v) for v in re.findall(r"L[ib](\d+)E", args + "E")]
    labels = ("bits", "token tiles", "table") if name == "gemv" else ("bits", "table")
    return f"cuda {name}", ", ".join([dtype] + [f"{k} {v}" for k, v in zip(labels, values)])


def _cuda_rows(build_dir: Path) -> list[dict]:
    rows = []
    for obj in sorted(build_dir.glob("*.o")):
        for r in resource_usage(str(obj)):
            kernel, args = _demangle(r["function"])
            rows.append(dict(kernel=kernel, variant=args, arch=int(str(r["arch"])[:2]), threads=128, regs=r["REG"],
                             stack=r["STACK"], local=r["LOCAL"], smem=r["SHARED"]))
    return rows


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    build = tmp_path_factory.mktemp("cuda_build")
    args = ["bash", str(ROOT / "scripts" / "compile_cuda.sh")]
    if os.environ.get("SINQ_TEST_CUDA_BINDING") == "1":
        args.append("--binding")  # also syntax-check binding.cpp against the torch headers (~1 min)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, SINQ_CUDA_BUILD_DIR=str(build)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    objects = sorted(p.name for p in build.glob("*.o"))
    assert objects == sorted(p.stem + ".o" for p in (ROOT / "csrc" / "cuda").glob("*.cu")), objects
    return build


# ---- the check ------------------------------------------------------------------------------
def _problems(row: dict) -> list[str]:
    out = []
    if row["stack"] or row["local"]:
        out.append(f"spills/local memory (stack {row['stack']} B, local {row['local']} B)")
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if ctas_per_sm(row["regs"], row["threads"], row["smem"], row["arch"]) < 2:
        out.append(f"{row['regs']} registers x {row['threads']} threads, {row['smem']} B shared: < 2 CTAs per SM")
    return out


def _table(rows: list[dict]) -> str:
    """One line per (kernel, variant label): the worst registers/smem over sm_80 and sm_90."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["variant"]), []).append(r)
    lines = [f"{'kernel':<22} {'variant':<44} {'n':>3} {'threads':>7} {'regs 80/90':>11} {'smem KB 80/90':>14} "
             f"{'CTAs/SM 80/90':>14} {'spills':>6}"]
    for (kernel, variant), rs in groups.items():
        def worst(arch, key):
            return max((r[key] for r in rs if r["arch"] == arch), default=0)

        def occ(arch):
            return min((ctas_per_sm(r["regs"], r["threads"], r["smem"], r["arch"]) for r in rs if r["arch"] == arch),
                       default=0)

        n = len(rs) // len(ARCHS)
        lines.append(f"{kernel:<22} {variant:<44} {n:>3} {rs[0]['threads']:>7} "
                     f"{worst(80, 'regs'):>5}/{worst(90, 'regs'):<5} "
                     f"{worst(80, 'smem') / 1024:>6.1f}/{worst(90, 'smem') / 1024:<7.1f} "
                     f"{occ(80):>6}/{occ(90):<7} {max(r['stack'] + r['local'] for r in rs):>6}")
    return "\n".join(lines)


def test_every_gpu_kernel_variant_fits(cuda_build, capsys):
    triton_rows = _compile_all([(v, arch) for v in _triton_variants() for arch in ARCHS])
    for r in triton_rows:
        bm, bn, bk, warps, stages = r["config"]
        r["kernel"] = f"triton {r['kernel']}"
        r["variant"] = f"BM {bm} BN {bn} BK {bk} w{warps} s{stages}"
        if r["kernel"] in ("triton factored", "triton dequant", "triton moe") and r["dtype"] != torch.float32:
            assert r["mma"], f"{r['kernel']} {r['variant']}: no tensor-core instructions"
    cuda_rows = _cuda_rows(cuda_build)
    assert {r["arch"] for r in cuda_rows} == set(ARCHS) and len(cuda_rows) >= 2 * 18
    rows = cuda_rows + triton_rows
    with capsys.disabled():
        print(f"\n\nGPU kernel resources: {len(cuda_rows)} CUDA and {len(triton_rows)} Triton compilations "
              f"(n: variants per row: dtype x bits x codebook x split x arch / 2; worst shown)\n" + _table(rows) + "\n")
    problems = [f"{r['kernel']} {r['variant']} sm_{r['arch']} ({DTYPE_NAMES.get(r.get('dtype'), '')} "
                f"{r.get('bits', '')}-bit{' table' if r.get('codebook') else ''}{' split' if r.get('split') else ''}): "
                + "; ".join(p) for r in rows if (p := _problems(r))]
    assert not problems, "\n".join(problems)


def test_decode_planner(cuda_build, tmp_path):
    """The host-side split-K planner of sinq_gemv.cu, run on CPU: the planned grid gives every
    SM about the resident CTAs it can hold (>= 3 per SM on the 4096-wide Llama layers), splits
    are whole groups, and forced splits are honoured."""
    harness = tmp_path / "plan.cu"
    harness.write_text(r'''
#include <cstdio>
#include "sinq_cuda.h"
int main() {
  const int shapes[][4] = {{1, 4096, 4096, 64}, {16, 4096, 4096, 64}, {1, 4096, 14336, 64}, {9, 4096, 14336, 64},
                           {64, 6144, 4096, 64}, {1, 28672, 4096, 64}, {40, 28672, 4096, 128}, {1, 128, 256, 32}};
  for (auto& s : shapes) {
    sinq_cuda::GemvArgs a;
    a.m = s[0]; a.n_pad = s[1]; a.k = s[2]; a.group_size = s[3]; a.bits = 4;
    sinq_cuda::plan_split_k(a, 0, 132, 4);
    std::printf("%d %d %d %d %d %d %d\n", s[0], s[1], s[2], s[3], a.split_k, a.k_per_split, sinq_cuda::gemv_tiles(a));
  }
  sinq_cuda::GemvArgs f;
  f.m = 1; f.n_pad = 128; f.k = 512; f.group_size = 64; f.bits = 4;
  sinq_cuda::plan_split_k(f, 3, 132, 4);
  std::printf("forced %d %d\n", f.split_k, f.k_per_split);
  return 0;
}
''')
    exe = tmp_path / "plan"
    subprocess.run(["nvcc", "-O2", "-I", str(ROOT / "csrc" / "cuda"), str(harness), str(cuda_build / "sinq_gemv.o"),
                    "-o", str(exe)], check=True, capture_output=True, timeout=600)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for line in lines:
        if not line or line.startswith("forced"):
            continue
        m, n_pad, k, group, split, k_per_split, tiles = map(int, line.split())
        assert k_per_split % group == 0 and split * k_per_split >= k > (split - 1) * k_per_split, line
        if n_pad >= 4096:
            assert tiles * split >= 3 * 132, f"{line}: {tiles * split} CTAs for 132 SMs"
        assert 8 * m * n_pad * split <= n_pad * k * 4 // 8 * 2 or split == 1, f"{line}: partial sums too large"
    assert lines[-2] == "forced 3 192"  # 8 groups in 3 splits: 3 groups (192) each
