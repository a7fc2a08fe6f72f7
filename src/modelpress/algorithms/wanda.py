"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695, Eq. 1: the importance of weight ``W_ij`` is ``S_ij = |W_ij| * ||X_j||_2``, the
magnitude of the weight times the norm of its input feature over the calibration tokens, and
weights are compared *within each output row* (Sec. 3, "per output"), the paper's key departure
from magnitude pruning's per-layer comparison. No weight update: the kept weights are unchanged.
N:M patterns compare the weights of each group of ``m`` consecutive inputs of a row.

Example:
    >>> import torch
    >>> W = torch.ones(2, 4)
    >>> x_sq = torch.tensor([1.0, 100.0, 4.0, 0.01])  # sum over tokens of x_j^2
    >>> wanda(W, x_sq, Pattern(sparsity=0.5)).mask.int().tolist()
    [[0, 1, 1, 0], [0, 1, 1, 0]]
"""

from __future__ import annotations

import torch

from modelpress.algorithms.sparsity import Pattern, PruneResult, lowest
from modelpress.errors import UserError


def wanda(W: torch.Tensor, x_sq_norm: torch.Tensor, pattern: Pattern) -> PruneResult:
    """Prune ``W: (out, in)`` by ``|W_ij| * ||X_j||``; ``x_sq_norm: (in,)`` is ``sum_t x_tj^2``
    (any positive multiple gives the same mask: comparisons are within a row)."""
    W = W.detach().to(torch.float32)
    if x_sq_norm.shape != (W.shape[1],):
        raise ValueError(f"x_sq_norm has shape {tuple(x_sq_norm.shape)}, expected ({W.shape[1]},)")
    if not (torch.isfinite(W).all() and torch.isfinite(x_sq_norm).all()):
        raise UserError("weights or calibration activations contain NaN or inf; check the model and the data")
    score = W.abs() * x_sq_norm.to(torch.float32).sqrt()[None, :]
    mask = lowest(score, pattern, per_row=True)
    return PruneResult(W.masked_fill(~mask, 0), mask)
