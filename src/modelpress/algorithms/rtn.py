"""Round-to-nearest (RTN): every weight rounded independently onto the format's grid.

The baseline every calibrated method is measured against. No data, no error feedback:
``Q(W) = s * (clamp(round(W / s) + z) - z)`` with ``s, z`` chosen per group by the format's
observer (min/max, percentile or an MSE grid search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.formats.base import WeightFormat
from modelpress.formats.integer import IntFormat, QuantizedTensor  # noqa: F401 (IntFormat: the doctest)


@dataclass(frozen=True)
class LayerError:
    """How far a quantized weight is from the original (plain data for the record/report)."""

    rel_mse: float  # ||W - Q(W)||^2 / ||W||^2
    sqnr_db: float | None  # -10 log10(rel_mse): signal-to-quantization-noise ratio; None when exact
    max_abs: float  # max |W - Q(W)|

    @classmethod
    def between(cls, W: torch.Tensor, W_hat: torch.Tensor) -> LayerError:
        W = W.to(torch.float32)
        err = W_hat.to(torch.float32) - W
        rel = (err.pow(2).sum() / W.pow(2).sum().clamp(min=1e-30)).item()
        sqnr = None if rel == 0 else -10.0 * torch.log10(torch.tensor(rel)).item()  # JSON has no infinity
        return cls(rel_mse=rel, sqnr_db=sqnr, max_abs=err.abs().max().item())


def rtn(W: torch.Tensor, fmt: WeightFormat) -> tuple[QuantizedTensor, LayerError]:
    """Quantize ``W: (out, in)`` by round-to-nearest.

    Returns:
        ``(qt, error)``: the quantized weight and its distance from ``W``.

    Example:
        >>> import torch
        >>> qt, err = rtn(torch.randn(64, 128), IntFormat(bits=8, granularity="channel", group_size=None))
        >>> err.sqnr_db > 35
        True
    """
    qt = fmt.quantize(W)
    return qt, LayerError.between(W, qt.dequantize())
