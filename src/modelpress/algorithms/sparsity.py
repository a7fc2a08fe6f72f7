"""Sparsity patterns, the masks they allow, and magnitude pruning (the baseline).

A :class:`Pattern` is either unstructured (a fraction of the weights, compared within each output
row or over the whole matrix) or N:M (``n`` zeros in every group of ``m`` consecutive weights
along the input dimension; 2:4 is what sparse tensor cores run). Masks are ``True`` where a
weight is kept. Pruned weights are exact zeros in a dense tensor: since 2026 neither
compressed-tensors nor transformers nor vLLM store sparse formats, so sparsity saves no bytes,
and time only with 2:4 on an engine with sparse-tensor-core kernels.

Example:
    >>> import torch
    >>> W = torch.tensor([[4.0, -1.0, 0.5, 3.0], [0.1, 0.2, -5.0, 1.0]])
    >>> magnitude(W, Pattern.parse("2:4")).mask.int().tolist()
    [[1, 0, 0, 1], [0, 0, 1, 1]]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from modelpress.errors import UserError


@dataclass(frozen=True)
class Pattern:
    """Which weights may be zeroed: ``sparsity`` of them, or ``n`` of every ``m`` along a row."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.n is None):
            raise UserError("give either a sparsity fraction or an N:M pattern, not both")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise UserError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.n is not None and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise UserError(f"an N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, spec: str) -> Pattern:
        """``"2:4"`` -> N:M; ``"0.5"`` or ``"50%"`` -> unstructured."""
        text = spec.strip()
        if m := re.fullmatch(r"(\d+):(\d+)", text):
            return cls(n=int(m[1]), m=int(m[2]))
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise UserError(f"sparsity pattern {spec!r} is neither a fraction (0.5, 50%) nor N:M (2:4)") from None
        return cls(sparsity=value)

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{100 * self.sparsity:g}%"

    @property
    def fraction(self) -> float:
        return self.sparsity if self.n is None else self.n / self.m

    def check_width(self, in_features: int) -> None:
        if self.m is not None and in_features % self.m:
            raise UserError(f"the {self.name} pattern needs rows of a multiple of {self.m} weights, not {in_features}")


@dataclass
class PruneResult:
    """A pruned weight (dense, pruned entries exactly zero) and its mask (``True``: kept)."""

    W: torch.Tensor
    mask: torch.Tensor

    @property
    def sparsity(self) -> float:
        return 1 - self.mask.float().mean().item()


_TIE_SEED = 0  # ties are broken by seeded random keys: the same mask on every run and device
_ROW_BLOCK = 4096  # rows per N:M selection, bounding its sort's temporaries


def lowest(score: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """The mask that drops the lowest ``score``s the pattern allows; ``score: (rows, cols)``.

    Unstructured: exactly ``int(sparsity * n)`` of each row's ``n`` scores (or of the whole
    matrix, ``per_row=False``); N:M: the ``n`` lowest of every ``m`` consecutive columns of each
    row. Ties at the cut are broken at random with a fixed seed: the same mask on every run and
    device, and no column or row favoured across the matrix. Where ties are everywhere (a model
    dequantized from a 4-bit format holds 16 values per block; both models this project
    benchmarks on are such) the order of ties alone moves magnitude pruning's perplexity a lot,
    and no order is right in general. Measured at 4:8 on the smaller one (ppl-512): the lower
    index first 569, the higher first 827, ``torch.topk``'s value-dependent order (used before)
    531, this random order 578. A fixed positional order can land far from the others (827);
    a random one favours no position and does not depend on how a checkpoint lays out its
    columns. On continuous scores (Wanda, SparseGPT, most float weights) ties are rare.

    The count is exact rather than "every score at or below the k-th smallest" (llm-compressor's
    rule, which prunes all ties: 50.009% of SmolLM2's weights at 0.5): where whole levels tie,
    that rule overshoots the target by far.
    """
    rows, cols = score.shape
    gen = torch.Generator().manual_seed(_TIE_SEED)
    if pattern.n is not None:
        pattern.check_width(cols)
        mask = torch.empty(rows, cols, dtype=torch.bool)
        for r0 in range(0, rows, _ROW_BLOCK):
            block = score[r0 : r0 + _ROW_BLOCK]
            groups = block.reshape(block.shape[0], cols // pattern.m, pattern.m)
            shuffle = torch.argsort(torch.rand(groups.shape, generator=gen), dim=-1)  # the tie order
            ranked = torch.sort(groups.gather(-1, shuffle), dim=-1, stable=True).indices[..., : pattern.n]
            kept = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, shuffle.gather(-1, ranked), False)
            mask[r0 : r0 + _ROW_BLOCK] = kept.reshape(block.shape[0], cols)
        return mask
    flat = score if per_row else score.reshape(1, -1)
    k = int(flat.shape[1] * pattern.sparsity)
    if not k:
        return torch.ones_like(score, dtype=torch.bool)
    cut = torch.kthvalue(flat, k, dim=1, keepdim=True).values  # O(n) selection: 4x faster than topk here
    drop = flat < cut
    short = k - drop.sum(dim=1, dtype=torch.int64)  # ties at the cut still to drop, per row
    tie_row, tie_col = torch.nonzero(flat == cut, as_tuple=True)  # row-major: rows in order
    order = torch.argsort(tie_row.double() + torch.rand(len(tie_row), generator=gen, dtype=torch.float64))
    tie_row, tie_col = tie_row[order], tie_col[order]  # each row's ties, in random order
    counts = torch.bincount(tie_row, minlength=flat.shape[0])
    rank = torch.arange(len(tie_row)) - (torch.cumsum(counts, 0) - counts)[tie_row]
    chosen = rank < short[tie_row]
    drop[tie_row[chosen], tie_col[chosen]] = True
    return (~drop).reshape(rows, cols)


def magnitude(W: torch.Tensor, pattern: Pattern, per_row: bool = False) -> PruneResult:
    """Zero the smallest ``|W|``, over the whole matrix (the classic baseline) or per output row."""
    W = W.detach().to(torch.float32)
    mask = lowest(W.abs(), pattern, per_row=per_row)
    return PruneResult(W.masked_fill(~mask, 0), mask)
