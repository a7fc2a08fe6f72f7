"""``fit --engine llama.cpp``: per-tensor GGUF block types chosen by measured sensitivity.

The same search as for compressed-tensors (:mod:`modelpress.fit.search`) with llama.cpp's block
types as the candidates, and three differences that llama.cpp makes:

- **Every Linear is its own group.** llama.cpp stores and multiplies ``attn_q``, ``attn_k`` and
  ``attn_v`` apart (its own mixes give ``attn_v`` more bits), so nothing ties their types.
- **The input embedding and the output head are choices too** (:func:`measure_embeddings`):
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
import time
from collections import Counter

import torch

from modelpress.fit.sensitivity import KEEP, LinearSensitivity, Sensitivity

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


def embedding_modules(model) -> list[str]:
    """Module names of ``model``'s input embedding and, when it is a tensor of its own (not tied
    to the embedding), its output head."""
    names = {id(m): n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = [names[id(embedding)]]
    if head is not None and head.weight is not embedding.weight:
        out.append(names[id(head)])
    return out


@torch.no_grad()
def measure_embeddings(sens: Sensitivity, config, windows: int = 2) -> Sensitivity:
    """Add the input embedding and the untied output head to ``sens`` as allocation choices.

    For each of them and each candidate block type whose blocks divide its rows, the tensor alone
    is rounded as llama.cpp's quantizer rounds it (the GGUF writer's encoding of these tensors) and
    the model's KL from the float model is measured on the first ``windows`` calibration windows,
    the ones :func:`~modelpress.fit.sensitivity.probe_gains` uses. That KL is the entry's error
    (``kl_measured``: the allocation takes it as the predicted loss as it is), beside the type's
    bytes and ``keep`` (the checkpoint's float type, no loss). A tied embedding is measured with
    the output head rounded with it, as llama.cpp uses the one tensor for both.

    Costs one forward per type and tensor, plus llama.cpp's encoding of the tensor in each type (its
    k-quant parameter search is the slow part for a large vocabulary).
    """
    import torch.nn.functional as F

    from modelpress.fit.sensitivity import candidate_format
    from modelpress.formats.gguf_blocks import GGUFBlockFormat
    from modelpress.models import loading
    from modelpress.pipeline.runner import calibration_ids
    from modelpress.progress import track
    from modelpress.train.losses import kl as kl_divergence

    t0 = time.monotonic()
    source = loading.resolve(sens.model)
    floats = float_types(sens.model)
    model = loading.load_model(source).eval()
    ids = calibration_ids(loading.load_tokenizer(source), config.calibration)[:windows]
    base = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    n_layers = 1 + max((s.layer for s in sens.linears.values()), default=-1)
    names = embedding_modules(model)
    jobs = []
    for i, name in enumerate(names):
        W = model.get_submodule(name).weight
        itemsize = 4 if floats.get(name, "f16") == "f32" else 2
        sens.linears[name] = LinearSensitivity(layer=-1 if i == 0 else n_layers, group=name, in_features=W.shape[1],
                                               numel=W.numel(), energy=0.0, errors={KEEP: 0.0},
                                               nbytes={KEEP: W.numel() * itemsize}, kl_measured=True)
        for spec in sens.candidates:
            fmt = None if spec == KEEP else candidate_format(spec, config)
            if isinstance(fmt, GGUFBlockFormat) and fmt.divides(W.shape[1]):
                jobs.append((name, spec, fmt))
    for name, spec, fmt in track(jobs, total=len(jobs), what="embedding type"):
        weight = model.get_submodule(name).weight
        saved = weight.data
        weight.data = fmt.fake_quantize(saved.to(torch.float32)).to(saved.dtype)
        try:
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            weight.data = saved
        kl = kl_divergence(base, logp).mean().item()
        s = sens.linears[name]
        s.errors[spec], s.nbytes[spec] = kl, fmt.nbytes(s.numel)
        logger.debug("%s in %s: KL %.5f", name, spec, kl)
    sens.seconds = round(sens.seconds + time.monotonic() - t0, 1)
    return sens

