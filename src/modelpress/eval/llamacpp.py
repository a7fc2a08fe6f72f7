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


def gguf_weights_model(model_dir: str, gguf_file: str | Path) -> torch.nn.Module:
    """The float32 transformers model of ``model_dir`` with every weight replaced by what the GGUF
    file holds for it (decoded), so that our evaluator sees the file's weights."""
    from transformers import AutoModelForCausalLM

    from modelpress.export.gguf import GGUFLayout, read_gguf_weights
    from modelpress.export.gguf_mix import file_type

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layout = GGUFLayout(model.config, file_type("f32"))
    state = model.state_dict()
    with torch.no_grad():
        for name, W in read_gguf_weights(gguf_file, layout).items():
            state[name].copy_(W)
    return model


def llama_cpp_quantize(src: str | Path, dst: str | Path, type_name: str, n_threads: int = 0) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) from the
    F32/F16 GGUF ``src`` to ``dst`` in file type ``type_name`` (``q4_k_m``...): the reference our
    export is compared with."""
    import ctypes

    import gguf
    import llama_cpp

    from modelpress.export.gguf_mix import FILE_TYPES, file_type

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, FILE_TYPES[file_type(type_name)][1]))
    params.nthread = n_threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src} -> {dst} ({type_name})")
