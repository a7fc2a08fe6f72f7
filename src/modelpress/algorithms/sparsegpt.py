"""SparseGPT: one-shot pruning with the optimal brain surgeon's weight update.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774, Algorithm 1. For ``W: (out, in)`` and ``H = 2 X X^T``, columns are visited in
order; pruning (zeroing) a weight costs ``w^2 / [H^-1]_cc^2`` in the OBS sense, and its error,
scaled by the row ``c`` of the upper Cholesky factor of the damped ``H^-1``, is pushed onto the
columns not yet visited, exactly as GPTQ pushes a rounding error (the two share
:func:`~modelpress.algorithms.gptq.column_sweep`).

The mask is chosen *adaptively*: for unstructured sparsity, once per block of ``block_size``
columns (the paper's ``B_s = 128``), from the weights as the updates so far left them, keeping
the ``1 - p`` fraction with the largest ``w^2 / [H^-1]_cc^2`` over the block (the reference
code's threshold over the whole block); for N:M, for each group of ``m`` columns when it is
reached, the ``n`` lowest of each row. With ``H = I`` (no correlation) the update vanishes and
SparseGPT is magnitude pruning with those comparisons (tested).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0); X = torch.randn(64, 512) * torch.linspace(0.1, 3, 64)[:, None]
    >>> W = torch.randn(32, 64)
    >>> H = 2 * X @ X.T / 512
    >>> res = sparsegpt(W, H, Pattern(sparsity=0.5))
    >>> mag = (W * (W.abs() >= W.abs().median())) - W
    >>> bool(((res.W - W) @ X).pow(2).sum() < (mag @ X).pow(2).sum())
    True
"""

from __future__ import annotations

import torch

from modelpress.algorithms.gptq import _damped_inverse_cholesky, column_sweep
from modelpress.algorithms.sparsity import Pattern, PruneResult, lowest
from modelpress.errors import UserError


def sparsegpt(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, block_size: int = 128,
              damp: float = 0.01) -> PruneResult:
    """Prune ``W: (out, in)`` to ``pattern`` given ``H: (in, in) = 2 X X^T / n``; the kept weights
    are updated to compensate (Algorithm 1)."""
    out_features, in_features = W.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_features}, {in_features})")
    pattern.check_width(in_features)
    W = W.detach().to(torch.float32).clone()  # updated in place by the feedback
    H = H.detach().to(torch.float32).clone()
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise UserError("weights or calibration activations contain NaN or inf; check the model and the data")
    dead = torch.diag(H) == 0  # inputs never active: pruning them costs nothing, as in the reference
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, _ = _damped_inverse_cholesky(H, damp)
    del H
    if pattern.m is not None:
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)  # whole groups per block
    keep = torch.ones(in_features, out_features, dtype=torch.bool)  # transposed, as the sweep works

    def prune_column(col: int, W1: torch.Tensor, i: int, diag: list[float]) -> torch.Tensor:
        width = pattern.m if pattern.m is not None else len(diag)
        if i % width == 0:  # a new mask block: choose it on the weights as updated so far
            d = torch.tensor(diag[i : i + width])
            score = W1[i : i + width].pow(2) / d.pow(2)[:, None]  # (columns, out)
            keep[col : col + width] = lowest(score.T, pattern, per_row=pattern.m is not None).T
        return W1[i].masked_fill(~keep[col], 0)  # +0.0: a product with False would leave -0.0

    QT, _ = column_sweep(W, Hinv, block_size, prune_column)
    mask = keep.T.contiguous()
    return PruneResult(QT.T.contiguous(), mask)
