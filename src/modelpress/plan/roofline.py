"""The roofline: FLOPs and bytes per decoded token, arithmetic intensity, and the speed of light.

Decoding one token at batch ``B`` reads every (active) weight once and each sequence's KV cache,
and does ``2 x N`` FLOPs per token (a multiply and an add per weight) plus attention
(``4 x context x query dim`` per layer: QK^T and AV). Arithmetic intensity is FLOPs over bytes
moved; below the hardware's ridge point (peak FLOP/s / bandwidth) the step is memory-bound and
its time is bytes / bandwidth, above it compute-bound.

The seed numbers, reproduced by the tests: at 3.35 TB/s (H100) a 70B INT4 model (35 GB) decodes at
most 3.35e12 / 35e9 = 95.7 tokens/s, and 23.9 in FP16; a 7B FP16 model at batch 1 does
2 x 7e9 FLOPs per 14e9 bytes = 1 FLOP/byte, far below an A100's ridge of 312e12 / 2.039e12 = 153,
so it is memory-bound.

Example:
    >>> from modelpress.plan.hardware import find_hardware
    >>> from modelpress.plan.memory import ModelShape, PlanFormat
    >>> r = decode_roofline(ModelShape.from_param_count(70e9), PlanFormat("int4", 4.0), find_hardware("H100"))
    >>> round(r.tokens_per_s, 1), r.bound
    (95.7, 'memory')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modelpress.plan.hardware import Hardware
from modelpress.plan.memory import KV_BYTES, ModelShape, PlanFormat, kv_cache_bytes, weight_bytes


def flops_per_token(shape: ModelShape, context: int = 0) -> float:
    """``2 x active params`` plus attention over ``context`` cached tokens."""
    attention = sum(4 * min(context, window or context) * q_dim for _, q_dim, window in shape.attention)
    return 2 * shape.params_per_token + attention


def bytes_read_per_step(shape: ModelShape, fmt: PlanFormat, context: int, batch: int, kv_dtype: str) -> float:
    """Bytes moved by one decode step of ``batch`` sequences: active weights once, every KV cache."""
    weights = weight_bytes(shape, fmt) * shape.params_per_token / shape.total_params
    kv = kv_cache_bytes(shape, context, batch, kv_dtype) or 0.0
    return weights + kv


@dataclass(frozen=True)
class Roofline:
    """One decode step on one device.

    Attributes:
        tokens_per_s: generated tokens/s summed over the batch (the speed of light).
        intensity: FLOP per byte of the step.
        ridge: the hardware's ridge point for the format's compute dtype.
        bound: ``"memory"`` or ``"compute"``.
        batch_to_compute_bound: the smallest batch at which weight reads stop dominating
            (ignoring KV); ``None`` when it exceeds any sensible batch.
    """

    tokens_per_s: float
    intensity: float
    ridge: float
    bound: str
    batch_to_compute_bound: int


def decode_roofline(
    shape: ModelShape, fmt: PlanFormat, hw: Hardware, context: int = 0, batch: int = 1, kv_dtype: str = "fp16"
) -> Roofline:
    """The decode speed of light of ``shape`` in ``fmt`` on ``hw`` (one device, no overlap losses)."""
    if kv_dtype not in KV_BYTES:
        kv_dtype = "fp16"
    flops = batch * flops_per_token(shape, context)
    nbytes = bytes_read_per_step(shape, fmt, context, batch, kv_dtype)
    peak = hw.peak_flops(fmt.compute)
    step_s = max(nbytes / hw.bandwidth, flops / peak)
    intensity = flops / nbytes
    ridge = hw.ridge_point(fmt.compute)
    weight_read = weight_bytes(shape, fmt) * shape.params_per_token / shape.total_params
    per_seq_intensity = 2 * shape.params_per_token / weight_read
    return Roofline(
        tokens_per_s=batch / step_s,
        intensity=intensity,
        ridge=ridge,
        bound="memory" if intensity < ridge else "compute",
        batch_to_compute_bound=math.ceil(ridge / per_seq_intensity),
    )


def prefill_tokens_per_s(shape: ModelShape, fmt: PlanFormat, hw: Hardware, context: int) -> float:
    """Prompt tokens/s when prefill is compute-bound (it is, beyond a few hundred tokens)."""
    return hw.peak_flops(fmt.compute) / flops_per_token(shape, context // 2)
