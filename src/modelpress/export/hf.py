"""Plain Hugging Face export: a float safetensors checkpoint in the dtype you choose.

The way from a GGUF file (dequantized by transformers) or a float32 checkpoint to the usual
16-bit release format; tensors stream one at a time when the source is safetensors.
"""

from __future__ import annotations

import logging

import torch

from modelpress.export.checkpoint import CheckpointWriter
from modelpress.models import loading
from modelpress.models.loading import clean_config, meta_model
from modelpress.models.tensors import tensor_stream
from modelpress.progress import track

logger = logging.getLogger("modelpress")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_hf(model: str, out_dir: str, dtype: str = "bfloat16") -> dict:
    """Write ``model`` as a float checkpoint with every floating tensor in ``dtype``.

    Returns:
        ``{"tensors": n, "bytes": total}``.
    """
    source = loading.resolve(model)
    hf_config = loading.load_config(source)
    meta = meta_model(hf_config)
    tokenizer = loading.load_tokenizer(source)
    config = clean_config(hf_config)
    config.dtype = dtype
    with CheckpointWriter(out_dir) as writer:
        stream, n = tensor_stream(source, meta)
        for name, tensor in track(stream, total=n, what="tensor"):
            writer.add_tensor(name, tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor)
        writer.finish(config=config.to_dict(), tokenizer=tokenizer,
                      copy_files_from=source.path if source.kind == "folder" else None)
    return {"tensors": n, "bytes": writer.total_bytes}
