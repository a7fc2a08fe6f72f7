"""The llm-compressor half of the side-by-side benchmark; runs in its own venv (.venv-bench).

Usage: python llmcompressor_side.py MODEL_DIR OUT_DIR {gptq,awq,rtn} BITS GROUP IDS.safetensors

Uses llm-compressor's defaults for everything the benchmark does not set (GPTQ: act-order
"static", dampening 0.01, block 128; AWQ: its built-in mappings for the architecture; RTN: its
QuantizationModifier with min/max group scales, no calibration data).
"""

import sys

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier


if not torch.cuda.is_available():
    # llm-compressor's AWQ pins its activation cache, which torch refuses without an accelerator;
    # on a CPU-only machine pinning has no purpose, so it is made a no-op here.
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def main(model_dir, out_dir, method, bits, group, ids_file):
    bits, group = int(bits), int(group)
    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": method != "awq",
                                                 "strategy": "group", "group_size": group}}
    modifier = {"gptq": GPTQModifier, "awq": AWQModifier, "rtn": QuantizationModifier}[method]
    recipe = modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method == "rtn":  # weights only: nothing to calibrate
        oneshot(model=model, recipe=recipe)
    else:
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
