"""AWQ's searches: never worse than what they start from, and clearly better on salient channels."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.awq import output_error, search_clip, search_scale
from modelpress.formats.integer import parse_int_format


def _salient_inputs(in_features=128, n=2048, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(in_features, n, generator=g)
    X[torch.randperm(in_features, generator=g)[:4]] *= 20  # a few channels with large activations
    return X


@pytest.mark.parametrize("spec", ["int3-g32", "int4-g64", "int4-channel", "int3-g32-asym"])
def test_scale_search_protects_salient_channels(spec):
    fmt = parse_int_format(spec)
    X = _salient_inputs()
    H = X @ X.T / X.shape[1]
    Ws = [torch.randn(64, 128), torch.randn(32, 128)]
    search = search_scale(Ws, H, X.abs().mean(1), [fmt, fmt])
    assert search.loss <= search.loss_unscaled  # alpha = 0 is on the grid
    assert search.loss < 0.8 * search.loss_unscaled and search.alpha > 0
    assert torch.isclose((search.s.max() * search.s.min()).sqrt(), torch.tensor(1.0), atol=1e-4)


@pytest.mark.parametrize("spec", ["int3-g32", "int4-channel", "int4-tensor", "int2-g32-asym"])
def test_clip_search_is_never_worse_than_minmax(spec):
    fmt = parse_int_format(spec)
    X = _salient_inputs(seed=1)
    H = X @ X.T / X.shape[1]
    W = torch.randn(48, 128)
    W[3, 7] = 12.0  # an outlier weight stretches its group's min/max range
    clipped = search_clip(W, H, fmt)
    plain = fmt.quantize(W)
    assert output_error(W, clipped.dequantize(), H) <= output_error(W, plain.dequantize(), H) * (1 + 1e-6)
    assert clipped.q.min() >= fmt.qmin and clipped.q.max() <= fmt.qmax
