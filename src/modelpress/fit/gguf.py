"""``fit --engine llama.cpp``: per-tensor GGUF block types chosen by measured sensitivity.

The same search as for compressed-tensors (:mod:`modelpress.fit.search`) with llama.cpp's block
types as the candidates, and three differences that llama.cpp makes:

- **Every Linear is its own group.** llama.cpp stores and multiplies ``attn_q``, ``attn_k`` and
  ``attn_v`` apart (its own mixes give ``attn_v`` more bits), so nothing ties their types.
- **The input embedding and the output head are choices too** (:func:`~modelpress.fit.sensitivity.measure_embeddings`):
  ``token_embd`` (which is also the output head when the model ties them) and an untied
  ``output`` take any block type, priced by the model's KL measured with that tensor alone in it
  (no Hessian describes a lookup table or the logits). Norms and the other small tensors take
  the base file type's types (``q4_k_m`` by default: ``f32``).
- **The file is a calibrated GGUF** (:func:`modelpress.calibrated_gguf.export_calibrated_gguf`):
  each Linear's codes are chosen by GPTQ on the block parameters llama.cpp's quantizer picks, in
  the type the allocation gave it (``overrides``), so the file loads in any llama.cpp.

Types whose blocks do not divide a Linear's rows are not offered for it (llama.cpp's k-quants
need rows of a multiple of 256; the 32-weight types take the rest, as llama.cpp's own fallbacks do).
A ``keep`` Linear is written in the float type of the checkpoint (``f32``, ``f16`` or ``bf16``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter

from modelpress.fit.sensitivity import KEEP

logger = logging.getLogger("modelpress")

ENGINE = "llama.cpp"
# llama.cpp's block types, 8.5 down to 2.6 bits per weight; q5_0/q5_1/q4_0 are what its mixes fall
# back to where a row is not whole 256-weight blocks.
CANDIDATES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_0", "q3_k", "q2_k", KEEP)
BASE = "q4_k_m"
# llama.cpp's own mixes, measured beside the allocation as its "uniform" formats are for vLLM
MIXES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
_FLOAT = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # safetensors dtype -> GGUF float type


@functools.lru_cache(maxsize=16)
def layout(model: str, ftype: str):
    """The GGUF layout (tensor names, shapes, types) of ``model`` in llama.cpp's ``ftype`` mix
    (llama.cpp's fallbacks are reported when a file is written, not here)."""
    from modelpress.export.gguf import GGUFLayout
    from modelpress.models import loading

    return GGUFLayout(loading.load_config(loading.resolve(model)), ftype, warn=False)


def fixed_bytes(model: str, base: str, targets: set[str]) -> int:
    """Bytes of every tensor of the GGUF file except the ``targets`` Linears' weights, in ``base``'s types."""
    return sum(e.nbytes for e in layout(model, base).entries if e.name.removesuffix(".weight") not in targets)


def mix_choice(model: str, ftype: str, linears) -> dict[str, str] | None:
    """The type llama.cpp's ``ftype`` mix gives each target Linear (``keep`` for a float type);
    ``None`` when the mix gives one a type outside the candidates measured."""
    types = {e.name.removesuffix(".weight"): e.type for e in layout(model, ftype).entries}
    choice = {}
    for name, s in linears.items():
        t = types[name]
        t = KEEP if t in ("f32", "f16", "bf16") else t
        if t not in s.nbytes:
            return None
        choice[name] = t
    return choice


def float_types(model: str) -> dict[str, str]:
    """Each weight's GGUF float type as the checkpoint stores it (``f32``, ``f16`` or ``bf16``), by module."""
    from modelpress.models import loading

    return {name.removesuffix(".weight"): _FLOAT.get(dtype, "f16")
            for name, (_, dtype) in loading.tensor_headers(loading.resolve(model)).items()}


def export_stage(candidate, base: str, floats: dict[str, str]) -> dict:
    """The recipe stage that writes ``candidate``: a calibrated GGUF of ``base``'s types with each
    Linear's type given (``keep`` as the checkpoint's float type, :func:`float_types`); the float
    candidate is the checkpoint's float type throughout."""
    if candidate.kind == "float":
        return {"export": {"to": "gguf", "type": Counter(floats.values()).most_common(1)[0][0]}}
    overrides = {re.escape(n): floats[n] if t == KEEP else t for n, t in candidate.formats.items()}
    return {"export": {"to": "gguf", "type": base, "calibrate": "gptq", "overrides": overrides}}


def smallest_bytes(model: str, base: str, targets: dict[str, tuple[int, int]], specs: list[str]) -> float:
    """The smallest file the candidates can make, from shapes alone: each target Linear
    (``name -> (rows, cols)``) in its smallest type whose blocks divide its rows, the rest in ``base``'s."""
    from modelpress.formats.gguf_blocks import gguf_format

    total = float(fixed_bytes(model, base, set(targets)))
    for rows, cols in targets.values():
        sizes = [gguf_format(f).nbytes(rows * cols) for f in specs if f != KEEP and gguf_format(f).divides(cols)]
        total += min(sizes, default=rows * cols * 4)
    return total


def tensor_bytes(gguf_file) -> int:
    """Bytes of the tensors of a GGUF file (metadata excluded)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(gguf_file)).tensors)
