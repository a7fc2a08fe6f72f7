"""Decode speed, measured in the engine a model is for, beside the speed of light of this machine.

``decode_speed`` generates ``n`` tokens one at a time (batch 1, the KV cache growing from a
one-token prompt) and reports tokens/s: llama.cpp for a ``.gguf`` file (``llama-cpp-python``,
every core), transformers otherwise (the model as transformers holds it in memory: a
compressed-tensors checkpoint is decompressed to float on a CPU).

``ceiling`` is the memory-bound limit for the same run on :func:`modelpress.plan.local.measure_local`'s
machine: its measured read bandwidth over the bytes one step reads, every weight the engine holds
except an untied input embedding (one row of it is read per token). The ratio says how far the
engine is from the physical limit here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from modelpress.errors import UserError


def decode_speed(model: str, n_tokens: int = 64) -> dict:
    """``{"engine", "decode_tok_s", "tokens", "bytes_per_token"}`` for ``model``."""
    if str(model).endswith(".gguf"):
        return _llama_cpp_speed(Path(model), n_tokens)
    return _transformers_speed(model, n_tokens)


def _llama_cpp_speed(path: Path, n_tokens: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise UserError("measuring a GGUF file's speed needs llama-cpp-python: pip install llama-cpp-python") from None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_tokens + 8, n_batch=8, verbose=False,
                          n_threads=os.cpu_count(), n_threads_batch=os.cpu_count())
    try:
        token = llm.token_bos()
        llm.eval([token])
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            llm.eval([token])  # the cost of a step does not depend on which token it is
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
    return {"engine": "llama.cpp", "decode_tok_s": n_tokens / seconds, "tokens": n_tokens,
            "bytes_per_token": gguf_bytes_per_token(path)}


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor bytes a decode step reads from a GGUF file: all but an untied token embedding."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]
    return total


@torch.no_grad()
def _transformers_speed(model: str, n_tokens: int) -> dict:
    from modelpress.models import loading

    m = loading.load_model(loading.resolve(model)).eval()  # as evaluation holds it
    ids = torch.tensor([[m.config.bos_token_id or 1]])
    steps = dict(do_sample=False, pad_token_id=m.config.eos_token_id)
    m.generate(ids, max_new_tokens=2, min_new_tokens=2, **steps)  # warm up
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **steps)  # one prompt token: all decode
    seconds = time.perf_counter() - t0
    held = {id(p): p.numel() * p.element_size() for p in m.parameters()}
    nbytes = sum(held.values())
    embed, head = m.get_input_embeddings(), m.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        nbytes -= embed.weight.numel() * embed.weight.element_size()
    return {"engine": "transformers", "decode_tok_s": n_tokens / seconds, "tokens": n_tokens, "bytes_per_token": nbytes}


def with_ceiling(speed: dict) -> dict:
    """``speed`` plus this machine's measured bandwidth and matmul FLOP/s, the memory-bound
    ceiling and the fraction reached."""
    from modelpress.plan.hardware import find_hardware

    hw = find_hardware("local")
    ceiling = hw.bandwidth / speed["bytes_per_token"]
    return {**speed, "bandwidth": hw.bandwidth, "peak_flops": hw.peak_flops("fp32"), "ceiling_tok_s": ceiling,
            "fraction": speed["decode_tok_s"] / ceiling}
