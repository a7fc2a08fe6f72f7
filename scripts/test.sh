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
# One test process per core (pytest-xdist), at most one per 8 GiB of memory (the real-model tests
# peak near 7 GB): most unit tests are single-threaded Python, so two workers take them in about
# half the time. Whole files go to one worker, so a module's fixtures are built once; each worker
# takes its share of the torch threads (tests/conftest.py). MODELPRESS_TEST_WORKERS=1: one process.
WORKERS=${MODELPRESS_TEST_WORKERS:-$(.venv/bin/python -c "import os
cores = len(os.sched_getaffinity(0))
memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
print(max(1, min(cores, int(memory // 8))))")}
if [ "$WORKERS" -gt 1 ]; then
    exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
