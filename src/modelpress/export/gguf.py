"""GGUF export for llama.cpp: the model's tensors in llama.cpp's names, block types and metadata.

Written with the ``gguf`` package's ``GGUFWriter``; the tokenizer comes from the checkpoint's
``tokenizer.json`` through ``gguf.vocab`` (byte-level BPE vocab and merges, special tokens).
Quantized block types are encoded by :mod:`modelpress.formats.gguf_blocks` (byte-exact with
llama.cpp's reference encoder). The file is written under a temporary name and renamed when
complete.

Per-architecture facts live in :data:`GGUF_ARCHITECTURES` (one row per ``model_type``):

- ``llama`` (also SmolLM2): llama.cpp's LLAMA graph applies RoPE to interleaved pairs, so
  ``q_proj`` / ``k_proj`` rows are permuted from Hugging Face's half-split order, as llama.cpp's
  own converter does.

Scope (first version): architectures in the table, types F32, F16, BF16 and the block types of
:mod:`~modelpress.formats.gguf_blocks` applied to every 2-D weight whose rows fit the block
(others, and 1-D tensors, stay F32 as llama.cpp keeps norms). llama.cpp's mixes (Q4_K_M...)
with their per-tensor rules are not done yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format
from modelpress.models import loading
from modelpress.models.arch import text_config
from modelpress.models.tensors import meta_model, tensor_stream
from modelpress.progress import track

logger = logging.getLogger("modelpress")

FLOAT_TYPES = {"f32": (np.float32, "ALL_F32"), "f16": (np.float16, "MOSTLY_F16"), "bf16": (None, "MOSTLY_BF16")}


@dataclass(frozen=True)
class GGUFArch:
    """How one ``model_type`` maps onto a llama.cpp architecture."""

    name: str  # gguf.MODEL_ARCH member
    permute_qk: bool  # q/k rows from HF's half-split RoPE order to llama.cpp's interleaved pairs


GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", permute_qk=True),
}


def _permute_rope(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split to interleaved RoPE pairs, per head."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _tensor_type(name: str, shape: tuple[int, ...], type_name: str) -> str:
    """The GGUF type of one tensor: norms and other 1-D tensors stay F32; a block type needs rows
    of whole blocks (else F16, as llama.cpp falls back for odd shapes)."""
    if len(shape) != 2 or type_name in FLOAT_TYPES:
        return "f32" if len(shape) != 2 else type_name
    if shape[1] % gguf_format(type_name).block_size:
        return "f16"
    return type_name


def export_gguf(model: str, out_file: str, type_name: str = "f16") -> dict:
    """Write ``model`` as a GGUF file of type ``type_name`` (``f16``, ``q8_0``, ``q4_k``...).

    Returns:
        ``{"bytes": file size, "tensors": n, "types": {gguf type: count}}``.
    """
    import gguf

    type_name = type_name.strip().lower()
    if type_name not in FLOAT_TYPES and type_name not in GGUF_FORMATS:
        raise UserError(f"unknown GGUF type {type_name!r}; known: {', '.join([*FLOAT_TYPES, *GGUF_FORMATS])}")
    out = Path(out_file)
    if out.exists():
        raise UserError(f"output {out} already exists; choose a new file or remove it")
    source = loading.resolve(model)
    if source.kind != "folder" or not (Path(source.path) / "tokenizer.json").is_file():
        raise UserError("GGUF export reads a checkpoint folder with a tokenizer.json; "
                        "convert first with `modelpress export MODEL --format hf -o DIR`")
    config = loading.load_config(source)
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export does not support {config.model_type!r} yet; supported: "
                        f"{', '.join(GGUF_ARCHITECTURES)}")
    tc = text_config(config)
    model_arch = getattr(gguf.MODEL_ARCH, arch.name)
    name_map = gguf.get_tensor_name_map(model_arch, tc.num_hidden_layers)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
    try:
        _write_metadata(writer, tc, type_name, Path(source.path))
        meta = meta_model(config)
        stream, n = tensor_stream(source, meta)
        types: dict[str, int] = {}
        for name, tensor in track(stream, total=n, what="tensor"):
            gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"tensor {name} has no llama.cpp name for {arch.name}; this checkpoint is not supported")
            W = tensor.to(torch.float32)
            if arch.permute_qk and name.endswith("q_proj.weight"):
                W = _permute_rope(W, tc.num_attention_heads)
            elif arch.permute_qk and name.endswith("k_proj.weight"):
                W = _permute_rope(W, tc.num_key_value_heads)
            t = _tensor_type(name, tuple(W.shape), type_name)
            types[t] = types.get(t, 0) + 1
            _add_tensor(writer, gname, W, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": out.stat().st_size, "tensors": n, "types": types}


def _add_tensor(writer, gname: str, W: torch.Tensor, type_name: str) -> None:
    import gguf

    if type_name == "f32":
        writer.add_tensor(gname, W.numpy())
    elif type_name == "f16":
        writer.add_tensor(gname, W.to(torch.float16).numpy())
    elif type_name == "bf16":
        raw = W.to(torch.bfloat16).view(torch.int16).numpy()
        writer.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        fmt = gguf_format(type_name)
        writer.add_tensor(gname, fmt.quantize(W).numpy(), raw_dtype=fmt.ggml_type)


def _write_metadata(writer, tc, type_name: str, folder: Path) -> None:
    import gguf

    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    writer.add_context_length(tc.max_position_embeddings)
    writer.add_embedding_length(tc.hidden_size)
    writer.add_block_count(tc.num_hidden_layers)
    writer.add_feed_forward_length(tc.intermediate_size)
    writer.add_head_count(tc.num_attention_heads)
    writer.add_head_count_kv(tc.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(tc, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(tc.rms_norm_eps)
    writer.add_vocab_size(tc.vocab_size)
    ftype = FLOAT_TYPES[type_name][1] if type_name in FLOAT_TYPES else f"MOSTLY_{type_name.upper()}"
    writer.add_file_type(getattr(gguf.LlamaFileType, ftype))
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"GGUF export handles byte-level BPE tokenizers for now ({folder}: {e})") from None
    tokens, scores, toktypes = zip(*vocab.all_tokens())
    if len(tokens) < tc.vocab_size:  # embedding rows beyond the tokenizer: padding tokens, as llama.cpp pads
        pad = tc.vocab_size - len(tokens)
        tokens += tuple(f"[PAD{i}]".encode() for i in range(pad))
        scores += (0.0,) * pad
        toktypes += (gguf.TokenType.UNUSED,) * pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(toktypes))
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
