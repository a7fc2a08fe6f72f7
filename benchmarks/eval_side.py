"""Perplexity of one checkpoint on saved token windows, loaded by whichever venv runs this.

Usage: PYTHONPATH=src python eval_side.py MODEL_DIR IDS.safetensors  -> prints the ppl

llm-compressor's outputs are evaluated in its own venv: its asymmetric (AWQ) checkpoints store
packed zero points, which transformers 5.23 with compressed-tensors 0.20 cannot load.
"""

import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelpress.eval.perplexity import evaluate

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
print(evaluate(model, load_file(sys.argv[2])["input_ids"]).ppl)
