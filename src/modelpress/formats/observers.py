"""Range observers: how the quantization range of each group is chosen.

An observer sees a grouped weight ``Wg: (rows, n_groups, group)`` and returns the range
``(lo, hi)``, each ``(rows, n_groups, 1)``, that the format turns into scale and zero point.

- ``minmax``: the group's min and max. Never clips; wastes levels on outliers.
- ``percentile``: the ``q``-th percentile of the values (and the ``1-q``-th for the low end).
  Clips the rarest outliers; a heuristic with no error model.
- ``mse``: grid search over shrunken ranges ``[p*lo, p*hi]`` for ``p`` from 1 down to
  ``1 - max_shrink``, keeping per group the one with the lowest ``sum |W - Q(W)|^norm``.
  This is the search in the GPTQ reference code (Frantar et al. 2022, arXiv:2210.17323,
  ``Quantizer.find_params(mse=True)``: grid 100, maxshrink 0.8, norm 2.4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from modelpress.formats.integer import IntFormat

OBSERVERS = ("minmax", "percentile", "mse")

PERCENTILE = 0.999  # keep 99.9% of each group's values inside the range
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def minmax_range(Wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return Wg.amin(dim=-1, keepdim=True), Wg.amax(dim=-1, keepdim=True)


def percentile_range(Wg: torch.Tensor, q: float = PERCENTILE) -> tuple[torch.Tensor, torch.Tensor]:
    # kthvalue is exact and far cheaper than torch.quantile on large tensors.
    n = Wg.shape[-1]
    k_hi = max(1, min(n, round(q * n)))
    k_lo = max(1, min(n, n + 1 - k_hi))
    lo = Wg.kthvalue(k_lo, dim=-1, keepdim=True).values
    hi = Wg.kthvalue(k_hi, dim=-1, keepdim=True).values
    return lo, hi


def mse_range(
    Wg: torch.Tensor,
    fmt: IntFormat,
    grid: int = MSE_GRID,
    max_shrink: float = MSE_MAX_SHRINK,
    norm: float = MSE_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = minmax_range(Wg)
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        lo_p, hi_p = p * lo, p * hi
        scale, zero = fmt.qparams_from_range(lo_p, hi_p)
        err = (fmt.fake_quantize_grouped(Wg, scale, zero) - Wg).abs_().pow_(norm).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo_p, best_lo)
        best_hi = torch.where(better, hi_p, best_hi)
    return best_lo, best_hi


def observe(Wg: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``(lo, hi)`` of each group of ``Wg: (rows, n_groups, group)`` under ``fmt.observer``."""
    table: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        "minmax": lambda: minmax_range(Wg),
        "percentile": lambda: percentile_range(Wg),
        "mse": lambda: mse_range(Wg, fmt),
    }
    return table[fmt.observer]()
