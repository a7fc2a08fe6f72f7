#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite: unit tests on tiny models of every
# supported architecture, and integration tests (marked slow) on the real small models, in
# transformers, llama.cpp and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM's CPU build in its own venv (.venv-vllm) for tests/integration/test_vllm.py (marked slow);
# if it cannot be installed, those tests fail and say how to install it, the others still run.
bash scripts/setup_vllm.sh || echo "scripts/setup_vllm.sh failed: the vLLM tests will fail" >&2
exec .venv/bin/python -m pytest "$@"
