"""Every weight format family offers the one interface the algorithms call."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.gguf_gptq import MatrixGrid
from modelpress.formats.base import GridFormat, WeightFormat
from modelpress.formats.floats import parse_format
from modelpress.formats.gguf_blocks import gguf_format


@pytest.mark.parametrize("spec", ["int4-g128", "int8-channel", "int3-g64-asym", "fp8", "nf4", "mxfp4", "nvfp4"])
def test_formats_implement_the_interface_and_round_trip_through_it(spec):
    fmt = parse_format(spec)
    assert isinstance(fmt, WeightFormat)
    W = torch.randn(8, 256)
    f = fmt.for_tensor(W)
    Wg = f.grouped(W)
    scale, zero = f.qparams_from_range(Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True))
    W_hat = f.fake_quantize_grouped(Wg, scale, zero).reshape(W.shape)
    stored = f.encode(W_hat, scale.squeeze(-1), None if zero is None else zero.squeeze(-1))
    torch.testing.assert_close(stored.dequantize(), W_hat)  # encoding a value on the grid is exact
    torch.testing.assert_close(fmt.quantize(W).dequantize(), W_hat)  # and is what quantize gives


def test_a_gguf_matrix_grid_is_a_grid_format():
    fmt = gguf_format("q4_k")
    W = torch.randn(4, 512)
    grid = MatrixGrid(fmt, fmt.choose_params(W))
    assert isinstance(grid, GridFormat) and not isinstance(grid, WeightFormat)  # its scales are given
    assert grid.grouped(W).shape == (4, 512 // fmt.group_size, fmt.group_size)
