"""Perplexity of one checkpoint on saved token windows, loaded by whichever venv runs this.

Usage: PYTHONPATH=src python eval_side.py MODEL_DIR IDS.safetensors [BASELINE_DIR]
    -> prints the ppl (and, with a baseline, the mean KL(baseline || model) per token)

llm-compressor's outputs are evaluated in its own venv: its asymmetric (AWQ) checkpoints store
packed zero points, which transformers 5.23 with compressed-tensors 0.20 cannot load.
"""

import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelpress.eval.perplexity import evaluate

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
baseline = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32).eval() if len(sys.argv) > 3 else None
result = evaluate(model, load_file(sys.argv[2])["input_ids"], baseline=baseline)
print(result.ppl, *([result.kl] if baseline is not None else []))
