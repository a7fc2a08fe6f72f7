"""compressed-tensors layouts of the float and lookup formats (see :mod:`modelpress.formats.floats`).

Tensor names, dtypes and packing are those of compressed-tensors 0.20's own compressors
(``FloatQuantizationCompressor``, ``NVFP4PackedCompressor``, ``MXFP4PackedCompressor``); the tests
check that compressed-tensors, given the same weight, writes the same bytes (NVFP4) and that plain
transformers reads back our values.

=========================  =================================================================
format (ct name)           tensors per quantized Linear ``M``
=========================  =================================================================
fp8, fp8-channel           ``M.weight`` float8_e4m3fn, ``M.weight_scale`` float32 ``(1,)``
(``float-quantized``)      per tensor or ``(out, 1)`` per channel
nvfp4                      ``M.weight_packed`` uint8 ``(out, in/2)`` (two E2M1 codes a byte, even
(``nvfp4-pack-quantized``) column low), ``M.weight_scale`` float8_e4m3fn ``(out, in/16)``,
                           ``M.weight_global_scale`` float32 ``(1,)``; ``w = e * scale / global``
mxfp4                      ``M.weight_packed`` as above, ``M.weight_scale`` uint8 ``(out, in/32)``
(``mxfp4-pack-quantized``) holding the E8M0 exponent (``2^(code - 127)``)
nf4 (``dequantized``)      ``M.weight`` float32: the dequantized NF4 values (see below)
=========================  =================================================================

NF4 has no compressed-tensors (or vLLM) format. Rather than refuse, compress writes NF4 weights
*dequantized*, in float32 (exact: level x float16 absmax), with no quantization config for them:
the checkpoint loads anywhere, evaluates exactly the NF4 model, and the run record gives its true
NF4 size (4 + 16/64 bits/weight). It is an evaluation artifact, not a small file; to deploy in
NF4, load it with bitsandbytes' 4-bit NF4 quantization (blocks of 64), which re-quantizes weights
that already lie on the NF4 grid; that round trip has not been verified here.
"""

from __future__ import annotations

import torch

from modelpress.formats import grids
from modelpress.formats.floats import FloatQuantizedTensor, FP8Format, MXFP4Format, NF4Format, NVFP4Format

DEQUANTIZED = "dequantized"  # not a compressed-tensors format: plain float weights


def storage_format(fmt) -> str:
    """The compressed-tensors format name a weight in ``fmt`` is stored as."""
    table = {FP8Format: "float-quantized", NVFP4Format: "nvfp4-pack-quantized",
             MXFP4Format: "mxfp4-pack-quantized", NF4Format: DEQUANTIZED}
    return table[type(fmt)]


def quantization_args(fmt):
    """compressed-tensors ``QuantizationArgs`` of the weights (what llm-compressor's FP8, NVFP4A16
    and MXFP4A16 presets write)."""
    from compressed_tensors.quantization import QuantizationArgs

    if isinstance(fmt, FP8Format):
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=fmt.granularity)
    if isinstance(fmt, NVFP4Format):
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                group_size=16, scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
    if isinstance(fmt, MXFP4Format):
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group",
                                group_size=32, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    raise ValueError(f"{fmt.name} has no compressed-tensors quantization args")


def checkpoint_tensors(module: str, qt: FloatQuantizedTensor) -> dict[str, torch.Tensor]:
    """The tensors that store ``qt`` for Linear ``module``, by their checkpoint names."""
    fmt = qt.fmt
    if isinstance(fmt, NF4Format):
        return {f"{module}.weight": qt.dequantize()}
    if isinstance(fmt, FP8Format):
        scale = qt.scale.reshape(1) if fmt.granularity == "tensor" else qt.scale
        return {f"{module}.weight": qt.q.to(torch.float8_e4m3fn), f"{module}.weight_scale": scale.to(torch.float32)}
    packed = grids.pack_nibbles(grids.e2m1_codes(qt.q))
    if isinstance(fmt, NVFP4Format):
        g = torch.tensor([qt.global_scale], dtype=torch.float32)
        block = (qt.scale * g).to(torch.float8_e4m3fn)  # exact: the effective scale is fp8 / g
        return {f"{module}.weight_packed": packed, f"{module}.weight_scale": block,
                f"{module}.weight_global_scale": g}
    _, e = torch.frexp(qt.scale)  # scale = 2^(e - 1) exactly
    return {f"{module}.weight_packed": packed, f"{module}.weight_scale": (e - 1 + MXFP4Format.E8M0_BIAS).to(torch.uint8)}
