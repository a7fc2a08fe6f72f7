"""Activation fake-quant: a float model computes what an int8-activation (W8A8) engine computes.

:func:`~modelpress.formats.activations.activation_fake_quant` (kept beside the format it applies, so the runner needs nothing from ``eval/``) rounds each listed Linear's input to int8 and back (per-token
dynamic, or per-tensor with the static scale) for the duration of a ``with`` block. It serves
two callers:

- the layer-by-layer runner, so that the next layer is calibrated on what the W8A8 model
  really feeds it;
- ``modelpress eval`` of a W8A8 checkpoint (:func:`checkpoint_input_quant` reads the formats),
  so that perplexity includes the activation error.

About plain transformers: when it loads a compressed-tensors checkpoint with
``input_activations``, compressed-tensors replaces each target Linear's ``forward`` with one that
fake-quantizes the input too (checked in the tests), but with its own convention (step
``max|x| / 127.5``; vLLM's int8 kernels use ``max|x| / 127``, see
:mod:`modelpress.formats.activations`). Inside :func:`activation_fake_quant` compressed-tensors'
own input rounding is switched off (``quantization_enabled = False``: after loading, its weight
rounding is already skipped, the weights being decompressed) so inputs are rounded once, the
engine's way.

Example::

    model = AutoModelForCausalLM.from_pretrained("smollm2-w8a8/")
    with activation_fake_quant(model, checkpoint_input_quant(model)):
        logits = model(ids).logits
"""

from __future__ import annotations

import logging
import torch
from torch import nn

from modelpress.formats.activations import ActFormat, InputQuant, activation_fake_quant  # noqa: F401 (re-exported)

logger = logging.getLogger("modelpress")


def checkpoint_input_quant(model: nn.Module) -> dict[str, InputQuant]:
    """The input quantization of each Linear of a loaded compressed-tensors checkpoint.

    Reads what compressed-tensors attached on load (each module's ``quantization_scheme``, with
    its config's targets and ignore list already resolved, and the static ``input_scale``).
    Schemes other than int8 symmetric per-token dynamic / per-tensor static are left to
    compressed-tensors' own fake-quant (and logged).

    Returns:
        Module name -> :class:`InputQuant`; empty for a model without quantized activations.
    """
    out: dict[str, InputQuant] = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        args = getattr(scheme, "input_activations", None)
        if args is None:
            continue
        fmt = _act_format(args)
        if fmt is None:
            logger.info("%s: input quantization %s is evaluated by compressed-tensors' own fake-quant",
                        name, args.model_dump(exclude_none=True))
            continue
        scale = None if fmt.dynamic else module.input_scale.detach().to(torch.float32).reshape(1)
        out[name] = InputQuant(fmt, scale)
    return out


def _act_format(args) -> ActFormat | None:
    """Our :class:`ActFormat` for compressed-tensors ``QuantizationArgs``, or ``None``."""
    if args.type != "int" or args.num_bits != 8 or not args.symmetric:  # str enums compare as strings
        return None
    if args.strategy == "token" and args.dynamic is True:
        return ActFormat(dynamic=True)
    if args.strategy == "tensor" and args.dynamic is False:
        return ActFormat(dynamic=False)
    return None
