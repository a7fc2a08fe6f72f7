"""The straight-through estimator with the clipping indicator, and LSQ's scale gradient, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.formats.integer import IntFormat
from modelpress.train.qat import fake_quantize_ste


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_is_the_upstream_gradient_times_the_clipping_indicator(symmetric):
    fmt = IntFormat(bits=4, granularity="group", group_size=8, symmetric=symmetric)
    W = torch.randn(4, 16) * 2
    qt = fmt.quantize(W * 0.5)  # scales from a narrower tensor: some weights of W fall outside
    W = W.requires_grad_(True)
    zero = None if qt.zero_point is None else qt.zero_point.float()
    upstream = torch.randn(4, 16)
    W_hat = fake_quantize_ste(W, qt.scale, zero, fmt)
    (W_hat * upstream).sum().backward()
    s = qt.scale.repeat_interleave(8, dim=1)
    z = 0 if zero is None else zero.repeat_interleave(8, dim=1)
    codes = W.detach() / s + z
    inside = (codes >= fmt.qmin) & (codes <= fmt.qmax)
    assert 0 < inside.float().mean() < 1  # both cases present: the test can fail
    assert torch.equal(W.grad, upstream * inside)
    # the forward is the format's own rounding, bit for bit
    assert torch.equal(W_hat.detach(), fmt.fake_quantize_grouped(fmt.grouped(W.detach()), qt.scale.unsqueeze(-1),
                                                                  None if zero is None else zero.unsqueeze(-1)).reshape(4, 16))


def test_lsq_scale_gradient_by_hand():
    fmt = IntFormat(bits=3, granularity="channel", group_size=None)
    W = torch.tensor([[0.26, -0.9, 0.05, 2.0]])
    scale = torch.tensor([[0.25]], requires_grad=True)
    g = 1 / math.sqrt(4 * fmt.qmax)
    fake_quantize_ste(W, scale, None, fmt, grad_scale=g).sum().backward()
    # per weight: round(v) - v inside [qmin, qmax] = [-4, 3], the clamped code outside
    v = [0.26 / 0.25, -0.9 / 0.25, 0.05 / 0.25, 2.0 / 0.25]
    by_hand = sum(round(x) - x if -4 <= x <= 3 else (3 if x > 3 else -4) for x in v) * g
    assert scale.grad.item() == pytest.approx(by_hand, rel=1e-5)
