"""The formats the planner knows, by the spec names users type.

Integer specs (``int4``, ``int4-g128``, ``int8-channel``, ``int3-g64-asym``) are parsed by
:func:`modelpress.formats.integer.parse_int_format`, and their bits per weight come from the
format itself, so the plan and the written checkpoint cannot disagree. GGUF block types take
their sizes from the ``gguf`` package's table (bytes per block of weights). Float and lookup
formats (``fp8``, ``fp8-channel``, ``nvfp4``, ``mxfp4``, ``nf4``, ``nf4-g128``) also take their bits
from the format objects in :mod:`modelpress.formats.floats`, scales included.

Example:
    >>> plan_format("int4-g128").bits
    4.125
    >>> plan_format("q4_k").bits
    4.5
    >>> plan_format("nvfp4").bits, plan_format("mxfp4").bits, plan_format("nf4").bits
    (4.5, 4.25, 4.25)
"""

from __future__ import annotations

from modelpress.errors import UserError
from modelpress.plan.memory import PlanFormat

DEFAULT_FORMATS = ("fp32", "fp16", "fp8", "int8", "int4", "int4-g128", "int3-g128", "q8_0", "q4_k_m")

_FLOAT = {
    "fp32": PlanFormat("fp32", 32.0, rest_bits=32.0),
    "fp16": PlanFormat("fp16", 16.0),
    "bf16": PlanFormat("bf16", 16.0),
}
_COMPUTE = {"fp8": "fp8", "mxfp4": "fp4", "nvfp4": "fp4", "nf4": "fp16"}  # NF4 is dequantized to 16-bit to multiply

# llama.cpp mixes: most weights in the base type, some (attn_v, ffn_down, output) higher. The
# average over a typical model is llama.cpp's own reported bits/weight for these mixes.
_GGUF_MIXES = {"q4_k_m": ("q4_k", 4.85), "q4_k_s": ("q4_k", 4.58), "q5_k_m": ("q5_k", 5.69), "q3_k_m": ("q3_k", 3.91)}


def _gguf_bits(type_name: str) -> float | None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[type_name.upper()]
    except KeyError:
        return None
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    return 8 * type_bytes / block


SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch dtype -> format name
_DTYPE_BITS = {"float32": 32.0, "fp32": 32.0, "bfloat16": 16.0, "bf16": 16.0, "float16": 16.0, "fp16": 16.0}


def config_dtype(config) -> str | None:
    """A model config's weight dtype as the planner names it (``fp32``, ``bf16``, ``fp16``), or ``None``."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return SHORT_DTYPES.get(str(dtype).removeprefix("torch."))


def as_written_from(fmt: PlanFormat, dtype: str | None) -> PlanFormat:
    """``fmt`` as ``compress`` writes it from a checkpoint in ``dtype``: the tensors it leaves
    unquantized (embeddings, norms, ``lm_head``) keep the source's dtype, so a float32 source's
    embeddings cost 32 bits each, not the 16 a deployment format assumes. Float and GGUF
    formats, which size every tensor themselves, are returned as they are.

    Example:
        >>> as_written_from(plan_format("int4-g128"), "float32").rest_bits
        32.0
        >>> as_written_from(plan_format("q4_k_m"), "float32") == plan_format("q4_k_m")
        True
    """
    if not fmt.name.startswith(("int", *_COMPUTE)) or dtype is None:  # float and GGUF formats
        return fmt
    from dataclasses import replace

    bits = _DTYPE_BITS.get(str(dtype).removeprefix("torch."))
    return fmt if bits is None else replace(fmt, rest_bits=bits)


def plan_format(spec: str) -> PlanFormat:
    """The :class:`PlanFormat` named ``spec`` (case-insensitive)."""
    key = spec.strip().lower()
    if key in _FLOAT:
        return _FLOAT[key]
    if key.split("-")[0] in _COMPUTE:
        from modelpress.formats.floats import parse_float_format

        fmt = parse_float_format(key)
        per_row = (lambda in_f: fmt.bits_per_weight(in_features=in_f)) if fmt.granularity == "channel" else None
        return PlanFormat(key, fmt.bits_per_weight(), per_row=per_row, compute=_COMPUTE[key.split("-")[0]])
    if key.startswith("int"):
        from modelpress.formats.integer import parse_int_format

        fmt = parse_int_format(key)
        per_row = (lambda in_f: fmt.bits_per_weight(in_features=in_f)) if fmt.granularity == "channel" else None
        return PlanFormat(key, fmt.bits_per_weight(), per_row=per_row)
    if key in _GGUF_MIXES:
        base, bits = _GGUF_MIXES[key]
        return PlanFormat(key, bits, rest_bits=bits)
    bits = _gguf_bits(key)
    if bits is not None and key.startswith(("q", "iq")):
        return PlanFormat(key, bits, rest_bits=bits)
    raise UserError(
        f"unknown format {spec!r}; use fp32, fp16, bf16, fp8, fp8-channel, nf4, mxfp4, nvfp4, an integer spec such as "
        "int4-g128 or int8, or a GGUF type such as q4_k, q8_0, q4_k_m"
    )
