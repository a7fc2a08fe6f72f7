"""The llm-compressor half of the pruning benchmark; runs in its own venv (.venv-bench).

Usage: python llmcompressor_prune_side.py MODEL_DIR OUT_DIR {magnitude,wanda,sparsegpt} PATTERN IDS.safetensors

PATTERN is a fraction (0.5) or N:M (2:4). Wanda and SparseGPT: llm-compressor 0.14's
WandaPruningModifier / SparseGPTModifier at their defaults (targets: every Linear but lm_head;
SparseGPT block 128, dampening 0.01) with ``sparsity`` and ``mask_structure`` ("0:0" for
unstructured, else "N:M", with sparsity N/M). Magnitude: its MagnitudePruningModifier, a
training-time schedule, held at the target sparsity from the first step (init = final, start 0).
The model is saved dense (compressed-tensors no longer has sparse formats).
"""

import sys

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import MagnitudePruningModifier, SparseGPTModifier, WandaPruningModifier


def main(model_dir, out_dir, method, pattern, ids_file):
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        sparsity, structure = n / m, pattern
    else:
        sparsity, structure = float(pattern), "0:0"
    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if method == "magnitude":
        recipe = MagnitudePruningModifier(targets=r"re:.*layers\.\d+\..*proj\.weight$", init_sparsity=sparsity,
                                          final_sparsity=sparsity, start=0, end=1, update=1,
                                          mask_structure="unstructured" if structure == "0:0" else structure)
    else:
        modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
        recipe = modifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
