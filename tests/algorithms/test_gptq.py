"""GPTQ: exact where theory says it must be, and better than RTN where the paper says it is."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.gptq import _damped_inverse_cholesky, accumulate_hessian, gptq
from modelpress.errors import UserError
from modelpress.formats.integer import parse_int_format


def _calibration(in_features=128, n=2048, seed=0) -> torch.Tensor:
    """Inputs with the structure of LLM activations: correlated, a few outlier channels. (in, n)"""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features // 4, generator=g)
    X = mix @ torch.randn(in_features // 4, n, generator=g) + 0.3 * torch.randn(in_features, n, generator=g)
    X[:4] *= 8  # outlier channels
    return X


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X @ X.T / X.shape[1]


@pytest.mark.parametrize("spec", ["int4-g32", "int8-channel", "int3-g64-asym", "int4-tensor"])
def test_identity_hessian_gives_rtn_exactly(spec):
    """With H = I the inverse Hessian is diagonal: no error feedback, so GPTQ is RTN."""
    fmt = parse_int_format(spec)
    W = torch.randn(48, 128)
    result = gptq(W, torch.eye(128) * 3.0, fmt)
    reference = fmt.quantize(W)
    assert torch.equal(result.qt.q, reference.q)
    torch.testing.assert_close(result.qt.scale, reference.scale, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["int4-g32", "int3-g32", "int4-channel", "int3-g64-asym", "int2-g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_well_below_rtn(spec, act_order):
    fmt = parse_int_format(spec)
    X = _calibration()
    W = torch.randn(96, 128)
    result = gptq(W, _hessian(X), fmt, act_order=act_order)
    rtn_error = ((W - fmt.quantize(W).dequantize()) @ X).pow(2).sum()
    assert result.output_error(W, X) < 0.7 * rtn_error
    q = result.qt.q
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax


def test_act_order_keeps_groups_in_original_order_with_static_scales():
    fmt = parse_int_format("int4-g32")
    X = _calibration()
    W = torch.randn(64, 128)
    result = gptq(W, _hessian(X), fmt, act_order=True)
    torch.testing.assert_close(result.qt.scale, fmt.quantize(W).scale, rtol=0, atol=0)  # from original W
    torch.testing.assert_close(result.qt.dequantize(), result.qt.scale.repeat_interleave(32, 1) * result.qt.q)


def test_mse_observer_inside_gptq_helps_at_3_bits():
    """A statistical claim, so the draw is pinned: over 20 seeds of W the MSE scales lowered
    GPTQ's output error in 18, by 4% on average (the other two: +0.8%, +2.4%)."""
    X = _calibration(seed=1)
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    W[:, 5] *= 6  # outlier weights: min/max scales waste the grid on them
    H = _hessian(X)
    minmax = gptq(W, H, parse_int_format("int3-g32")).output_error(W, X)
    mse = gptq(W, H, parse_int_format("int3-g32", observer="mse")).output_error(W, X)
    assert mse < minmax


def test_dead_inputs_and_rank_deficient_hessian():
    X = _calibration(n=32)  # n < in: H is singular, damping must carry it
    X[10:20] = 0  # inputs never active
    W = torch.randn(32, 128)
    result = gptq(W, _hessian(X), parse_int_format("int4-g32"))
    assert torch.isfinite(result.qt.dequantize()).all()
    assert (result.qt.dequantize()[:, 10:20] == 0).all()  # dead columns quantize to zero


def test_bad_inputs():
    fmt = parse_int_format("int4-g32")
    W = torch.randn(8, 64)
    H = torch.eye(64)
    H[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        gptq(W, H, fmt)
    with pytest.raises(UserError, match="does not divide"):
        gptq(torch.randn(8, 48), torch.eye(48), fmt)
    with pytest.raises(ValueError, match="expected"):
        gptq(W, torch.eye(32), fmt)


def test_accumulated_hessian_equals_the_batch_formula():
    X = torch.randn(5, 7, 16)  # (batch, tokens, in)
    H, n = None, 0
    for batch in X:
        H, n = accumulate_hessian(H, n, batch)
    flat = X.reshape(-1, 16).to(torch.float64)
    assert n == 35
    torch.testing.assert_close(H, 2 * flat.T @ flat / 35)


@pytest.mark.parametrize("spec", ["int4-g32-asym", "int3-channel"])
def test_row_stacked_linears_get_exactly_their_own_result(spec):
    """GPTQ rows are independent given H: quantizing q/k/v stacked equals quantizing each alone."""
    fmt = parse_int_format(spec, observer="mse")
    H = _hessian(_calibration())
    Ws = [torch.randn(rows, 128) for rows in (48, 16, 16)]
    stacked = gptq(torch.cat(Ws), H, fmt, act_order=True).qt
    row = 0
    for W in Ws:
        alone = gptq(W, H, fmt, act_order=True).qt
        part = stacked.rows(row, row + W.shape[0])
        row += W.shape[0]
        assert torch.equal(part.q, alone.q) and torch.equal(part.scale, alone.scale)


@pytest.mark.parametrize("spec", ["fp8", "fp8-channel", "nf4", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_float_formats_output_error_well_below_rtn(spec, act_order):
    """GPTQ is format-generic: the float and lookup grids gain as the integer ones do."""
    from modelpress.formats.floats import parse_format

    fmt = parse_format(spec)
    X = _calibration()
    W = torch.randn(96, 128)
    result = gptq(W, _hessian(X), fmt, act_order=act_order)
    rtn_qt = fmt.quantize(W)
    assert result.output_error(W, X) < 0.5 * ((W - rtn_qt.dequantize()) @ X).pow(2).sum()
    assert result.qt.fmt == fmt and result.qt.q.shape == W.shape
    assert torch.equal(result.qt.q, fmt.for_tensor(W)._round(result.qt.q))  # every element on the grid
    if spec == "nvfp4":  # the global scale comes from the original weight, as RTN's does
        assert result.qt.global_scale == rtn_qt.global_scale


def test_nvfp4_row_stacked_linears_share_one_global_scale():
    from modelpress.formats.floats import parse_format

    H = _hessian(_calibration())
    Ws = [torch.randn(48, 128), 3 * torch.randn(16, 128)]
    stacked = gptq(torch.cat(Ws), H, parse_format("nvfp4"), act_order=True).qt
    parts = [stacked.rows(0, 48), stacked.rows(48, 64)]
    assert parts[0].global_scale == parts[1].global_scale == pytest.approx(2688 / torch.cat(Ws).abs().max().item())


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_inverse_cholesky_factor_is_the_reference_one(damp):
    """One Cholesky of the reversed matrix and a triangular inverse give the factor the reference
    implementation gets from cholesky -> cholesky_inverse -> cholesky(upper)."""
    torch.manual_seed(0)
    X = torch.randn(96, 400, dtype=torch.float64) * torch.linspace(0.01, 5, 96, dtype=torch.float64)[:, None]
    H = 2 * X @ X.T / 400
    U, used = _damped_inverse_cholesky(H, damp)
    damped = H + damp * torch.diag(H).mean() * torch.eye(96, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert used == damp
    assert torch.allclose(U, reference, rtol=1e-8, atol=1e-10)
    assert torch.equal(U, U.triu())


def test_singular_hessian_is_damped_until_factorable():
    H = torch.zeros(8, 8)
    H[0, 0] = 1.0  # rank 1: not factorable without damping
    U, used = _damped_inverse_cholesky(H, 0.0)  # no damping asked for: it is added, not refused
    assert used > 0 and torch.isfinite(U).all()
