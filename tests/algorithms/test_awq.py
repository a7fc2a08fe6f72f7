"""AWQ's searches: never worse than what they start from, and clearly better on salient channels."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.awq import output_error, search_clip, search_scale, weight_magnitude
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


def test_output_error_matches_float64_reference():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1536, 4096, generator=g) * torch.logspace(-1, 1.5, 1536)[:, None]
    H = X @ X.T / X.shape[1]
    W = torch.randn(96, 1536, generator=g)
    W_hat = parse_int_format("int3-g64").quantize(W).dequantize()
    D = (W_hat - W).double()
    reference = torch.einsum("oi,ij,oj->", D, H.double(), D)
    assert torch.isclose(output_error(W, W_hat, H), reference, rtol=1e-5)


@pytest.mark.parametrize("spec", ["int3-g32", "int4-g64-asym"])
def test_searching_both_families_is_never_worse_than_either(spec):
    fmt = parse_int_format(spec)
    X = _salient_inputs(seed=3)
    H = X @ X.T / X.shape[1]
    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(64, 128, generator=g) * torch.logspace(-1, 0.5, 128)]  # uneven weight columns too
    both = search_scale(Ws, H, X.abs().mean(1), [fmt])
    alone = {f: search_scale(Ws, H, X.abs().mean(1), [fmt], family=f) for f in ("activation", "duo")}
    assert both.loss <= min(a.loss for a in alone.values()) * (1 + 1e-9)
    assert not alone["activation"].duo and (alone["duo"].duo or alone["duo"].alpha == 0)
    assert all(a.loss_unscaled == both.loss_unscaled for a in alone.values())  # alpha = 0 scored first


def test_weight_magnitude_is_relative_to_each_group():
    fmt = parse_int_format("int4-g2")
    W = torch.tensor([[1.0, 2.0, 10.0, -20.0], [4.0, 4.0, 1.0, 1.0]])
    # groups: [1, 2] -> [0.5, 1], [10, -20] -> [0.5, 1], [4, 4] -> [1, 1], [1, 1] -> [1, 1]
    assert torch.allclose(weight_magnitude([W], [fmt]), torch.tensor([0.75, 1.0, 0.75, 1.0]), atol=1e-5)
