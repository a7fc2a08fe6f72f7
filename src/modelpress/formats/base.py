"""The interface every weight format offers: what the algorithms and the writers may call.

Three families implement it: :class:`~modelpress.formats.integer.IntFormat` (integer codes,
scale and zero point), the float/lookup formats of :mod:`modelpress.formats.floats` (FP8, NF4,
MXFP4, NVFP4), and, inside GPTQ, one matrix's GGUF block grid
(:class:`~modelpress.algorithms.gguf_gptq.MatrixGrid`, a :class:`GridFormat` only). GPTQ rounds
column by column through :meth:`GridFormat.fake_quantize_grouped` and packs the result with
:meth:`GridFormat.encode`;
AWQ's clip search goes through :meth:`WeightFormat.quantize_range`; RTN and the exporters call
:meth:`WeightFormat.quantize` and read :meth:`WeightFormat.bits_per_weight`. An algorithm never
needs to know which family it holds.

Shapes: a weight is ``W: (out, in)``; grouped it is ``Wg: (rows, n_groups, group)`` (``rows`` is 1
per tensor); scales and zero points are ``(rows, n_groups, 1)`` while rounding.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class GridFormat(Protocol):
    """What GPTQ rounds with when the grid is given: the grouping, nearest values, and packing.

    One matrix's GGUF block grid is one (its scales were chosen by llama.cpp's rules); every
    :class:`WeightFormat` is one too.
    """

    granularity: str  # "tensor", "channel" or "group"

    @property
    def group_size(self) -> int | None:
        """Columns sharing one scale (``None`` per tensor or per channel)."""

    def divides(self, in_features: int) -> bool:
        """Whether a row of ``in_features`` splits into whole groups."""

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a row of ``in_features`` (the whole row per channel)."""

    def for_tensor(self, W: torch.Tensor) -> GridFormat:
        """The format with any per-tensor parameter fixed for ``W`` (NVFP4's global scale)."""

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        """``W: (out, in)`` viewed as ``(rows, n_groups, group)``."""

    def fake_quantize_grouped(self, Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """The nearest representable values of ``Wg`` under ``(scale, zero)``, in float."""

    def encode(self, W_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> Any:
        """Pack ``W_hat`` (already on the grid of ``scale``/``zero``) into the stored value."""


@runtime_checkable
class WeightFormat(GridFormat, Protocol):
    """A weight format that also chooses its own ranges: what RTN, GPTQ, AWQ and the writers take."""

    @property
    def name(self) -> str:
        """A short spec (``int4-g128``, ``nvfp4``)."""

    def bits_per_weight(self, in_features: int | None = None, numel: int | None = None) -> float:
        """Stored bits per weight, scales included."""

    def qparams_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero point or None)`` that cover each group's range ``[lo, hi]``."""

    def quantize(self, W: torch.Tensor) -> Any:
        """Round ``W`` with the format's own choice of range (its observer); the stored value,
        which has ``dequantize()`` and ``nbytes``."""
