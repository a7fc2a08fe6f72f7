"""The distillation losses against their formulas computed by hand, and their gradients against
finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelpress.train.losses import chunked, generalized_jsd, kd_sums


def _by_hand(z_s, z_t, y, tau, alpha):
    """EQ 7.2 with Python loops over tokens and vocabulary: (1-α)·CE + α·τ²·KL(p_T^τ ‖ p_S^τ), token mean."""
    total = 0.0
    for i in range(z_s.shape[0]):
        s, t = z_s[i].tolist(), z_t[i].tolist()
        log_zs = math.log(sum(math.exp(v) for v in s))
        ce = -(s[y[i]] - log_zs)
        ps = [math.exp(v / tau) for v in s]
        pt = [math.exp(v / tau) for v in t]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        total += (1 - alpha) * ce + alpha * tau**2 * kl
    return total / z_s.shape[0]


@pytest.mark.parametrize("tau,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.3), (0.5, 0.0)])
def test_logit_loss_is_eq_7_2_by_hand_with_tau_squared(tau, alpha):
    z_s, z_t = torch.randn(5, 11, dtype=torch.float64) * 3, torch.randn(5, 11, dtype=torch.float64) * 3
    y = torch.randint(0, 11, (5,))
    s = kd_sums(z_s, z_t, y, temperature=tau, alpha=alpha)
    assert s.loss.item() / s.n == pytest.approx(_by_hand(z_s, z_t, y.tolist(), tau, alpha), rel=1e-6)
    if alpha > 0:  # without τ² the soft term would be τ² times smaller: the test tells them apart
        assert s.soft.item() / s.n == pytest.approx(_by_hand(z_s, z_t, y.tolist(), tau, 1.0), rel=1e-6)


def test_logit_loss_is_zero_soft_term_when_student_equals_teacher():
    z = torch.randn(4, 9)
    s = kd_sums(z, z.clone(), torch.zeros(4, dtype=torch.long), temperature=3.0, alpha=1.0)
    assert abs(s.loss.item()) < 1e-5


def _finite_difference_check(fn, z):
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_gradient_matches_finite_differences(beta):
    z_t = torch.randn(3, 7, dtype=torch.float64)
    _finite_difference_check(lambda z: generalized_jsd(z, z_t, beta, temperature=1.5).sum(),
                             torch.randn(3, 7, dtype=torch.float64))


def test_generalized_jsd_is_its_definition_and_the_end_points_are_the_kls():
    z_s, z_t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    p_s, p_t = F.softmax(z_s, -1), F.softmax(z_t, -1)
    beta = 0.3
    m = beta * p_t + (1 - beta) * p_s
    by_hand = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    assert torch.allclose(generalized_jsd(z_s, z_t, beta), by_hand)
    reverse = (p_s * (p_s / p_t).log()).sum(-1)
    assert torch.allclose(generalized_jsd(z_s, z_t, 1.0), reverse)
    forward = (p_t * (p_t / p_s).log()).sum(-1)
    assert torch.allclose(generalized_jsd(z_s, z_t, 0.0), forward)
    assert not torch.allclose(forward, reverse)  # the two directions differ: the test can fail


def test_chunked_loss_equals_whole_loss_in_value_and_gradient():
    torch.manual_seed(1)
    head_s, head_t = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(8, 50, bias=False)
    h_s = torch.randn(37, 8, requires_grad=True)
    h_t, y = torch.randn(37, 8), torch.randint(0, 50, (37,))

    def run(chunk):
        h_s.grad, head_s.weight.grad = None, None
        s = chunked(kd_sums, h_s, head_s, y, h_t, head_t, chunk_tokens=chunk, temperature=2.0, alpha=0.7)
        (s.loss / s.n).backward()
        return s.loss.item(), h_s.grad.clone(), head_s.weight.grad.clone()

    whole, parts = run(1000), run(5)
    assert parts[0] == pytest.approx(whole[0], rel=1e-5)
    assert torch.allclose(parts[1], whole[1], atol=1e-6)
    assert torch.allclose(parts[2], whole[2], atol=1e-6)
    assert head_t.weight.grad is None  # the teacher is never trained
