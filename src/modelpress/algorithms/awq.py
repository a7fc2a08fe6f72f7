"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", arXiv:2306.00978.

Two searches, both scored by the layer-output error they cause on calibration inputs:

1. **Scale search** (Sec. 3.2, Eq. 4-5): salient input channels are those with large
   activations. Multiplying column ``j`` of ``W`` by ``s_j > 1`` (and dividing the input by it,
   folded into the preceding norm) shrinks that channel's relative rounding error. With
   ``s = s_X^alpha`` (``s_X``: mean ``|x|`` per channel), ``alpha`` is chosen on a grid in [0, 1).
   The grid also holds the "duo" candidates ``s = s_X^alpha / s_W^(1 - alpha)`` (``s_W``: mean
   of ``|W|`` per input channel, each group normalised by its absmax), the form AutoAWQ and
   llm-compressor default to: one search over both families keeps whichever scores lower, so
   the result is never worse than either family alone.
2. **Clip search** (the reference code's ``auto_clip``): each group's range is shrunk by the ratio
   that minimizes that group's contribution to the output error.

Both errors are ``||(Q(W') - W) X||^2`` for the quantized, unscaled weight; written with the
Hessian ``H = X X^T`` as ``tr(D H D^T)`` they need no stored activations, only the ``H`` the
runner already collects (the reference code evaluates the same quantity on sampled tokens).
Scales are searched for every producer -> consumers pair the architecture table lists, as in
the reference: the norms feeding q/k/v and gate/up, up_proj's rows into down_proj, and v_proj's
rows into o_proj where v has as many rows as o has inputs (grouped-query models skip that pair,
as the reference does).

Example:
    >>> import torch
    >>> from modelpress.formats import IntFormat
    >>> _ = torch.manual_seed(0); X = torch.randn(64, 1024) * torch.logspace(-1, 1, 64)[:, None]
    >>> W, H, fmt = torch.randn(32, 64), X @ X.T / 1024, IntFormat(bits=3, group_size=32)
    >>> search = search_scale([W], H, X.abs().mean(1), [fmt])
    >>> bool(search.loss <= search.loss_unscaled)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.formats import observers
from modelpress.formats.base import WeightFormat
from modelpress.formats.integer import QuantizedTensor

N_GRID = 20
MAX_SHRINK = 0.5  # the clip search tries ranges down to half of min/max


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W_hat - W) H (W_hat - W)^T)``: the layer-output error over the calibration set.

    One float32 matrix product, summed in float64: the searches compare candidates whose errors
    differ far more than float32's rounding of a product over ``in`` terms (about 1e-6 relative),
    and a float64 product costs twice as much on the searches' hot path.
    """
    D = (W_hat - W).to(torch.float32)
    return ((D @ H.to(torch.float32)) * D).sum(dtype=torch.float64)


@dataclass
class ScaleSearch:
    """The chosen per-input-channel scale and the search's evidence (plain data for the record)."""

    s: torch.Tensor  # (in,)
    alpha: float
    duo: bool  # s = x^alpha / w^(1 - alpha) rather than x^alpha
    loss: float
    loss_unscaled: float


def weight_magnitude(Ws: list[torch.Tensor], fmts: list[WeightFormat]) -> torch.Tensor:
    """Mean ``|W|`` per input channel over the rows of ``Ws``, each quantization group divided by
    its absmax first (so that a channel's weight counts relative to what its group can hold)."""
    total, rows = 0, 0
    for W, fmt in zip(Ws, fmts):
        Wg = fmt.grouped(W.to(torch.float32)).abs()  # (rows, n_groups, g)
        Wg = Wg / (Wg.amax(dim=(-2, -1) if fmt.granularity == "tensor" else -1, keepdim=True) + 1e-6)
        total = total + Wg.reshape(W.shape).sum(0, dtype=torch.float64)
        rows += W.shape[0]
    return (total / rows).to(torch.float32)


def search_scale(
    Ws: list[torch.Tensor], H: torch.Tensor, x_abs_mean: torch.Tensor, fmts: list[WeightFormat], n_grid: int = N_GRID,
    family: str = "both",
) -> ScaleSearch:
    """Grid-search ``alpha`` for ``s = x_abs_mean^alpha`` (and ``/ w^(1 - alpha)``, the duo
    family) over Linears sharing one input; ``alpha = 0`` (no scaling) is always a candidate.

    Args:
        Ws: weights ``(out_k, in)`` that read the same input.
        H: ``X X^T`` of that input, ``(in, in)``.
        x_abs_mean: mean ``|x|`` per input channel, ``(in,)``.
        fmts: each weight's format.
        family: which form of ``s`` to search: ``"activation"``, ``"duo"`` or ``"both"``.
    """
    x = x_abs_mean.to(torch.float32).clamp(min=1e-6)
    duos = {"activation": (False,), "duo": (True,), "both": (False, True)}[family]
    w = weight_magnitude(Ws, fmts) if True in duos else None
    H32 = H.to(torch.float32)
    candidates = [(0.0, False)] + [(i / n_grid, duo) for duo in duos for i in range(1, n_grid)]
    best, loss_unscaled = None, None
    for alpha, duo in candidates:
        s = x.pow(alpha) / (w.pow(1 - alpha) + 1e-4) if duo else x.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (as the reference does)
        loss = sum(output_error(W, fmt.quantize(W * s).dequantize() / s, H32) for W, fmt in zip(Ws, fmts)).item()
        loss_unscaled = loss if loss_unscaled is None else loss_unscaled
        if best is None or loss < best[0]:
            best = (loss, alpha, duo, s)
    loss, alpha, duo, s = best
    return ScaleSearch(s=s, alpha=alpha, duo=duo, loss=loss, loss_unscaled=loss_unscaled)


def _diagonal_blocks(H: torch.Tensor, g: int) -> torch.Tensor:
    """``(n_groups, g, g)``: the blocks of ``H`` that couple columns of the same group."""
    n = H.shape[0] // g
    return torch.stack([H[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n)])


def search_clip(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK) -> QuantizedTensor:
    """Quantize ``W`` with each group's range shrunk by the ratio that minimizes its output error.

    A group's error is ``d_g H_gg d_g^T`` (cross-group terms ignored, as in the reference, which
    scores each group's partial output separately). Per-tensor formats score the whole tensor.
    """
    W = W.to(torch.float32)
    Wg = fmt.grouped(W)  # (rows, n_groups, g)
    lo0, hi0 = observers.minmax_range(Wg)
    per_tensor = fmt.granularity == "tensor"
    Hb = None if per_tensor else _diagonal_blocks(H.to(torch.float32), Wg.shape[-1])
    best_err = best_lo = best_hi = None
    for i in range(int(max_shrink * n_grid) + 1):
        r = 1 - i / n_grid
        qt = fmt.quantize_range(W, lo0 * r, hi0 * r)
        if per_tensor:
            err = output_error(W, qt.dequantize(), H).reshape(1, 1, 1)
        else:
            D = fmt.grouped(qt.dequantize() - W)
            err = torch.einsum("rng,ngh,rnh->rn", D, Hb, D).unsqueeze(-1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo0 * r, hi0 * r
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo0 * r, best_lo)
            best_hi = torch.where(better, hi0 * r, best_hi)
    return fmt.quantize_range(W, best_lo, best_hi)
