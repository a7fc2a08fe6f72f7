"""TRL's GKDTrainer on the distill benchmark's windows, in the benchmark venv (TRL's own stack).

Usage: .venv-bench/bin/python benchmarks/trl_gkd_side.py STUDENT TEACHER WINDOWS.safetensors STEPS LR BATCH OUT

Each window is split in half: the first half is the prompt, the second the completion (GKD's loss
covers completions only; with probability lmbda a batch's completions are the student's own
samples of the same length). JSD(0.5), lmbda 0.5, temperature 1, cosine schedule with 5% warmup,
AdamW, no gradient checkpointing (so TRL samples with a KV cache): the settings of
``modelpress heal --mode on-policy``. Prints one JSON line: steps, tokens,
train_runtime_s. The trained student is saved to OUT.
"""

import json
import sys

import datasets
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

student, teacher, windows_file, steps, lr, batch, out = sys.argv[1:8]
steps, lr, batch = int(steps), float(lr), int(batch)
ids = load_file(windows_file)["input_ids"]
half = ids.shape[1] // 2


def collate(rows: list[dict]) -> dict:
    x = torch.tensor([r["input_ids"] for r in rows])
    labels = x.clone()
    labels[:, :half] = -100  # the prompt
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels,
            "prompts": x[:, :half], "prompt_attention_mask": torch.ones_like(x[:, :half])}


tokenizer = AutoTokenizer.from_pretrained(student)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
args = GKDConfig(output_dir=out + ".trainer", max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                 lr_scheduler_type="cosine", warmup_steps=steps // 20, weight_decay=0.0, lmbda=0.5, beta=0.5,
                 temperature=1.0, max_new_tokens=ids.shape[1] - half, logging_steps=1, save_strategy="no",
                 report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_drop_last=True,
                 max_length=ids.shape[1],
                 # TRL's SFTConfig turns gradient checkpointing on by default, and GKDTrainer then samples
                 # without a KV cache (~250 s a step here); modelpress trains without it and samples with one
                 gradient_checkpointing=False)
trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                     teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), args=args,
                     data_collator=collate, train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
                     processing_class=tokenizer)
result = trainer.train()
trainer.save_model(out)
print(json.dumps({"steps": steps, "tokens": steps * batch * (ids.shape[1] - 1),  # tokens predicted, as modelpress counts
                  "train_runtime_s": result.metrics["train_runtime"]}))
