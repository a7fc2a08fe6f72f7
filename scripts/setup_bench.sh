#!/usr/bin/env bash
# A separate venv for the tools modelpress is compared with (their pins differ from ours):
# llm-compressor and TRL on the CPU build of torch. Used by benchmarks/, never by the package or tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-bench/bin/python ] || "$PY" -m venv .venv-bench
.venv-bench/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv-bench/bin/pip install -q "llmcompressor==0.14.0.1" "trl==1.16.0" datasets 2>&1 | grep -v "is ignored" || true
.venv-bench/bin/python -c "import llmcompressor, torch; print('llm-compressor', llmcompressor.__version__, 'torch', torch.__version__)"
