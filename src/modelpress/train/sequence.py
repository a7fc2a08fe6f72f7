"""Sequence-level distillation (Kim & Rush 2016, arXiv:1606.07947): the student learns the
teacher's *outputs*, not its distributions.

The teacher continues prompts cut from the training text (each window's first ``prompt_len``
tokens, in the teacher's own tokenization), sampling ``seq_len − prompt_len`` tokens at
temperature 1 with its KV cache, a batch at a time, seeded per batch; the prompt and continuation
are decoded to text and saved as a JSON-lines corpus. The student is then fine-tuned on that
text with cross-entropy, tokenized by its own tokenizer, so teacher and student may have
different vocabularies. The corpus is written once into the run's work folder, reused by a
resumed run, and kept in the output (``teacher_corpus.jsonl``): another student can train on it
with ``--alpha 0 --data OUT/teacher_corpus.jsonl`` without running the teacher again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from modelpress.models import loading
from modelpress.progress import track
from modelpress.train.data import train_windows

logger = logging.getLogger("modelpress")


@torch.no_grad()
def teacher_corpus(teacher: str, data: list[str], out_file: Path, n: int, seq_len: int, prompt_len: int,
                   batch_size: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write ``n`` teacher continuations of windows of ``data`` to ``out_file`` (one ``{"text"}`` per line).

    Returns:
        ``out_file``, written to a temporary name and renamed when complete.
    """
    source = loading.resolve(teacher)
    tokenizer = loading.load_tokenizer(source)
    model = loading.load_model(source, dtype, device=device)
    windows = train_windows(tokenizer, data, seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n]
    tmp = out_file.with_name(out_file.name + ".tmp")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    n_new = windows.shape[1] - prompt_len
    with tmp.open("w") as f:
        batches = list(order.split(batch_size))
        for b, idx in enumerate(track(batches, total=len(batches), what="teacher batch")):
            torch.manual_seed(seed * 1_000_003 + b)
            prompts = windows[idx, :prompt_len].to(device)
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                                 pad_token_id=pad)
            for row in out:
                f.write(json.dumps({"text": tokenizer.decode(row, skip_special_tokens=True)}) + "\n")
    tmp.replace(out_file)
    return out_file
