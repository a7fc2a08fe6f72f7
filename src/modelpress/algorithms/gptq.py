"""GPTQ: one-shot weight quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323, Algorithm 1.

For a Linear with weight ``W: (out, in)`` and calibration inputs ``X: (in, n)``, GPTQ minimizes
``||W X - Q X||^2`` column by column: each column is rounded, and its error, scaled by the
inverse Hessian ``H^-1`` of that objective (``H = 2 X X^T``), is pushed onto the columns not yet
quantized. The paper's three refinements are all here:

- *lazy batch updates*: the feedback is applied inside a block of ``block_size`` columns, and
  to the rest of the matrix once per block (one matmul);
- *Cholesky reformulation*: the rows of ``H^-1`` needed at each step are read from the upper
  Cholesky factor of the damped ``H^-1`` (``damp`` x mean diagonal added for stability);
- *act-order* (from the reference code): columns are processed by decreasing ``diag(H)``.
  With act-order, group parameters are fixed up front from the original weights ("static
  groups"), so groups stay contiguous in the original column order and the checkpoint needs no
  permutation index; without it, a group's scale is chosen when its first column is reached,
  from the weights as the feedback has updated them (as in the paper's code).

Group scales come from the format's observer, so ``observer="mse"`` gives GPTQ with an MSE
clipping search per group, a known refinement over min/max scales.

Example:
    >>> import torch
    >>> from modelpress.formats import IntFormat
    >>> _ = torch.manual_seed(0); X = torch.randn(64, 512) * torch.linspace(0.1, 3, 64)[:, None]
    >>> W = torch.randn(32, 64)
    >>> result = gptq(W, 2 * X @ X.T / 512, IntFormat(bits=3, group_size=32))
    >>> rtn_err = ((W - IntFormat(bits=3, group_size=32).quantize(W).dequantize()) @ X).pow(2).sum()
    >>> bool(result.output_error(W, X) < rtn_err)
    True
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from modelpress.errors import UserError
from modelpress.formats import observers
from modelpress.formats.base import GridFormat, WeightFormat
from modelpress.formats.integer import QuantizedTensor


@dataclass
class GPTQResult:
    """A quantized weight and what GPTQ measured while producing it.

    Attributes:
        qt: the quantized weight (same layout as RTN's: codes, scales, zero points per group).
        loss: the GPTQ objective, ``sum_i (w_i - q_i)^2 / [H^-1]_ii / 2`` over columns.
        damp: the relative damping that made ``H`` positive definite (may exceed the requested one).
    """

    qt: QuantizedTensor
    loss: float
    damp: float

    def output_error(self, W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``||(W - Q) X||^2``: the layer-output error the method minimizes. X: (in, n)."""
        return ((W.to(torch.float32) - self.qt.dequantize()) @ X.to(torch.float32)).pow(2).sum()


def _group_params(fmt: WeightFormat, Wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for ``Wg: (rows, n_groups, group)`` from the format's observer."""
    lo, hi = observers.observe(Wg, fmt)
    return fmt.qparams_from_range(lo, hi)


def _damped_inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising ``damp`` until it exists.

    The reference implementation factors ``H``, inverts it and factors the inverse again. This
    computes the same factor with one Cholesky and one triangular inverse: with ``J`` the
    order-reversing permutation and ``J H J = L L^T``, ``H = R R^T`` for the upper triangular
    ``R = J L J``, so ``H^-1 = U^T U`` with ``U = R^-1`` upper triangular, which is the factor sought
    (a Cholesky factor with positive diagonal is unique). About 3x faster on CPU, and it cannot fail
    where the reference's second factorization of a badly conditioned inverse can.
    """
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(6):
        damped = H + damp * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(damped.flip(0, 1))  # J H J
        if info.item() == 0:
            R = L.flip(0, 1)
            U = torch.linalg.solve_triangular(R, eye, upper=True)
            if torch.isfinite(U).all():
                return U, damp
        damp = damp * 10 if damp > 0 else 1e-3
    raise UserError(
        "the Hessian is not positive definite even with strong damping; the calibration set is too "
        "small or degenerate for this layer; use more calibration samples or a larger --damp"
    )


@contextlib.contextmanager
def _one_cpu_thread(t: torch.Tensor):
    """Run the column loop on one CPU thread.

    Each column is a handful of small, memory-bound operations (a rounding, a rank-1 update of
    the block's remaining columns), issued thousands of times per matrix. Splitting each over
    threads saves little, and when the cores are shared with other work every operation waits
    on a descheduled thread: measured on a loaded 2-core machine, a 4096x1024 matrix took 0.3 s
    on one thread and 17 s on two. The between-block update (a real matrix product) keeps all
    threads.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _block_size(fmt: GridFormat, block_size: int) -> int:
    """A block holding whole groups, so a group's scale sees all feedback applied so far."""
    if fmt.granularity != "group":
        return block_size
    g = fmt.group_size
    return max(g, block_size // g * g)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: GridFormat,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``W: (out, in)`` onto ``fmt`` with GPTQ, given ``H: (in, in) = 2 X X^T / n``.

    Args:
        W: the layer weight.
        H: the Hessian of the layer-output error (any positive scale: it cancels).
        fmt: the integer format (its granularity, group size and observer are used).
        block_size: columns per lazy-update block (rounded to whole groups).
        damp: relative damping, a fraction of the mean diagonal of ``H`` added to it.
        act_order: process columns by decreasing ``diag(H)`` (with static groups).
        grid: fixed per-group ``(scale, zero)``, each ``(out, n_groups)``, instead of the
            format's observer: for formats whose block parameters are chosen jointly (GGUF k-quants).
        mask: ``(out, in)``, ``False`` where a weight is pruned: those stay exactly zero (their
            rounding error, like any other, is compensated by the columns after them), so a
            pruned model keeps its sparsity. Needs a grid holding an exact zero (symmetric
            formats; asymmetric ones where the zero point is in range).

    Returns:
        A :class:`GPTQResult`; ``result.qt`` stores like RTN's output.
    """
    out_features, in_features = W.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_features}, {in_features})")
    if not fmt.divides(in_features):
        raise UserError(f"group size {fmt.group_size} does not divide the input dimension {in_features}")
    W = W.detach().to(torch.float32).clone()  # updated in place by the error feedback
    H = H.detach().to(torch.float32).clone()
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise UserError("weights or calibration activations contain NaN or inf; check the model and the data")

    fmt = fmt.for_tensor(W)  # per-tensor parameters (NVFP4's global scale) from the original weight
    # Inputs never active in calibration: no feedback flows to or from them (H's row is zero but
    # its diagonal). Where GPTQ chooses the grid, they are set to 0, as in the reference code,
    # so they cannot widen a group's scale; on a given grid they keep their nearest code, since
    # calibration text that never lights up a channel does not mean deployment text won't.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if grid is None:
        W[:, dead] = 0

    g = fmt.group_size_for(in_features)
    static = act_order or fmt.granularity != "group" or grid is not None
    if grid is not None:
        scale, zero = grid
    elif static:  # every group's parameters from the original weights, before any feedback
        scale, zero = (t.squeeze(-1) if t is not None else None for t in _group_params(fmt, fmt.grouped(W)))
    else:  # filled in as each group is reached
        scale, zero = torch.zeros(out_features, in_features // g), None

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    W, H = W[:, perm], H[perm][:, perm]
    keep = None if mask is None else mask[:, perm].T.to(W.dtype)  # (in, out), processing order
    group_of = (perm // g).tolist() if fmt.granularity == "group" else [0] * in_features
    Hinv, used_damp = _damped_inverse_cholesky(H, damp)
    del H

    def round_column(col: int, W1: torch.Tensor, i: int, diag: list[float]) -> torch.Tensor:
        nonlocal zero
        if not static and col % g == 0:  # a new group: choose its scale from the updated weights
            s, z = _group_params(fmt, W1[i : i + g].T.reshape(out_features, 1, g))
            scale[:, col // g] = s.reshape(-1)
            if z is not None:
                zero = torch.zeros_like(scale) if zero is None else zero
                zero[:, col // g] = z.reshape(-1)
        grp = group_of[col]
        q = fmt.fake_quantize_grouped(W1[i], scale[:, grp], None if zero is None else zero[:, grp])
        return q if keep is None else q.mul_(keep[col])

    QT, losses = column_sweep(W, Hinv, _block_size(fmt, block_size), round_column)
    Q = QT.T
    qt = fmt.encode(Q[:, torch.argsort(perm)], scale, zero)
    return GPTQResult(qt=qt, loss=losses.sum().item(), damp=used_damp)


def column_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS column loop GPTQ and SparseGPT share (Algorithm 1 of arXiv:2210.17323, with lazy
    block updates): each column is replaced by ``round_column(col, W1, i, diag)``, and its error,
    divided by the Cholesky factor's diagonal, is pushed onto the columns after it.

    Args:
        W: ``(out, in)`` in processing order; updated in place by the feedback.
        Hinv: upper Cholesky factor of the damped inverse Hessian, same order.
        block_size: columns per lazy-update block.
        round_column: given the column index, the block transposed ``W1: (block columns, out)``
            as updated so far, the column's position ``i`` in it and the factor's diagonal over the
            block, the new values of column ``W1[i]`` (it may look ahead in ``W1[i:]``: SparseGPT
            chooses a block's mask there, GPTQ a group's scale).

    Returns:
        ``(QT, losses)``: the new columns as rows ``(in, out)``, and per output row
        ``sum (w - q)^2 / d^2 / 2``.
    """
    out_features, in_features = W.shape
    # Columns are rows here: the block is worked on transposed, so the column being rounded and
    # the rank-1 update of the columns after it touch contiguous memory.
    QT = W.new_empty(in_features, out_features)
    losses = W.new_zeros(out_features)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].T.contiguous()  # (columns, out)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1).tolist()
        with _one_cpu_thread(W1):
            for i in range(i2 - i1):
                q = round_column(i1 + i, W1, i, diag)
                QT[i1 + i] = q
                err = torch.sub(W1[i], q, out=Err1[i]).div_(diag[i])
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        losses += Err1.pow(2).sum(dim=0) / 2
        W[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1)
    return QT, losses


def accumulate_hessian(H: torch.Tensor | None, n: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running ``H = 2 X X^T / n`` over calibration batches. X: (..., in); returns ``(H, n)``.

    Each batch's ``X^T X`` is computed in float32 (fast) and the running sum kept in float64:
    adding tens of thousands of tokens' outer products in float32 would lose the small
    eigenvalues GPTQ's inverse depends on.
    """
    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    m = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    H *= n / (n + m)
    n += m
    H.add_(gram(X), alpha=2 / n)  # in place, promoting as it adds: no float64 temporaries of H's size
    return H, n


def gram(X: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``X^T X`` for ``X: (tokens, d)``, computing only the blocks on and above the diagonal.

    A symmetric rank-k update, done as one GEMM per block row: for a 1536-wide input (an MLP's
    down projection) that is 58% of the full product's arithmetic, and the Hessian accumulation
    is as costly as the layer's own forward pass. The lower blocks are the transposes, so the
    result is exactly symmetric.
    """
    d = X.shape[1]
    if d <= block:
        return X.T @ X
    G = X.new_empty(d, d)
    for a in range(0, d, block):
        b = min(a + block, d)
        G[a:b, a:] = X[:, a:b].T @ X[:, a:]
        G[b:, a:b] = G[a:b, b:].T
    return G
