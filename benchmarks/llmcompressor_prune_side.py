"""The llm-compressor half of the pruning benchmark; runs in its own venv (.venv-bench).

Usage: python llmcompressor_prune_side.py MODEL_DIR OUT_DIR {magnitude,wanda,sparsegpt} PATTERN IDS.safetensors

PATTERN is a fraction (0.5) or N:M (2:4). Wanda and SparseGPT: llm-compressor 0.14's
WandaPruningModifier / SparseGPTModifier at their defaults (targets: every Linear but lm_head;
SparseGPT block 128, dampening 0.01) with ``sparsity`` and ``mask_structure`` ("0:0" for
unstructured, else "N:M", with sparsity N/M).

Magnitude: llm-compressor 0.14's MagnitudePruningModifier is a training-time schedule; it
computes masks at ``on_start`` but multiplies them into the weights only at optimizer steps, so
under ``oneshot`` (no optimizer) it leaves the model dense (measured: 0.0% sparsity), and its
mask factory has no N:M structure (``Invalid mask_structure: 2:4``). The magnitude row therefore
applies that modifier's own mask creator (``PruningMaskFactory``, "unstructured": one threshold
per tensor on |W|) to each target weight directly, which is what the modifier would do at its
first optimizer step. No N:M magnitude row exists for llm-compressor.

The model is saved dense (compressed-tensors no longer has sparse formats).
"""

import sys

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.pruning.utils.pytorch import PruningMaskCreatorArgs, PruningMaskFactory


def magnitude_masks(model, sparsity: float) -> None:
    """MagnitudePruningModifier's mask creator applied to every decoder Linear (lm_head kept)."""
    creator = PruningMaskFactory.create_mask_creator("unstructured")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                w.mul_(creator(PruningMaskCreatorArgs(parameter=w, sparsity=sparsity, scores=w.abs())))


def main(model_dir, out_dir, method, pattern, ids_file):
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        sparsity, structure = n / m, pattern
    else:
        sparsity, structure = float(pattern), "0:0"
    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "magnitude":
        if structure != "0:0":
            raise SystemExit(f"llm-compressor's magnitude pruning has no {structure} mask")
        magnitude_masks(model, sparsity)
    else:
        modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
        recipe = modifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
