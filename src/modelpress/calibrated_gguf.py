"""Calibrated GGUF: GPTQ rounds every decoder Linear onto the block grid llama.cpp's file type gives it.

One layer pass of the runner (:mod:`modelpress.pipeline.runner`) with GGUF block types as the
formats and :class:`~modelpress.pipeline.stages.GGUFGPTQStage` as its stage: the inputs of each
decoder layer are captured from calibration text, each Linear's Hessian is collected, and GPTQ
picks codes on llama.cpp's own block parameters (so the tensor types, headers and size are those
of ``llama-quantize``'s output). Each layer then runs again on its quantized weights, so the next
layer calibrates on what the GGUF model will really compute. The
:class:`~modelpress.pipeline.sinks.GGUFSink` keeps the bytes, and :func:`export_gguf` writes them
in llama.cpp's order (rows are independent, so they are quantized in checkpoint order and
permuted for llama.cpp's RoPE layout when written). Tensors outside the decoder layers
(embeddings, output) get llama.cpp's plain encoding.

Example::

    export_calibrated_gguf("smollm2-135m/", "smollm2-q4_k_m.gguf", "q4_k_m",
                           calibration=CalibrationConfig(text="emma.txt"))
"""

from __future__ import annotations

import logging

from torch import nn

from modelpress.export.gguf import export_gguf, gguf_layout
from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel
from modelpress.pipeline.recipe import CalibrationConfig
from modelpress.pipeline.runner import calibration_ids, run_layers, warn_if_too_few_tokens
from modelpress.pipeline.sinks import GGUFSink
from modelpress.pipeline.stages import GGUFGPTQStage
from modelpress.record import mean_finite

logger = logging.getLogger("modelpress")


def export_calibrated_gguf(model: str, out_file: str, type_name: str, calibration: CalibrationConfig,
                           pure: bool = False, damp: float = 0.01, block_size: int = 128,
                           overrides: dict[str, str] | None = None) -> dict:
    """Write ``model`` as a GGUF file whose decoder Linears' codes GPTQ chose on calibration text.

    Args:
        model: checkpoint folder with a ``tokenizer.json``.
        out_file: the ``.gguf`` file to write; must not exist.
        type_name: a llama.cpp file type (``q4_k_m``...).
        calibration: calibration windows.
        pure: one block type for every quantizable tensor.
        damp: GPTQ damping (fraction of the mean Hessian diagonal).
        overrides: module-name regex -> GGUF type, over the file type's mix (a per-tensor mix
            chosen by :mod:`modelpress.fit`).

    Returns:
        :func:`export_gguf`'s summary, with ``"calibrated"``: layers, Linears, tokens and the mean
        relative output error of the calibrated Linears.
    """
    source, layout = gguf_layout(model, out_file, type_name, pure, overrides=overrides)  # refuse bad input first
    lm = LayerwiseModel(source)
    types = {e.name: e.type for e in layout.entries}
    formats = {n: gguf_format(types[n + ".weight"]) for n, m in lm.model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith(lm.prefix + ".") and types.get(n + ".weight") in GGUF_FORMATS}
    ids = calibration_ids(loading.load_tokenizer(source), calibration)
    warn_if_too_few_tokens(ids.numel(), max((lm.model.get_submodule(n).in_features for n in formats), default=0))
    with GGUFSink(formats) as sink:
        run = run_layers(lm, [GGUFGPTQStage(damp, block_size)], formats, sink, ids, calibration.batch_size)
        encoded = sink.encoded
    result = export_gguf(model, out_file, type_name, pure=pure, encoded=encoded, layout=layout)
    result["calibrated"] = {"layers": lm.n_layers, "linears": len(encoded), "tokens": ids.numel(),
                            "output_rel_mse": mean_finite(v.get("output_rel_mse") for v in run.layers.values())}
    return result
