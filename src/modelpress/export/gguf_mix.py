"""Which tensor gets which GGUF type: llama.cpp's file types (``Q4_K_M``, ``Q3_K_M``, ``Q4_0``...).

A llama.cpp file type is a *mix*: a default block type plus per-tensor rules that give the
sensitive tensors more bits. This module reproduces ``llama_tensor_get_type`` of llama.cpp's
``src/llama-quant.cpp`` (the version ``llama-cpp-python`` 0.3.36 vendors) for the file types
modelpress writes, so that our file has exactly the tensor types, and so the size, that
``llama-quantize`` gives the same model:

- the output matrix (or the tied token embedding) is ``Q6_K``, or ``Q8_0`` when its rows are not
  whole 256-blocks (kept as is for ``Q8_0`` files);
- ``attn_v`` and ``ffn_down`` get more bits in some layers: ``use_more_bits`` picks the first and
  last eighth of the layers and every third layer between (``Q4_K_M``, ``Q5_K_M``), ``Q3_K_M``
  raises the first two ``attn_v`` and the first sixteenth of ``ffn_down`` to ``Q5_K`` and the rest
  to ``Q4_K``, and so on (see :func:`_mixed_type`);
- a block type whose block does not divide a row falls back as llama.cpp does: ``Q2_K``/``Q3_K``
  -> ``Q4_0``, ``Q4_K`` -> ``Q5_0``, ``Q5_K`` -> ``Q5_1``, ``Q6_K`` -> ``Q8_0``, and to ``F16`` if
  even 32 does not divide it;
- 1-D tensors and norms are never quantized (F32).

Rules llama.cpp keeps for architectures modelpress does not export (Falcon, 8-expert MoE) and
for the importance-matrix-only types (IQ*, Q2_K_S) are left out. ``pure=True`` is llama-quantize's
``--pure``: the default type everywhere it fits.

Example:
    >>> plan = tensor_types([("token_embd.weight", (32000, 4096)), ("blk.0.attn_v.weight", (1024, 4096)),
    ...                      ("blk.0.ffn_down.weight", (4096, 2880)), ("output.weight", (32000, 4096))],
    ...                     "q4_k_m", n_layer=1, n_gqa=4)
    >>> plan["token_embd.weight"], plan["blk.0.attn_v.weight"], plan["blk.0.ffn_down.weight"], plan["output.weight"]
    ('q4_k', 'q6_k', 'q8_0', 'q6_k')
"""

from __future__ import annotations

import logging

from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import gguf_format

# file type -> (default block type, gguf.LlamaFileType member)
FILE_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("f32", "ALL_F32"),
    "f16": ("f16", "MOSTLY_F16"),
    "bf16": ("bf16", "MOSTLY_BF16"),
    "q8_0": ("q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("q5_1", "MOSTLY_Q5_1"),
    "q2_k": ("q2_k", "MOSTLY_Q2_K"),
    "q3_k_s": ("q3_k", "MOSTLY_Q3_K_S"),
    "q3_k_m": ("q3_k", "MOSTLY_Q3_K_M"),
    "q3_k_l": ("q3_k", "MOSTLY_Q3_K_L"),
    "q4_k_s": ("q4_k", "MOSTLY_Q4_K_S"),
    "q4_k_m": ("q4_k", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("q5_k", "MOSTLY_Q5_K_S"),
    "q5_k_m": ("q5_k", "MOSTLY_Q5_K_M"),
    "q6_k": ("q6_k", "MOSTLY_Q6_K"),
}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # as llama-quantize reads them
FLOAT_TYPES = ("f32", "f16", "bf16")
logger = logging.getLogger("modelpress")
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def file_type(name: str) -> str:
    """The canonical file-type name for ``name`` (case-insensitive, llama-quantize's aliases)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {name!r}; known: {', '.join([*FILE_TYPES, *ALIASES])}")
    return key


def _block_size(type_name: str) -> int:
    return 1 if type_name in FLOAT_TYPES else gguf_format(type_name).block_size


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the tensors our architectures have."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and name not in ("position_embd.weight", "token_types.weight"))


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: str, n_layer: int, n_gqa: int,
                 large_attn_v: bool = False, pure: bool = False, warn: bool = True) -> dict[str, str]:
    """The GGUF type of every tensor, as ``llama-quantize`` chooses it.

    Args:
        tensors: ``(gguf name, (rows, cols))`` in file order (the counters of ``attn_v`` and
            ``ffn_down`` run in that order, as in llama.cpp; write layers in order).
        ftype: a :data:`FILE_TYPES` key (see :func:`file_type`).
        n_layer: decoder layers; n_gqa: query heads per key/value head.
        large_attn_v: llama.cpp's 70B rule (80 layers, grouped KV): ``attn_v`` at ``Q5_K`` at least.
        pure: one type everywhere it fits (``llama-quantize --pure``).
        warn: say which tensors fall back to another type (off where a mix is only priced, not written).
    """
    default = FILE_TYPES[ftype][0]
    tied = not any(n == "output.weight" for n, _ in tensors)
    n_attn_v = sum(1 for n, _ in tensors if "attn_v.weight" in n or "attn_qkv.weight" in n)
    counters = {"attn_v": 0, "ffn_down": 0}
    types, fallbacks = {}, {}
    for name, shape in tensors:
        if not quantizable(name, shape):
            types[name] = "f32"
            continue
        t = default
        if default not in FLOAT_TYPES:
            if not pure:
                t = _mixed_type(name, shape, ftype, default, tied, counters, n_attn_v, n_layer, n_gqa, large_attn_v)
            fits = _fallback(t, shape[-1])
            if fits != t:
                fallbacks[f"{t}->{fits}"] = fallbacks.get(f"{t}->{fits}", 0) + 1
            t = fits
        types[name] = t
    if fallbacks and warn:
        logger.warning("%d tensors have rows that are not whole blocks of their type and fall back as llama.cpp "
                       "does (%s)", sum(fallbacks.values()), ", ".join(f"{k}: {n}" for k, n in sorted(fallbacks.items())))
    return types


def _fallback(t: str, cols: int) -> str:
    if cols % _block_size(t):
        t = _FALLBACK.get(t, t)
        if cols % _block_size(t):
            t = "f16"
    return t


def _mixed_type(name, shape, ftype, t, tied, counters, n_attn_v, n_layer, n_gqa, large_attn_v) -> str:
    """``llama_tensor_get_type_impl`` for the file types of :data:`FILE_TYPES` (dense models)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if shape[-1] % _block_size(t):
            return "q8_0"
        return t if t == "q8_0" else "q6_k"
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        i = counters["attn_v"]
        counters["attn_v"] += 1
        if ftype == "q2_k":
            t = "q4_k" if n_gqa >= 4 else "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i < 2 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_attn_v):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            t = "q5_k"
        if large_attn_v and t in ("q3_k", "q4_k"):
            t = "q5_k"
        return t
    if "ffn_down" in name:
        i = counters["ffn_down"]
        counters["ffn_down"] += 1
        if ftype == "q2_k":
            t = "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i < n_layer // 16 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_layer):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < n_layer // 8:
            t = "q5_k"
        return t
    if "attn_output.weight" in name:
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, t)
    return t
