"""Memory arithmetic: weight bytes per format (scale overhead included), KV cache, runtime overhead.

Pure arithmetic on a :class:`ModelShape` (plain numbers); no model is loaded. Units are bytes;
the display layer converts to decimal GB (1e9) and binary GiB (2**30).

The seed arithmetic, reproduced by the tests: a 70B dense model needs 70e9 x 32/8 = 280 GB in
FP32, 140 GB in FP16, 70 GB in INT8 and 35 GB in INT4 (260.8 / 130.4 / 65.2 / 32.6 GiB).

Example:
    >>> shape = ModelShape.from_param_count(70e9)
    >>> weight_bytes(shape, PlanFormat("int4", 4.0)) / 1e9
    35.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from modelpress.errors import UserError


@dataclass(frozen=True)
class PlanFormat:
    """A storage format as the planner sees it.

    Attributes:
        name: display name (``fp16``, ``int4-g128``, ``q4_k``).
        bits: bits per weight of a quantized Linear, overhead included, when its row length is
            not known (per-channel overhead is below 0.01 bit for any real LLM layer).
        per_row: ``in_features -> bits per weight`` for formats whose overhead depends on the row
            length (per-channel scales); ``None`` when ``bits`` is exact.
        rest_bits: bits per parameter of everything that is not a quantized Linear (embeddings,
            norms, ``lm_head``), as the format's exporter leaves them.
        compute: the dtype matmuls run in (``fp16`` for weight-only formats).
        exact_bytes: the model's weight bytes when known tensor by tensor (a GGUF file type
            laid out by the exporter's own rules for a model whose config is known); ``None``:
            computed from ``bits`` and ``rest_bits``.
    """

    name: str
    bits: float
    per_row: Callable[[int], float] | None = None
    rest_bits: float = 16.0
    compute: str = "fp16"
    exact_bytes: int | None = None

    def bits_for(self, in_features: int | None) -> float:
        if self.per_row is not None and in_features:
            return self.per_row(in_features)
        return self.bits


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model: parameter counts and KV geometry.

    Attributes:
        name: display name.
        linear_params: ``in_features -> parameters`` of the Linears a quantizer would compress
            (the decoder layers' projections, experts included).
        other_params: every other parameter (embeddings, norms, ``lm_head``, biases).
        active_params: parameters read per token (differs from the total for mixture-of-experts).
        attention: one ``(kv elements per token, query dim, window)`` per attention layer: K and V
            elements cached per token (2 x kv-heads x head-dim), heads x head-dim of the queries,
            and the sliding window (``None`` for global attention); empty when unknown (a bare size).
        n_layers, hidden_size: for reporting and activation estimates (0 when unknown).
    """

    name: str
    linear_params: dict[int | None, int]
    other_params: int = 0
    active_params: int | None = None
    attention: tuple[tuple[int, int, int | None], ...] = ()
    n_layers: int = 0
    hidden_size: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_param_count(cls, params: float, name: str | None = None) -> ModelShape:
        """A dense model known only by its size: every parameter counts as a quantizable weight."""
        return cls(name=name or human_count(params), linear_params={None: int(params)})

    @property
    def total_params(self) -> int:
        return sum(self.linear_params.values()) + self.other_params

    @property
    def params_per_token(self) -> int:
        return self.active_params or self.total_params


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([kmbt])\s*$", re.IGNORECASE)
MAX_PARAMS = 1e15  # a thousand times today's largest models: beyond it a size is a typo
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: str) -> float | None:
    """``"70B"`` -> 7e10, ``"135m"`` -> 1.35e8; ``None`` when ``text`` is not a size.

    Raises:
        UserError: a size of less than one parameter, or beyond :data:`MAX_PARAMS`.
    """
    m = _SIZE.match(text)
    if not m:
        return None
    params = float(m[1]) * _SCALE[m[2].lower()]
    if not 1 <= params <= MAX_PARAMS:
        raise UserError(f"model size {text.strip()} is {params:.3g} parameters; give a size from 1K to 1000T, e.g. 70B")
    return params


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def weight_bytes(shape: ModelShape, fmt: PlanFormat) -> float:
    """Bytes of all weights stored in ``fmt``: quantized Linears plus everything else."""
    if fmt.exact_bytes is not None:
        return float(fmt.exact_bytes)
    bits = sum(n * fmt.bits_for(in_f) for in_f, n in shape.linear_params.items())
    bits += shape.other_params * fmt.rest_bits
    return bits / 8


def bits_per_weight(shape: ModelShape, fmt: PlanFormat) -> float:
    """Average stored bits per parameter of the whole model."""
    return 8 * weight_bytes(shape, fmt) / shape.total_params


KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, kv_dtype: str) -> float | None:
    """KV-cache bytes: layers x kv-heads x head-dim x 2 (K and V) x context x batch x dtype bytes.

    Sliding-window layers cache at most their window. ``None`` when the shape has no KV geometry.
    """
    if kv_dtype not in KV_BYTES:
        raise UserError(f"kv dtype must be one of {', '.join(KV_BYTES)}, got {kv_dtype!r}")
    if not shape.attention:
        return None
    elements = sum(kv * min(context, window or context) for kv, _, window in shape.attention)
    return elements * batch * KV_BYTES[kv_dtype]


PREFILL_CHUNK = 8192  # tokens per forward pass: serving engines split long prefills (chunked prefill)


def activation_bytes(shape: ModelShape, context: int, batch: int) -> float:
    """Peak activation memory, roughly: a few fp16 hidden-size buffers per token in flight.

    An engine keeps a handful of ``(tokens, hidden)`` buffers live (residual, norm output, a
    chunk of the MLP's wide intermediate); 16 x hidden x 2 bytes per token is the order of
    magnitude. Prefills are chunked, so at most ``PREFILL_CHUNK`` tokens are in flight.
    """
    return 16 * shape.hidden_size * 2 * min(context * batch, PREFILL_CHUNK)


RUNTIME_RESERVE = 0.10  # engines keep ~10% free: CUDA context, allocator slack (vLLM's default gpu_memory_utilization=0.9)


@dataclass(frozen=True)
class Fit:
    """Whether a model fits a device: the bytes it needs and how many devices that takes."""

    needed_bytes: float
    usable_bytes: float
    devices: int

    @property
    def fits(self) -> bool:
        return self.devices == 1


def fit(needed_bytes: float, device_memory: float, reserve: float = RUNTIME_RESERVE) -> Fit:
    """Devices needed when weights, KV and activations split evenly (tensor parallelism)."""
    usable = device_memory * (1 - reserve)
    return Fit(needed_bytes, usable, max(1, math.ceil(needed_bytes / usable)))
