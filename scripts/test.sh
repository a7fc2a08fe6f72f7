#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite: unit tests on tiny models of every
# supported architecture, and integration tests (marked slow) on the real small models, in
# transformers, llama.cpp and vLLM, and a report opened in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM's CPU build in its own venv (.venv-vllm) for tests/integration/test_vllm.py (marked slow);
# if it cannot be installed, those tests fail and say how to install it, the others still run.
bash scripts/setup_vllm.sh || echo "scripts/setup_vllm.sh failed: the vLLM tests will fail" >&2
# Headless Chromium (Debian's, unpacked under .cache/chromium) for the test that opens a report.
bash scripts/setup_browser.sh || echo "scripts/setup_browser.sh failed: the browser test will fail" >&2
exec .venv/bin/python -m pytest "$@"
