#!/usr/bin/env bash
# The first GPU session in one command (docs/design.md §6, benchmarks/README.md "GPU check").
#
#   scripts/gpu_check.sh OUT_DIR            # on a CUDA machine, no vLLM needed (~9 min on an H200)
#   scripts/gpu_check.sh --dry-run OUT_DIR  # anywhere: every step but the GPU calls
#                                           # (tests/test_gpu_check.py runs it in `make test`)
#
# Steps, each timed, each failure recorded (the script goes on, so one run gives every
# verdict), everything written under OUT_DIR:
#   1. versions      python, torch/CUDA, Triton, nvcc, the GPU                 -> versions.txt
#   2. build         `pip install -e .` of this checkout (editable: the install maps
#                    triton_kernels/ to sinq_vllm.triton_kernels), CUDA extension for the
#                    running GPU's architecture only, CPU extension skipped; the full
#                    compiler output is kept and a failure prints its tail       -> build.log
#   3. GPU tests     SINQ_VLLM_REQUIRE_CUDA=1 (a missing GPU or extension fails, showing the
#                    build log; nothing skips silently): the CUDA kernels, the compiled Triton
#                    kernels and the MoE kernel vs the float32 reference, CUDA graphs and
#                    torch.compile(dynamic=True) on Llama-8B shapes              -> tests.xml
#   4. benchmark     benchmarks/bench_kernels.py: µs, % of copy bandwidth, vs bf16 matmul
#                    and torch's int4 GEMM, CUDA graphs, L2 flushed; SINQ errors
#                    vs the reference fail the run                             -> kernels_*.md/json
# The whole console output goes to gpu_check.log. Exit status: 0 when every step passed.
#
# Environment: PYTHON (default python3), GPU_CHECK_WORKERS (pytest-xdist workers, default 4).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
WORKERS="${GPU_CHECK_WORKERS:-4}"
export SINQ_AUTO_PATCH=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the CPU kernel is not this check's business: no CPU extension build, no JIT of it
export SINQ_VLLM_SKIP_CPU_EXT=1 SINQ_VLLM_CPU_JIT=0
GPU_TESTS=(tests/test_cuda_kernels.py tests/test_triton_gpu.py tests/test_gpu_graphs.py)

exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check.sh $([ $DRY = 1 ] && echo '(dry run) ')$(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT -> $OUT"
T0=$(date +%s)
FAILED=()

step() {  # step NAME COMMAND...: run, time, record
  local name="$1" start rc
  shift
  echo
  echo "=== [$(($(date +%s) - T0))s] $name"
  start=$(date +%s)
  "$@"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "=== $name: ok ($(($(date +%s) - start))s)"
  else
    echo "=== $name: FAILED (exit $rc, $(($(date +%s) - start))s)"
    FAILED+=("$name")
  fi
}

versions() {
  {
    "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{getattr(p, 'L2_cache_size', 0) // 2**20} MiB L2, {p.total_memory // 2**30} GiB")
else:
    print("gpu: none visible to torch")
EOF
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv; fi
  } | tee "$OUT/versions.txt"
  [ $DRY = 1 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
}

build() {
  local arch
  arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")
  local cmd=(env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 "$PY" -m pip install --no-deps --no-build-isolation --no-cache-dir -v -e .)
  echo "+ ${cmd[*]}  > build.log"
  if [ $DRY = 1 ]; then  # the build's inputs, without installing anything
    TORCH_CUDA_ARCH_LIST="$arch" "$PY" -c "import build_ext_config as b; print('CUDA sources', b.cuda_sources()); print('flags', b.cuda_compile_args())" \
      | tee "$OUT/build.log"
    return "${PIPESTATUS[0]}"
  fi
  if ! "${cmd[@]}" > "$OUT/build.log" 2>&1; then
    echo "--- pip install failed; the end of build.log:"
    tail -n 80 "$OUT/build.log"
    return 1
  fi
  grep -E "ptxas|error|warning" "$OUT/build.log" | tail -n 20
  "$PY" - <<'EOF'
import importlib
for name in ("sinq_vllm._C_cuda", "sinq_vllm.triton_kernels.sinq_gemm", "sinq_vllm.triton_kernels.sinq_moe"):
    module = importlib.import_module(name)
    print("import ok:", name, getattr(module, "__file__", ""))
EOF
}

gpu_tests() {
  local args=(-q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml" "${GPU_TESTS[@]}")
  if [ $DRY = 1 ]; then  # collect only: the files import and select what the GPU run would run
    "$PY" -m pytest --collect-only -q -p no:cacheprovider "${GPU_TESTS[@]}" | tail -n 3
    return "${PIPESTATUS[0]}"
  fi
  if "$PY" -c "import xdist" 2>/dev/null; then args=(-n "$WORKERS" "${args[@]}"); fi
  SINQ_VLLM_REQUIRE_CUDA=1 timeout 270 "$PY" -m pytest "${args[@]}"
}

benchmark() {
  if [ $DRY = 1 ]; then
    "$PY" benchmarks/bench_kernels.py --dry-run --out "$OUT"
  else
    SINQ_VLLM_REQUIRE_CUDA=1 timeout 200 "$PY" benchmarks/bench_kernels.py --out "$OUT"
  fi
}

step "versions" versions
step "build" build
step "GPU tests" gpu_tests
step "kernel benchmark" benchmark

echo
echo "=== gpu_check.sh finished in $(($(date +%s) - T0))s"
ls -l "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed"
