"""GPTQ onto GGUF grids: llama.cpp's exact type, headers and size, with lower output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from modelpress.algorithms.gguf_gptq import gguf_gptq
from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format

K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _calibration(in_features=256, n=2048, seed=0) -> torch.Tensor:
    """Correlated inputs with a few outlier channels, like LLM activations. (in, n)"""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(in_features, in_features // 4, generator=g) @ torch.randn(in_features // 4, n, generator=g)
    X = X + 0.3 * torch.randn(in_features, n, generator=g)
    X[:4] *= 8
    return X


@pytest.mark.parametrize("name", sorted(GGUF_FORMATS))
def test_same_bytes_budget_and_headers_lower_output_error(name):
    fmt = gguf_format(name)
    X = _calibration()
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    ours = gguf_gptq(W, H, fmt)
    reference = fmt.quantize(W)  # llama.cpp's reference encoding
    assert ours.data.shape == reference.shape and ours.data.dtype == reference.dtype
    _, our_params = fmt.unpack(ours.data, W.shape)
    _, ref_params = fmt.unpack(reference, W.shape)
    assert torch.equal(our_params.d, ref_params.d)  # the same block scales: only the codes differ
    if ref_params.scales is not None:
        assert torch.equal(our_params.scales, ref_params.scales)
    decoded = torch.from_numpy(gguf_dequantize(ours.data.numpy(), fmt.ggml_type).astype(np.float32)).reshape(W.shape)
    assert torch.equal(decoded, ours.dequantize())  # gguf-py reads exactly what we meant
    err = ((ours.dequantize() - W) @ X).pow(2).sum()
    err_rtn = ((fmt.dequantize(reference, W.shape) - W) @ X).pow(2).sum()
    assert err < 0.85 * err_rtn, (name, err.item(), err_rtn.item())


@pytest.mark.parametrize("name", K_QUANTS)
def test_identity_hessian_gives_llama_cpp_bytes(name):
    """With H = I there is no error feedback: GPTQ rounds to nearest on llama.cpp's grid, as llama.cpp does."""
    fmt = gguf_format(name)
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gguf_gptq(W, torch.eye(256), fmt, act_order=False).data, fmt.quantize(W))


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_k", "q6_k"])
def test_dead_inputs_keep_llama_cpp_codes(name):
    """An input channel calibration never activates keeps its nearest code on the given grid
    (its weights are not zeroed as when GPTQ picks the grid): deployment text may use it."""
    fmt = gguf_format(name)
    X = _calibration()
    X[40:48] = 0
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    ours = gguf_gptq(W, 2 * X @ X.T / X.shape[1], fmt).dequantize()
    plain = fmt.dequantize(fmt.quantize(W), W.shape)
    assert torch.equal(ours[:, 40:48], plain[:, 40:48])
    assert not torch.equal(ours, plain)  # the live columns did move


def test_bad_shapes_and_values():
    fmt = gguf_format("q4_k")
    with pytest.raises(UserError, match="multiple of 256"):
        gguf_gptq(torch.randn(4, 288), torch.eye(288), fmt)
    W = torch.randn(4, 256)
    W[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        gguf_gptq(W, torch.eye(256), fmt)
