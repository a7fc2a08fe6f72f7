"""Perplexity through llama.cpp (``llama-cpp-python``), to check a GGUF export by loading it back.

The same token windows (protocol ``ppl-512``) go through llama.cpp and through transformers with
the weights the GGUF file holds (each tensor decoded from the block type it was written in);
the two perplexities must agree closely (llama.cpp quantizes activations for some block-type
matmuls and sums in its own order, so they are not bit-equal).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modelpress.errors import UserError
from modelpress.progress import track


def llama_cpp_ppl(gguf_file: str | Path, windows: torch.Tensor, n_threads: int | None = None) -> float:
    """Perplexity of the GGUF model on ``windows: (n, T)`` as llama.cpp computes its logits."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("checking a GGUF file needs llama-cpp-python: pip install llama-cpp-python") from None
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          logits_all=True, verbose=False, n_threads=n_threads)
    nll, n = 0.0, 0
    try:
        for window in track(windows, total=len(windows), what="llama.cpp window"):
            ids = window.tolist()
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
            targets = window[1:]
            nll += -F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
            n += targets.numel()
    finally:
        llm.close()
    return math.exp(nll / n)


def gguf_weights_model(model_dir: str, type_name: str) -> torch.nn.Module:
    """The float32 transformers model with every weight replaced by what the GGUF export of type
    ``type_name`` stores for it (decoded), so that our evaluator sees the file's weights."""
    from transformers import AutoModelForCausalLM

    from modelpress.export.gguf import _tensor_type
    from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = _tensor_type(name, tuple(p.shape), type_name)
            if t in GGUF_FORMATS:
                fmt = gguf_format(t)
                p.copy_(fmt.dequantize(fmt.quantize(p), tuple(p.shape)))
            elif t in ("f16", "bf16"):
                p.copy_(p.to(torch.float16 if t == "f16" else torch.bfloat16).float())
    return model
