"""GPTQ onto llama.cpp's GGUF grids: a calibrated GGUF of exactly llama.cpp's type and size.

A GGUF block type is a quantization format like any other: weight ``j`` of a row decodes as
``step * q + offset`` with one ``step`` (and ``offset``) per group of 16 or 32 weights
(:mod:`modelpress.formats.gguf_blocks`). llama.cpp picks those block parameters with its
reference search and rounds every weight to the nearest code. Here the parameters are the same
(llama.cpp's search on the original weights, so headers, sizes and types are identical), and
GPTQ (:func:`modelpress.algorithms.gptq.gptq`) chooses the codes, pushing each column's rounding
error onto the columns not yet rounded. This is GPTQ with *static groups*: the grid is fixed
before any feedback, as it must be for k-quants, whose sub-block scales are chosen jointly over a
256-weight super-block.

Example:
    >>> import torch
    >>> from modelpress.formats.gguf_blocks import gguf_format
    >>> _ = torch.manual_seed(0); X = torch.randn(256, 1024) * torch.linspace(0.1, 3, 256)[:, None]
    >>> W, fmt = torch.randn(8, 256), gguf_format("q4_k")
    >>> q = gguf_gptq(W, 2 * X @ X.T / 1024, fmt)
    >>> rtn = fmt.dequantize(fmt.quantize(W), W.shape)
    >>> bool(((q.dequantize() - W) @ X).pow(2).sum() < ((rtn - W) @ X).pow(2).sum())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from modelpress.algorithms.gptq import GPTQResult, gptq
from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import BlockParams, GGUFBlockFormat


@dataclass(frozen=True)
class GGUFTensor:
    """A weight in a GGUF block type: the bytes a GGUF file stores, and how to read them back."""

    data: torch.Tensor  # uint8 (rows, cols // block_size * type_bytes)
    shape: tuple[int, int]
    fmt: GGUFBlockFormat

    def dequantize(self) -> torch.Tensor:
        return self.fmt.dequantize(self.data, self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(frozen=True)
class MatrixGrid:
    """One matrix's GGUF grid as a :class:`~modelpress.formats.base.WeightFormat`: the block parameters
    llama.cpp chose for this matrix, fixed, so that GPTQ only picks the codes."""

    fmt: GGUFBlockFormat
    params: BlockParams
    granularity: str = "group"

    @property
    def group_size(self) -> int:
        return self.fmt.group_size

    def group_size_for(self, in_features: int) -> int:
        return self.fmt.group_size

    def divides(self, in_features: int) -> bool:
        return self.fmt.divides(in_features)

    def for_tensor(self, W: torch.Tensor) -> MatrixGrid:
        return self  # the block parameters were chosen for this very matrix

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        rows, cols = W.shape
        return W.reshape(rows, cols // self.group_size, self.group_size)

    def fake_quantize_grouped(self, w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Nearest grid value, computed as the decoder computes it (``step * q + offset``)."""
        x = w if offset is None else w - offset
        q = torch.nan_to_num(torch.round(x / step), nan=0.0, posinf=0.0, neginf=0.0)  # step 0: every code decodes alike
        v = step * q.clamp_(self.fmt.qmin, self.fmt.qmax)
        return v if offset is None else v + offset

    def encode(self, W_hat: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None) -> GGUFTensor:
        # the stored d, m are what decode uses: round on them, not on the legacy encoders' float32 1/d
        exact = replace(self.params, enc_id=None, enc_min=None)
        codes = self.fmt.quantize_with(W_hat, exact)
        return GGUFTensor(self.fmt.pack(codes, self.params), tuple(W_hat.shape), self.fmt)


def gguf_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: GGUFBlockFormat,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> GGUFTensor:
    """GPTQ codes on llama.cpp's block parameters for ``W: (out, in)``; ``H: (in, in) = 2 X X^T / n``.

    Returns:
        The GGUF tensor: same type, header values and size as llama.cpp's encoding of ``W``.
    """
    return gguf_gptq_result(W, H, fmt, block_size, damp, act_order).qt


def gguf_gptq_result(
    W: torch.Tensor, H: torch.Tensor, fmt: GGUFBlockFormat, block_size: int = 128, damp: float = 0.01,
    act_order: bool = True,
) -> GPTQResult:
    """:func:`gguf_gptq` with GPTQ's loss and damping (``result.qt`` is the :class:`GGUFTensor`)."""
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise UserError("weight contains NaN or inf values; the checkpoint is corrupt or was trained badly")
    if not fmt.divides(W.shape[1]):
        raise UserError(f"{fmt.name} needs rows of a multiple of {fmt.block_size} weights, not {W.shape[1]}")
    params = fmt.choose_params(W)
    step, offset = fmt.grid(params)
    return gptq(W, H, MatrixGrid(fmt, params), block_size=block_size, damp=damp, act_order=act_order,
                grid=(step, offset))
