"""What vLLM's default compiled engine costs at start and gives at decode, SINQ vs bf16.

``vllm serve`` compiles the model with torch.compile (vLLM-CPU: Inductor) unless
``--enforce-eager``; the compiled artifacts are cached (``VLLM_CACHE_ROOT``, Inductor's
cache). For SmolLM2-135M-Instruct in bf16 and as SINQ 4-bit g64 quantAux, each engine is
started in its own process and timed from ``LLM(...)`` to ready, then batch-1 decode is timed
(64 tokens, EOS ignored, best of 2 after a warm-up):

* eager (``enforce_eager=True``);
* compiled, cold caches (fresh ``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR``: a first
  start on a new machine, as in CI);
* compiled, warm caches (the same folders again: a later start).

Ratios are measured side by side in one run. Results: ``benchmarks/results/compile_cost.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C

_CHILD = r'''
import json, sys, time
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    llm = LLM(model=args["model"], dtype="bfloat16", max_model_len=1024, seed=0, enforce_eager=args["eager"])
    start = time.perf_counter() - t0
    prompt = [{"prompt_token_ids": list(range(10, 42))}]
    many = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate(prompt, many, use_tqdm=False)
    best_many, best_one = 1e9, 1e9
    for _ in range(2):
        t = time.perf_counter(); llm.generate(prompt, one, use_tqdm=False); best_one = min(best_one, time.perf_counter() - t)
        t = time.perf_counter(); llm.generate(prompt, many, use_tqdm=False); best_many = min(best_many, time.perf_counter() - t)
    print("RESULT " + json.dumps({"start_s": start, "decode_tok_s": 63 / max(best_many - best_one, 1e-9)}), flush=True)
    llm.llm_engine.engine_core.shutdown()
'''


def run_engine(model: Path, eager: bool, caches: Path) -> dict:
    script = caches.parent / "compile_cost_child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(caches / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor")}
    proc = subprocess.run([sys.executable, str(script), json.dumps({"model": str(model), "eager": eager})],
                          env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"engine failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main() -> int:
    C.setup_env()
    t_start = time.perf_counter()
    machine = C.machine_info()
    bf16 = C.smollm2_bf16()
    sinq, _ = C.quantized_checkpoint(bf16, C.QuantSpec("sinq", 4, 64, True))
    rows = []
    with tempfile.TemporaryDirectory(prefix="sinq-compile-cost-") as tmp:
        for label, model in (("SINQ 4-bit g64", sinq), ("bf16", bf16)):
            caches = Path(tmp) / label.split()[0]
            caches.mkdir()
            runs = {}
            for mode, eager in (("eager", True), ("compiled, cold caches", False), ("compiled, warm caches", False)):
                C.log(f"{label}: {mode} ...")
                runs[mode] = run_engine(model, eager, caches)
                C.log(f"  start {runs[mode]['start_s']:.1f} s, decode {runs[mode]['decode_tok_s']:.1f} tok/s")
            base = runs["eager"]
            for mode, r in runs.items():
                rows.append([label, mode, C.fmt(r["start_s"], 1), f"+{r['start_s'] - base['start_s']:.1f}",
                             C.fmt(r["decode_tok_s"], 1), C.fmt(r["decode_tok_s"] / base["decode_tok_s"], 2)])
    md = "\n".join([
        "# Compile cost: vLLM's default (compiled) engine vs --enforce-eager, SmolLM2-135M-Instruct",
        "",
        "Engine start = `LLM(...)` until ready (weights, profiling, compilation, KV cache), each engine in its own "
        "process; decode = batch 1, 64 tokens, best of 2. Cold caches: fresh `VLLM_CACHE_ROOT` and "
        "`TORCHINDUCTOR_CACHE_DIR` (a first start); warm: the same folders again. "
        f"`python benchmarks/compile_cost.py`. Machine: {machine}.",
        "",
        C.md_table(["model", "engine", "start s", "vs eager s", "decode tok/s", "decode vs eager"], rows),
    ])
    return C.publish("compile_cost.py", "compile_cost", md, time.perf_counter() - t_start)


if __name__ == "__main__":
    os.environ.setdefault("SINQ_AUTO_PATCH", "0")
    sys.exit(main())
