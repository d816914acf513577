#!/usr/bin/env bash
# Compile-only check of the SINQ CUDA kernels (no GPU needed): every csrc/cuda/*.cu is
# compiled with nvcc for sm_80 and sm_90a into a scratch folder. Any error fails the
# script, and so does any warning, register spills included (-Werror all-warnings with
# ptxas --warn-on-spills): a spill in these kernels is a performance bug. ptxas's resource
# report (-v) is kept in <build dir>/ptxas.log; tests/test_gpu_resources.py reads the
# objects with cuobjdump for its table.
#
#   scripts/compile_cuda.sh              # the .cu files
#   scripts/compile_cuda.sh --binding    # also syntax-check csrc/cuda/binding.cpp against
#                                        # the installed torch headers (slow, ~1 min). A CPU
#                                        # torch wheel lacks the generated
#                                        # c10/cuda/impl/cuda_cmake_macros.h, so an empty
#                                        # stand-in is made for it; nothing else is stubbed
#                                        # (the binding needs no cuBLAS/cuSPARSE/cuSOLVER).
#
# Environment: NVCC (default nvcc), SINQ_CUDA_ARCHS (default "80 90a"),
# SINQ_CUDA_BUILD_DIR (default a fresh temporary folder), PYTHON and CUDA_HOME (for --binding).
# No -std flag: nvcc's default (C++17) for the pure .cu files, torch's own for the binding.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCHS="${SINQ_CUDA_ARCHS:-80 90a}"
OUT="${SINQ_CUDA_BUILD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sinq_cuda_compile.XXXXXX")}"
mkdir -p "$OUT"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda.sh: $NVCC not found" >&2
  exit 2
fi

GENCODE=()
for a in $ARCHS; do
  GENCODE+=("-gencode" "arch=compute_${a},code=sm_${a}")
done
FLAGS=(-O3 --expt-relaxed-constexpr -Werror all-warnings -Xptxas --warn-on-spills -Xptxas -v -I "$ROOT/csrc/cuda")

"$NVCC" --version | tail -n 1
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no .cu files under csrc/cuda" >&2
  exit 2
fi
: > "$OUT/ptxas.log"
pids=()
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  ( start=$(date +%s)
    "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" -c "$src" -o "$OUT/$name.o" 2> "$OUT/$name.ptxas.log" \
      || { cat "$OUT/$name.ptxas.log" >&2; exit 1; }
    echo "ok  $(basename "$src")  [sm: $ARCHS]  $(( $(date +%s) - start ))s  -> $OUT/$name.o" ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat "$OUT"/*.ptxas.log >> "$OUT/ptxas.log"
[ "$status" -eq 0 ] || exit 1

if [ "${1:-}" = "--binding" ]; then
  PYTHON="${PYTHON:-python}"
  read -r TORCH_INC PY_INC CXX_STD < <("$PYTHON" - <<'EOF'
import inspect, os, re, sysconfig
import torch
from torch.utils import cpp_extension
std = max(re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension)), key=int)
print(os.path.join(os.path.dirname(torch.__file__), "include"), sysconfig.get_paths()["include"], std)
EOF
)
  STUB="$OUT/stub_include"
  mkdir -p "$STUB/c10/cuda/impl"
  # Only what a CPU torch wheel lacks; real headers win when present (stubs come last).
  echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  CUDA_HOME="${CUDA_HOME:-$( [ -d /usr/local/cuda ] && echo /usr/local/cuda || dirname "$(dirname "$(command -v "$NVCC")")" )}"
  CUDA_INC="$CUDA_HOME/include"
  start=$(date +%s)
  "${CXX:-g++}" -std=c++"$CXX_STD" -fsyntax-only -Wall -Werror -Wno-unused-function \
    -I "$ROOT/csrc/cuda" -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$CUDA_INC" -isystem "$PY_INC" \
    -idirafter "$STUB" -DTORCH_EXTENSION_NAME=_C_cuda "$ROOT/csrc/cuda/binding.cpp"
  echo "ok  binding.cpp (syntax, torch headers, C++$CXX_STD)  $(( $(date +%s) - start ))s"
fi
