"""Integer weight formats: 2-8 bit, symmetric or asymmetric, per-tensor / per-channel / per-group.

Conventions follow compressed-tensors so that stored values need no translation: the integer
code ``q`` is signed, ``q in [-2^(b-1), 2^(b-1) - 1]``, and ``W ~ (q - z) * s``.
Symmetric formats have ``z = 0``; asymmetric ones store ``z`` in the same signed range.

Symmetric scales use the whole signed range. The default rule, ``symmetric_range="exact-negative"``,
is ``s = max(-lo / 2^(b-1), hi / (2^(b-1) - 1/2))`` for a range ``[lo, hi]``: a negative extreme
lands exactly on the lowest code ``-2^(b-1)`` (as llama.cpp's Q4_0 puts its largest-magnitude
weight exactly on -8), a positive one within half a step of ``2^(b-1) - 1``; every weight's error
is at most ``s / 2``, and all ``2^b`` codes are used. It is the default because it measured best
(``benchmarks/results/calibrated.md``, ppl-512 on Pride and Prejudice): with RTN it beat the two
rules below and one placing both extremes exactly in all four cells (SmolLM2 g64 and Gemma-3-270M
g128, int4 and int3); with GPTQ (MSE-searched scales) it beat the restricted rule, GPTQ's earlier
default, in three cells and was 0.2% above it in the fourth (Gemma int4: 29.37 against 29.33).
Representing the largest weight exactly is worth more than a 6% finer step.

``symmetric_range="full"``: ``s = max(-lo / (2^(b-1) + 1/2), hi / (2^(b-1) - 1/2))``, the finest
step at which every value lies within half a step of a code (a negative extreme is clipped by up
to half a step). At 4 bits: ``max|w| / 8.5`` for a negative extreme, ``max|w| / 7.5`` (what
compressed-tensors divides by) for a positive one. The default before 2026-12-03.

``symmetric_range="restricted"`` is the textbook rule ``s = max|w| / (2^(b-1) - 1)``
(``max|w| / 7`` at 4 bits), which never uses the code -2^(b-1): a 7% coarser step at 4 bits and
one level in eight wasted at 3 bits (measured on SmolLM2 in the README); kept so that results
quoted with that rule can be reproduced.

Scales are rounded to their storage dtype (``scale_dtype``) *before* the weights are rounded,
so ``dequantize`` here equals what an engine computes from the stored tensors, bit for bit.

Example:
    >>> import torch
    >>> from modelpress.formats import IntFormat
    >>> fmt = IntFormat(bits=4, granularity="group", group_size=128)
    >>> fmt.bits_per_weight()
    4.125
    >>> W = torch.randn(256, 512)
    >>> qt = fmt.quantize(W)
    >>> bool(qt.q.min() >= -8 and qt.q.max() <= 7)
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from modelpress.errors import UserError
from modelpress.formats import observers

Granularity = Literal["tensor", "channel", "group"]
SymmetricRange = Literal["full", "exact-negative", "restricted"]
SYMMETRIC_RANGES = ("exact-negative", "full", "restricted")
DEFAULT_SYMMETRIC_RANGE = "exact-negative"  # see the module docstring

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
ZERO_POINT_BITS = 8  # zero points are stored as int8 (one per group), whatever ``bits`` is


@dataclass(frozen=True)
class IntFormat:
    """An integer quantization format (an immutable value).

    Args:
        bits: bits per weight, 2 to 8.
        granularity: one scale per ``"tensor"``, per output ``"channel"`` (row), or per ``"group"``
            of ``group_size`` consecutive input columns of a row.
        group_size: columns per group; required for ``"group"``, forbidden otherwise.
        symmetric: ``z = 0`` and a range of ``[-max|W|, max|W|]``; else ``[min W, max W]`` with a zero point.
        observer: how each group's range is chosen: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        symmetric_range: the symmetric scale rule: ``"exact-negative"`` (default), ``"full"`` or
            ``"restricted"`` (``max|w| / (2^(b-1) - 1)``); see the module docstring.
        scale_dtype: storage dtype of scales: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    """

    bits: int = 4
    granularity: Granularity = "group"
    group_size: int | None = 128
    symmetric: bool = True
    observer: str = "minmax"
    scale_dtype: str = "float16"
    symmetric_range: SymmetricRange = DEFAULT_SYMMETRIC_RANGE

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise UserError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise UserError(f"per-group quantization needs a positive group size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise UserError(f"group_size is only meaningful with granularity='group', not {self.granularity!r}")
        if self.observer not in observers.OBSERVERS:
            raise UserError(f"observer must be one of {', '.join(observers.OBSERVERS)}, got {self.observer!r}")
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise UserError(f"symmetric_range must be one of {', '.join(SYMMETRIC_RANGES)}, got {self.symmetric_range!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise UserError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    # -- arithmetic the planner and the exporters share -------------------------------------

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        """Short spec string, parseable by :func:`parse_int_format`: ``int4-g128``, ``int8-channel-asym``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        rule = f"-{self.symmetric_range}" if self.symmetric and self.symmetric_range != DEFAULT_SYMMETRIC_RANGE else ""
        return f"int{self.bits}-{gran}" + ("" if self.symmetric else "-asym") + rule

    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS[self.scale_dtype] + (0 if self.symmetric else ZERO_POINT_BITS)

    def bits_per_weight(self, in_features: int | None = None, numel: int | None = None) -> float:
        """Stored bits per weight, scales and zero points included.

        Per-channel overhead depends on the row length ``in_features`` and per-tensor on the
        tensor size ``numel``; when unknown it is taken as zero (it is below 0.01 bit for any
        real LLM layer).
        """
        overhead = self.overhead_bits_per_group()
        if self.granularity == "group":
            return self.bits + overhead / self.group_size
        if self.granularity == "channel":
            return self.bits + (overhead / in_features if in_features else 0.0)
        return self.bits + (overhead / numel if numel else 0.0)

    def group_size_for(self, in_features: int) -> int:
        """Columns per scale for a layer with ``in_features`` inputs (per-channel: the whole row)."""
        return self.group_size if self.granularity == "group" else in_features

    def divides(self, in_features: int) -> bool:
        return self.granularity != "group" or in_features % self.group_size == 0

    def for_tensor(self, W: torch.Tensor) -> IntFormat:
        """This format with its per-tensor parameters fixed from ``W``: integer formats have none
        (NVFP4's global scale is one; see :mod:`modelpress.formats.floats`)."""
        return self

    # -- quantization -----------------------------------------------------------------------

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        """``W: (out, in)`` viewed as ``(rows, n_groups, group)``."""
        out_features, in_features = W.shape
        if self.granularity == "tensor":
            return W.reshape(1, 1, -1)
        if not self.divides(in_features):
            raise UserError(
                f"group size {self.group_size} does not divide the input dimension {in_features}; "
                "pick a group size that divides it, or a fallback for such layers"
            )
        g = self.group_size_for(in_features)
        return W.reshape(out_features, in_features // g, g)

    def qparams_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (rounded to its storage dtype) and zero point for ranges ``[lo, hi]``."""
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        if self.symmetric and self.symmetric_range == "full":
            scale = torch.maximum(-lo / (-self.qmin + 0.5), hi / (self.qmax + 0.5))
            zero = None
        elif self.symmetric and self.symmetric_range == "exact-negative":
            scale = torch.maximum(-lo / -self.qmin, hi / (self.qmax + 0.5))
            zero = None
        elif self.symmetric:
            scale = torch.maximum(-lo, hi) / self.qmax
            zero = None
        else:
            scale = (hi - lo) / (2**self.bits - 1)
        tiny = torch.finfo(SCALE_DTYPES[self.scale_dtype]).tiny
        scale = scale.clamp(min=tiny).to(SCALE_DTYPES[self.scale_dtype]).to(torch.float32)
        scale = torch.where(torch.isfinite(scale), scale, torch.finfo(SCALE_DTYPES[self.scale_dtype]).max)
        if not self.symmetric:
            zero = torch.clamp(self.qmin - torch.round(lo / scale), self.qmin, self.qmax)
        return scale, zero

    def quantize_grouped(
        self, Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        """Integer codes of a grouped tensor, as float values (exact small integers)."""
        q = torch.round(Wg / scale)
        if zero is not None:
            q = q + zero
        return q.clamp_(self.qmin, self.qmax)

    def fake_quantize_grouped(
        self, Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.quantize_grouped(Wg, scale, zero)
        return (q - zero if zero is not None else q) * scale

    def quantize(self, W: torch.Tensor) -> QuantizedTensor:
        """Round ``W: (out, in)`` to this format, choosing ranges with the format's observer."""
        Wf = W.detach().to(torch.float32)
        if not torch.isfinite(Wf).all():
            raise UserError("weight contains NaN or inf values; the checkpoint is corrupt or was trained badly")
        lo, hi = observers.observe(self.grouped(Wf), self)
        return self.quantize_range(Wf, lo, hi)

    def quantize_range(self, W: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> QuantizedTensor:
        """Round ``W: (out, in)`` with given per-group ranges ``lo, hi: (rows, n_groups, 1)``."""
        Wg = self.grouped(W.detach().to(torch.float32))
        scale, zero = self.qparams_from_range(lo, hi)
        q = self.quantize_grouped(Wg, scale, zero)
        return QuantizedTensor(
            q=q.reshape(W.shape).to(torch.int8),
            scale=scale.squeeze(-1),
            zero_point=None if zero is None else zero.squeeze(-1).to(torch.int8),
            fmt=self,
        )

    def encode(self, W_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantizedTensor:
        """The stored form of ``W_hat: (out, in)``, values already on the grid of ``scale``/``zero``
        (``(rows, n_groups)`` each), as an algorithm that rounds column by column produces them."""
        z = None if zero is None else zero.unsqueeze(-1)
        q = self.quantize_grouped(self.grouped(W_hat.to(torch.float32)), scale.unsqueeze(-1), z)
        return QuantizedTensor(
            q=q.reshape(W_hat.shape).to(torch.int8),
            scale=scale,
            zero_point=None if zero is None else zero.to(torch.int8),
            fmt=self,
        )

    def fake_quantize(self, W: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(W))`` in ``W``'s dtype."""
        return self.quantize(W).dequantize().to(W.dtype)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight in an integer format: codes plus one scale (and zero point) per group.

    Shapes: ``q: (out, in)`` int8; ``scale: (rows, n_groups)`` float32 holding values exactly
    representable in ``fmt.scale_dtype``; ``zero_point`` like ``scale``, int8, or ``None``.
    ``rows`` is ``out`` except per-tensor, where it is 1 (and ``n_groups`` is 1).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    fmt: IntFormat

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.q.shape
        Wg = self.fmt.grouped(self.q.to(torch.float32))
        zero = None if self.zero_point is None else self.zero_point.to(torch.float32).unsqueeze(-1)
        Wg = (Wg - zero if zero is not None else Wg) * self.scale.unsqueeze(-1)
        return Wg.reshape(out_features, in_features)

    def masked(self, keep: torch.Tensor) -> QuantizedTensor:
        """This weight with the codes where ``keep`` is ``False`` set to the zero point, so that
        they dequantize to exactly 0 (pruning a quantized weight keeps it on its grid)."""
        zero = torch.zeros_like(self.q) if self.zero_point is None else \
            self.zero_point.repeat_interleave(self.q.shape[1] // self.zero_point.shape[1], dim=1).expand_as(self.q)
        return QuantizedTensor(q=torch.where(keep, self.q, zero.to(self.q.dtype)), scale=self.scale,
                               zero_point=self.zero_point, fmt=self.fmt)

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Output rows ``start:stop`` as a weight of their own (not for per-tensor formats)."""
        if self.fmt.granularity == "tensor":
            raise ValueError("a per-tensor quantized weight has one scale; its rows cannot stand alone")
        zero = None if self.zero_point is None else self.zero_point[start:stop]
        return QuantizedTensor(q=self.q[start:stop].clone(), scale=self.scale[start:stop].clone(),
                               zero_point=None if zero is None else zero.clone(), fmt=self.fmt)

    @property
    def nbytes(self) -> int:
        """Bytes this weight takes when stored packed (codes at ``bits`` each, plus scales/zeros)."""
        n_groups = self.scale.numel()
        bits = self.q.numel() * self.fmt.bits + n_groups * self.fmt.overhead_bits_per_group()
        return math.ceil(bits / 8)


_SPEC = re.compile(
    r"^int(?P<bits>\d+)(?:-(?P<gran>tensor|channel|g(?P<group>\d+)))?(?:(?P<asym>-asym)|-(?P<rule>restricted|exact-negative|full))?$"
)


def parse_int_format(spec: str, **overrides) -> IntFormat:
    """Parse ``int4-g128``, ``int8-channel``, ``int4-tensor-asym``, ``int4-g128-restricted``
    (default granularity: channel; ``-full``, ``-restricted``, ``-exact-negative`` (the default):
    those symmetric scale rules)."""
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise UserError(
            f"unknown integer format {spec!r}; expected e.g. int4-g128, int8-channel, int4-tensor, int3-g64-asym, "
            "int4-g128-restricted"
        )
    gran = m["gran"] or "channel"
    kwargs = dict(
        bits=int(m["bits"]),
        granularity="group" if m["group"] else gran,
        group_size=int(m["group"]) if m["group"] else None,
        symmetric=m["asym"] is None,
    )
    if m["rule"]:
        kwargs["symmetric_range"] = m["rule"]
    kwargs.update(overrides)
    return IntFormat(**kwargs)
