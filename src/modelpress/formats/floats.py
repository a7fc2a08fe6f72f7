"""Float and lookup weight formats: FP8 E4M3, NF4, MXFP4, NVFP4.

Each is a scaled codebook: a weight ``w`` in a group with scale ``s`` is stored as the element
``e = round(w / s)`` of a fixed grid (see :mod:`modelpress.formats.grids`), and read back as
``e * s``. They implement :class:`~modelpress.formats.base.WeightFormat` as :class:`~modelpress.formats.integer.IntFormat` does (``grouped``,
``qparams_from_range``, ``fake_quantize_grouped``, ``encode``, ``quantize``, ...), so RTN,
GPTQ, AWQ and the range observers use them unchanged; the ``zero`` of that interface is always
``None`` (all four are symmetric).

==========  ==============  =======================================================  ============
format      element         scale                                                    bits/weight
==========  ==============  =======================================================  ============
``fp8``     FP8 E4M3        ``amax / 448`` per tensor (``fp8-channel``: per row),    8 (+32/row)
                            float32
``nf4``     NF4 (16 lvls)   block absmax, float16, blocks of 64 (``nf4-g128``...)    4 + 16/64
``mxfp4``   FP4 E2M1        E8M0 power of two per 32: ``2^(floor(log2 amax) - 2)``   4 + 8/32
``nvfp4``   FP4 E2M1        FP8 E4M3 per 16, ``fp8(amax_b / 6 * g) / g``, and one    4 + 8/16
                            float32 ``g = 448 * 6 / amax(tensor)`` per tensor
==========  ==============  =======================================================  ============

Conventions: ``scale`` (in the interface and in :class:`FloatQuantizedTensor`) is always the
*effective* float32 multiplier, already rounded to what its storage type can hold, so the fake
quantization here equals what an engine computes from the stored tensors. MXFP4's scale follows
the OCP Microscaling spec v1.0 (Sec. 6.3: ``X = 2^(floor(log2(amax)) - emax_elem)``, elements
saturating at +-6); compressed-tensors' own MX observer rounds ``amax`` up to a power of two
first, which can pick the next exponent: both store the same kind of tensor and read back the
same way. NVFP4 follows NVIDIA's / compressed-tensors' definition (``generate_gparam`` and
``calculate_qparams``), including its 0.125 stand-in for a block scale that rounds to 0.

NVFP4's global scale belongs to a whole tensor: :meth:`NVFP4Format.for_tensor` fixes it from a
weight (GPTQ calls it on the original weight before error feedback; row-stacked q/k/v get one
shared global scale, which vLLM's fused kernels expect).

Example:
    >>> import torch
    >>> fmt = parse_format("nvfp4")
    >>> fmt.bits_per_weight()
    4.5
    >>> qt = fmt.quantize(torch.randn(8, 64))
    >>> sorted({abs(v) for v in qt.q.unique().tolist()}) <= [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from modelpress.errors import UserError
from modelpress.formats import grids, observers


@dataclass(frozen=True)
class _ScaledGridFormat:
    """Shared machinery: groups, observer ranges -> scales, rounding onto the element grid.

    Subclasses set ``element_bits``, ``elem_max`` and ``scale_bits`` and implement
    :meth:`_scale_from_amax` (the stored scale for a range) and :meth:`_round` (onto the grid).
    """

    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int | None = None
    observer: str = "minmax"

    element_bits: ClassVar[int]
    elem_max: ClassVar[float]
    scale_bits: ClassVar[int]
    symmetric: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.observer not in observers.OBSERVERS:
            raise UserError(f"observer must be one of {', '.join(observers.OBSERVERS)}, got {self.observer!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise UserError(f"per-group quantization needs a positive group size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise UserError(f"group_size is only meaningful with granularity='group', not {self.granularity!r}")

    @property
    def bits(self) -> int:
        return self.element_bits

    # -- arithmetic the planner and the exporters share -------------------------------------

    def tensor_overhead_bits(self) -> int:
        """Bits stored once per tensor (NVFP4's global scale)."""
        return 0

    def bits_per_weight(self, in_features: int | None = None, numel: int | None = None) -> float:
        """Stored bits per weight, scales included (per-row / per-tensor overhead: 0 if unknown)."""
        per_tensor = self.tensor_overhead_bits() / numel if numel else 0.0
        if self.granularity == "group":
            return self.element_bits + self.scale_bits / self.group_size + per_tensor
        if self.granularity == "channel":
            return self.element_bits + (self.scale_bits / in_features if in_features else 0.0)
        return self.element_bits + (self.scale_bits / numel if numel else 0.0)

    def group_size_for(self, in_features: int) -> int:
        return self.group_size if self.granularity == "group" else in_features

    def divides(self, in_features: int) -> bool:
        return self.granularity != "group" or in_features % self.group_size == 0

    def for_tensor(self, W: torch.Tensor) -> _ScaledGridFormat:
        """This format with its per-tensor parameters fixed from ``W`` (none here)."""
        return self

    # -- quantization -----------------------------------------------------------------------

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        """``W: (out, in)`` viewed as ``(rows, n_groups, group)``."""
        out_features, in_features = W.shape
        if self.granularity == "tensor":
            return W.reshape(1, 1, -1)
        if not self.divides(in_features):
            raise UserError(
                f"{self.name} blocks of {self.group_size} do not divide the input dimension {in_features}; "
                "exclude such layers or use --group-fallback keep"
            )
        g = self.group_size_for(in_features)
        return W.reshape(out_features, in_features // g, g)

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (already divided by its scale) rounded onto the element grid, float32."""
        raise NotImplementedError

    def qparams_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Effective scale (float32, rounded to its storage type) for ranges ``[lo, hi]``; no zero point."""
        amax = torch.maximum(-lo.clamp(max=0.0), hi.clamp(min=0.0)).to(torch.float32)
        return self._scale_from_amax(amax), None

    def quantize_grouped(self, Wg: torch.Tensor, scale: torch.Tensor, zero: None = None) -> torch.Tensor:
        """Grid elements of ``Wg`` (any shape broadcasting with ``scale``), float32."""
        return self._round(Wg.to(torch.float32) / scale)

    def fake_quantize_grouped(self, Wg: torch.Tensor, scale: torch.Tensor, zero: None = None) -> torch.Tensor:
        return self.quantize_grouped(Wg, scale) * scale

    def quantize(self, W: torch.Tensor) -> FloatQuantizedTensor:
        """Round ``W: (out, in)`` to this format, choosing ranges with the format's observer."""
        Wf = W.detach().to(torch.float32)
        if not torch.isfinite(Wf).all():
            raise UserError("weight contains NaN or inf values; the checkpoint is corrupt or was trained badly")
        fmt = self.for_tensor(Wf)
        lo, hi = observers.observe(fmt.grouped(Wf), fmt)
        return fmt.quantize_range(Wf, lo, hi)

    def quantize_range(self, W: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> FloatQuantizedTensor:
        """Round ``W: (out, in)`` with given per-group ranges ``lo, hi: (rows, n_groups, 1)``."""
        W = W.detach().to(torch.float32)
        fmt = self.for_tensor(W)
        scale, _ = fmt.qparams_from_range(lo, hi)
        q = fmt.quantize_grouped(fmt.grouped(W), scale)
        return fmt._result(q.reshape(W.shape), scale.squeeze(-1))

    def encode(self, W_hat: torch.Tensor, scale: torch.Tensor, zero: None = None) -> FloatQuantizedTensor:
        """The stored form of ``W_hat: (out, in)``, values already on the grid of ``scale``
        (``(rows, n_groups)``), as an algorithm that rounds column by column produces them."""
        q = self.quantize_grouped(self.grouped(W_hat.to(torch.float32)), scale.unsqueeze(-1))
        return self._result(q.reshape(W_hat.shape), scale)

    def _result(self, q: torch.Tensor, scale: torch.Tensor) -> FloatQuantizedTensor:
        return FloatQuantizedTensor(q=q, scale=scale, fmt=self)

    def fake_quantize(self, W: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(W))`` in ``W``'s dtype."""
        return self.quantize(W).dequantize().to(W.dtype)


@dataclass(frozen=True)
class FP8Format(_ScaledGridFormat):
    """FP8 E4M3 weights with a float32 scale per tensor or per output channel (``amax / 448``)."""

    granularity: Literal["tensor", "channel"] = "tensor"

    element_bits: ClassVar[int] = 8
    elem_max: ClassVar[float] = grids.FP8_E4M3_MAX
    scale_bits: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "channel"):
            raise UserError(f"fp8 scales are per tensor or per channel, not {self.granularity!r}")
        super().__post_init__()

    @property
    def name(self) -> str:
        return "fp8" if self.granularity == "tensor" else "fp8-channel"

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return (amax / self.elem_max).clamp(min=torch.finfo(torch.float32).tiny)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return grids.round_fp8_e4m3(x)


@dataclass(frozen=True)
class NF4Format(_ScaledGridFormat):
    """NF4 (QLoRA) weights: one float16 absmax per block of ``group_size`` (64 by default)."""

    group_size: int | None = 64

    element_bits: ClassVar[int] = 4
    elem_max: ClassVar[float] = 1.0
    scale_bits: ClassVar[int] = 16

    def __post_init__(self) -> None:
        if self.granularity != "group":
            raise UserError(f"nf4 scales are per block of weights, not per {self.granularity!r}")
        super().__post_init__()

    @property
    def name(self) -> str:
        return f"nf4-g{self.group_size}"

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        fp16 = torch.finfo(torch.float16)
        return amax.clamp(fp16.tiny, fp16.max).to(torch.float16).to(torch.float32)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return grids.round_nf4(x)


@dataclass(frozen=True)
class MXFP4Format(_ScaledGridFormat):
    """MXFP4 (OCP Microscaling v1.0): FP4 E2M1 elements, an E8M0 power-of-two scale per 32."""

    group_size: int | None = 32

    element_bits: ClassVar[int] = 4
    elem_max: ClassVar[float] = grids.E2M1_MAX
    scale_bits: ClassVar[int] = 8
    EMAX_ELEM: ClassVar[int] = 2  # exponent of the largest E2M1 normal, 6 = 1.5 * 2^2
    E8M0_BIAS: ClassVar[int] = 127

    def __post_init__(self) -> None:
        if self.granularity != "group" or self.group_size != 32:
            raise UserError("MXFP4 blocks are 32 weights by definition (OCP MX spec); "
                            "exclude layers they do not divide or use --group-fallback keep")
        super().__post_init__()

    @property
    def name(self) -> str:
        return "mxfp4"

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        # floor(log2(amax)) exactly: amax = m * 2^e with m in [0.5, 1)
        _, e = torch.frexp(amax)
        exponent = torch.where(amax > 0, e - 1 - self.EMAX_ELEM, -self.E8M0_BIAS)
        exponent = exponent.clamp(-self.E8M0_BIAS, self.E8M0_BIAS)  # E8M0: 2^-127 .. 2^127 (255 is NaN)
        return torch.ldexp(torch.ones_like(amax), exponent)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return grids.round_e2m1(x)


@dataclass(frozen=True)
class NVFP4Format(_ScaledGridFormat):
    """NVFP4: FP4 E2M1 elements, an FP8 E4M3 scale per 16, a float32 global scale per tensor.

    ``global_scale`` is ``None`` for the format as configured and set by :meth:`for_tensor`.
    """

    group_size: int | None = 16
    global_scale: float | None = None

    element_bits: ClassVar[int] = 4
    elem_max: ClassVar[float] = grids.E2M1_MAX
    scale_bits: ClassVar[int] = 8
    ZERO_SCALE: ClassVar[float] = 0.125  # compressed-tensors' stand-in for an FP8 block scale of 0

    def __post_init__(self) -> None:
        if self.granularity != "group" or self.group_size != 16:
            raise UserError("NVFP4 blocks are 16 weights by definition; "
                            "exclude layers they do not divide or use --group-fallback keep")
        super().__post_init__()

    @property
    def name(self) -> str:
        return "nvfp4"

    def tensor_overhead_bits(self) -> int:
        return 32

    def for_tensor(self, W: torch.Tensor) -> NVFP4Format:
        """This format with the global scale ``448 * 6 / amax(W)`` (float32) fixed."""
        if self.global_scale is not None:
            return self
        amax = W.detach().abs().amax().to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
        # a Python number over a tensor, as compressed-tensors writes it: torch computes it as
        # 2688 * (1 / amax), which can differ from 2688 / amax in the last bit
        g = grids.FP8_E4M3_MAX * grids.E2M1_MAX / amax
        g = torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)
        return replace(self, global_scale=g.item())

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        if self.global_scale is None:
            raise ValueError("NVFP4 needs its global scale: call fmt.for_tensor(W) first")
        g = torch.tensor(self.global_scale, dtype=torch.float32)
        block = grids.round_fp8_e4m3((amax / self.elem_max) * g)
        block = torch.where(block == 0, self.ZERO_SCALE, block)
        return block / g

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return grids.round_e2m1(x)

    def _result(self, q: torch.Tensor, scale: torch.Tensor) -> FloatQuantizedTensor:
        return FloatQuantizedTensor(q=q, scale=scale, fmt=replace(self, global_scale=None),
                                    global_scale=self.global_scale)


FloatFormat = FP8Format | NF4Format | MXFP4Format | NVFP4Format


@dataclass(frozen=True)
class FloatQuantizedTensor:
    """A weight in a float/lookup format: grid elements plus one effective scale per group.

    Shapes: ``q: (out, in)`` float32 grid elements (FP8 / E2M1 values, NF4 levels);
    ``scale: (rows, n_groups)`` float32 effective scales (``rows`` is 1 per tensor);
    ``global_scale``: NVFP4's per-tensor scale, folded into ``scale`` already (``None`` otherwise).
    """

    q: torch.Tensor
    scale: torch.Tensor
    fmt: FloatFormat
    global_scale: float | None = None
    zero_point: None = None

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.q.shape
        Wg = self.fmt.grouped(self.q.to(torch.float32)) * self.scale.unsqueeze(-1)
        return Wg.reshape(out_features, in_features)

    def rows(self, start: int, stop: int) -> FloatQuantizedTensor:
        """Output rows ``start:stop`` as a weight of their own (not for per-tensor formats)."""
        if self.fmt.granularity == "tensor":
            raise ValueError("a per-tensor quantized weight has one scale; its rows cannot stand alone")
        return replace(self, q=self.q[start:stop].clone(), scale=self.scale[start:stop].clone())

    @property
    def nbytes(self) -> int:
        """Bytes this weight takes when stored packed (elements, scales, global scale)."""
        bits = self.q.numel() * self.fmt.element_bits + self.scale.numel() * self.fmt.scale_bits
        bits += self.fmt.tensor_overhead_bits()
        return math.ceil(bits / 8)


_SPEC = re.compile(r"^(?P<kind>fp8|nf4|mxfp4|nvfp4)(?:-(?P<gran>tensor|channel|g(?P<group>\d+)))?$")


def parse_float_format(spec: str, observer: str = "minmax") -> FloatFormat:
    """Parse ``fp8``, ``fp8-channel``, ``nf4``, ``nf4-g128``, ``mxfp4``, ``nvfp4``."""
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise UserError(f"unknown float format {spec!r}; expected fp8, fp8-channel, nf4, nf4-g64, mxfp4 or nvfp4")
    kind, gran, group = m["kind"], m["gran"], m["group"]
    if kind == "fp8":
        if group:
            raise UserError("fp8 scales are per tensor (fp8) or per channel (fp8-channel), not per group")
        return FP8Format(granularity=gran or "tensor", observer=observer)
    if kind == "nf4":
        if gran in ("tensor", "channel"):
            raise UserError("nf4 scales are per block: nf4 (64) or nf4-gN")
        return NF4Format(group_size=int(group) if group else 64, observer=observer)
    if gran is not None:
        raise UserError(f"{kind} has a fixed block size; write just {kind!r}")
    return (MXFP4Format if kind == "mxfp4" else NVFP4Format)(observer=observer)


def parse_format(spec: str, observer: str | None = None, scale_dtype: str | None = None,
                 symmetric_range: str | None = None):
    """Any weight format by its spec: float/lookup ones here, integer ones via
    :func:`~modelpress.formats.integer.parse_int_format` (``int4-g128``...).

    Args:
        spec: the format name.
        observer: range observer to use instead of the default ``minmax``.
        scale_dtype: scale storage dtype, integer formats only (the others fix theirs).
        symmetric_range: ``"exact-negative"`` (the default), ``"full"`` or ``"restricted"`` symmetric
            scale rule, integer formats only; a rule the spec names (``int4-g128-full``) stands when
            this is the default.
    """
    from modelpress.formats.integer import DEFAULT_SYMMETRIC_RANGE, parse_int_format

    key = spec.strip().lower()
    if key.startswith("int"):
        overrides = {k: v for k, v in (("observer", observer), ("scale_dtype", scale_dtype)) if v is not None}
        fmt = parse_int_format(key, **overrides)
        if symmetric_range not in (None, DEFAULT_SYMMETRIC_RANGE) and fmt.symmetric:  # a spec's own "-full" also sets it
            fmt = replace(fmt, symmetric_range=symmetric_range)
        return fmt
    if _SPEC.match(key):
        return parse_float_format(key, observer=observer or "minmax")
    raise UserError(
        f"unknown weight format {spec!r}; use an integer spec (int4-g128, int8-channel, int3-g64-asym) "
        "or fp8, fp8-channel, nf4, nf4-g64, mxfp4, nvfp4"
    )


FORMAT_CLASSES = {cls.__name__: cls for cls in (FP8Format, NF4Format, MXFP4Format, NVFP4Format)}
