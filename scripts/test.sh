#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite: unit tests on tiny models of every
# supported architecture, and integration tests (marked slow) on the real small models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
