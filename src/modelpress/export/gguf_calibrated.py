"""Calibrated GGUF: GPTQ rounds every decoder Linear onto the block grid llama.cpp's file type gives it.

The layer-by-layer pass of :mod:`modelpress.layerwise`, with GGUF block types as the formats:
the inputs of each decoder layer are captured from calibration text, each Linear's Hessian
``H = 2 X X^T / n`` is collected, and :func:`~modelpress.algorithms.gguf_gptq.gguf_gptq` picks
the codes on llama.cpp's own block parameters (so the tensor type, headers and size are those of
``llama-quantize``'s output). The layer then runs again on its quantized weights, so the next
layer calibrates on what the GGUF model will really compute. Tensors outside the decoder layers
(embeddings, output) and Linears without calibration tokens get llama.cpp's plain encoding.

Linears reading one input in one type (q and k in ``Q4_K_M``; gate and up) are quantized in one
GPTQ call on their stacked rows, exactly as separately (GPTQ treats rows independently given
``H``, and GGUF blocks run along rows).

The GGUF bytes of the quantized Linears are kept in memory until the file is written (about
``bits/8`` bytes per weight). A GGUF tensor's rows are independent, so the rows are quantized in
checkpoint order and permuted for llama.cpp's RoPE layout afterwards. Each row keeps GPTQ's
codes or llama.cpp's plain ones, whichever has the lower output error on the calibration data
(:func:`_better_rows`), so a calibrated file is never worse than llama.cpp's on that objective.
"""

from __future__ import annotations

import logging

import torch

from modelpress.algorithms.gguf_gptq import gguf_gptq
from modelpress.algorithms.hessian import HessianCollector
from modelpress.compress import CalibrationConfig
from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format
from modelpress.layerwise import _output_rel, calibration_ids, warn_if_too_few_tokens
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel, run_layer
from modelpress.progress import track

logger = logging.getLogger("modelpress")


def gptq_gguf_tensors(model: str, types: dict[str, str], calibration: CalibrationConfig,
                      damp: float = 0.01, block_size: int = 128) -> tuple[dict[str, torch.Tensor], dict]:
    """GPTQ on every decoder-layer Linear whose weight has a block type in ``types``.

    Args:
        model: checkpoint folder.
        types: checkpoint tensor name -> GGUF type (from :class:`~modelpress.export.gguf.GGUFLayout`).
        calibration: calibration windows.

    Returns:
        ``(weight name -> GGUF bytes (rows in checkpoint order), {"layers", "linears", "tokens", "output_rel_mse"})``.
    """
    source = loading.resolve(model)
    lm = LayerwiseModel(source)
    ids = calibration_ids(loading.load_tokenizer(source), calibration)
    batches = list(torch.split(ids, calibration.batch_size))
    encoded: dict[str, torch.Tensor] = {}
    rel: list[float] = []
    logger.info("capturing layer inputs for %d calibration windows of %d tokens", len(ids), ids.shape[1])
    capture = lm.capture(batches)
    lm.free_outside_layers()
    hidden = capture.hidden
    linears = {n: m for n, m in lm.model.named_modules()
               if isinstance(m, torch.nn.Linear) and types.get(n + ".weight") in GGUF_FORMATS}
    warn_if_too_few_tokens(ids.numel(), max((m.in_features for m in linears.values()), default=0))
    for i in track(range(lm.n_layers), total=lm.n_layers, what="layer"):
        layer = lm.load_layer(i)
        prefix = lm.layer_prefix(i) + "."
        modules = {n: layer.get_submodule(n.removeprefix(prefix)) for n in linears if n.startswith(prefix)}
        where = f"layer {i + 1}/{lm.n_layers}"
        with HessianCollector(modules, owner=layer, activation_stats=False) as hc:
            run_layer(layer, hidden, capture.kwargs[i], where)
        groups: dict[tuple[str, str], list[str]] = {}
        for name in modules:
            groups.setdefault((hc.owner_of(name), types[name + ".weight"]), []).append(name)
        for (_, type_name), names in groups.items():
            fmt = gguf_format(type_name)
            Ws = [modules[n].weight.data.to(torch.float32) for n in names]
            H, n_tokens = hc.hessian(names[0])
            W = torch.cat(Ws)
            try:
                data = fmt.quantize(W)  # llama.cpp's own encoding
                if H is not None and n_tokens:
                    data = _better_rows(W, H.to(torch.float32), fmt, data,
                                        gguf_gptq(W, H, fmt, block_size, damp).data)
            except UserError as e:
                raise UserError(f"{where}, {', '.join(names)}: {e}") from None
            W_hat = fmt.dequantize(data, tuple(W.shape))
            if H is not None and n_tokens:
                rel.append(_output_rel(W, W_hat, H))
            row = 0
            for n, Wn in zip(names, Ws):
                rows = slice(row, row + Wn.shape[0])
                encoded[n + ".weight"] = data[rows].clone()
                modules[n].weight.data = W_hat[rows].to(modules[n].weight.dtype)
                row += Wn.shape[0]
        del hc
        hidden = run_layer(layer, hidden, capture.kwargs[i], f"{where}, quantized,")
        lm.free_layer(i)
    summary = {"layers": lm.n_layers, "linears": len(encoded), "tokens": ids.numel(),
               "output_rel_mse": sum(rel) / max(len(rel), 1)}
    return encoded, summary


def _better_rows(W: torch.Tensor, H: torch.Tensor, fmt, rtn: torch.Tensor, gptq: torch.Tensor) -> torch.Tensor:
    """Row by row, GPTQ's bytes or llama.cpp's, whichever gives the lower output error
    ``d H d^T`` on the calibration inputs. Both share each row's block headers (llama.cpp's own
    search), so a row from either is a valid row of the same type and size. GPTQ's greedy
    column order is not optimal: where a weight already sits on its grid (a model dequantized
    from this very type) the plain encoding can be exact and GPTQ slightly worse."""
    def row_err(data: torch.Tensor) -> torch.Tensor:
        D = fmt.dequantize(data, tuple(W.shape)) - W
        return ((D @ H) * D).sum(dim=1)

    keep_gptq = row_err(gptq) < row_err(rtn)  # a tie keeps llama.cpp's codes
    return torch.where(keep_gptq[:, None], gptq, rtn)
