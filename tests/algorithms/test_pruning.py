"""Magnitude, Wanda and SparseGPT: the masks the papers define, the OBS update, N:M patterns."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.gptq import gptq
from modelpress.algorithms.sparsegpt import sparsegpt
from modelpress.algorithms.sparsity import Pattern, magnitude
from modelpress.algorithms.wanda import wanda
from modelpress.errors import UserError
from modelpress.formats.integer import parse_int_format


def _calibration(d=64, n=1024, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d // 4, generator=g)
    X = mix @ torch.randn(d // 4, n, generator=g) + 0.3 * torch.randn(d, n, generator=g)
    X[:3] *= 8  # outlier features, as in LLMs
    return X


def test_wanda_mask_equals_a_brute_force_reference():
    W = torch.randn(6, 16)
    x_sq = torch.rand(16) * 10
    result = wanda(W, x_sq, Pattern(sparsity=0.5))
    for r in range(6):  # per output row: drop the 8 lowest |W_rj| * ||X_j||
        scores = [(abs(W[r, j].item()) * x_sq[j].sqrt().item(), j) for j in range(16)]
        dropped = {j for _, j in sorted(scores)[:8]}
        assert {j for j in range(16) if not result.mask[r, j]} == dropped
    assert torch.equal(result.W, torch.where(result.mask, W, torch.zeros(())))
    nm = wanda(W, x_sq, Pattern.parse("2:4"))
    assert (nm.mask.reshape(6, 4, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("spec", ["0.5", "2:4", "4:8"])
def test_sparsegpt_with_identity_hessian_is_magnitude_pruning(spec):
    """H = I: no correlation, so no update, and the OBS score is |w|^2 (one block of 64 columns)."""
    W = torch.randn(16, 64)
    pattern = Pattern.parse(spec)
    result = sparsegpt(W, torch.eye(64), pattern)
    reference = magnitude(W, pattern, per_row=False)
    assert torch.equal(result.mask, reference.mask)
    torch.testing.assert_close(result.W, reference.W)


def test_sparsegpt_update_equals_the_direct_obs_solution():
    """Pruning the first column only: every other weight lies to its right, so the sequential
    update is the exact OBS reconstruction w'_K = w H[:, K] H[K, K]^-1 (the least-squares optimum)."""
    X = _calibration(d=4, n=256)
    H = (2 * X @ X.T / 256).double()
    w = torch.tensor([[0.01, 1.0, -2.0, 3.0]])
    result = sparsegpt(w, H, Pattern(n=1, m=4), damp=1e-9)
    assert result.mask.tolist() == [[False, True, True, True]]
    K = [1, 2, 3]
    expected = (w.double() @ H[:, K]) @ torch.linalg.inv(H[K][:, K])
    torch.testing.assert_close(result.W[0, K].double(), expected[0], rtol=1e-4, atol=1e-5)
    assert result.W[0, 0] == 0


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_output_error(spec):
    X = _calibration()
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(48, 64)
    pattern = Pattern.parse(spec)

    def err(res):
        return ((res.W - W) @ X).pow(2).sum()

    mag, wnd, sgpt = magnitude(W, pattern), wanda(W, (X * X).sum(1), pattern), sparsegpt(W, H, pattern)
    assert err(sgpt) < err(wnd) < err(mag)
    for res in (mag, wnd, sgpt):
        assert res.sparsity == pytest.approx(pattern.fraction)
        assert (res.W[~res.mask] == 0).all() and not torch.signbit(res.W[~res.mask]).any()  # +0.0


def test_gptq_keeps_pruned_weights_at_zero_and_compensates_onto_the_rest():
    X = _calibration()
    H = 2 * X @ X.T / X.shape[1]
    pruned = sparsegpt(torch.randn(48, 64), H, Pattern.parse("2:4"))
    fmt = parse_int_format("int4-g32")
    result = gptq(pruned.W, H, fmt, mask=pruned.mask)
    Q = result.qt.dequantize()
    assert (Q[~pruned.mask] == 0).all()
    rtn = fmt.quantize(pruned.W).dequantize()  # RTN keeps the zeros too (0 is a code of the grid)
    assert (rtn[~pruned.mask] == 0).all()
    assert ((Q - pruned.W) @ X).pow(2).sum() < ((rtn - pruned.W) @ X).pow(2).sum()


@pytest.mark.parametrize("make, message", [
    (lambda: Pattern(sparsity=1.0), "in \\[0, 1\\)"),
    (lambda: Pattern(sparsity=-0.1), "in \\[0, 1\\)"),
    (lambda: Pattern.parse("4:4"), "0 < N < M"),
    (lambda: Pattern.parse("half"), "neither a fraction"),
    (lambda: magnitude(torch.randn(2, 6), Pattern.parse("2:4")), "multiple of 4"),
])
def test_bad_patterns_are_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()


@pytest.mark.parametrize("pattern", ["0.3", "0.5", "0.9", "2:4", "4:8", "1:8"])
@pytest.mark.parametrize("per_row", [True, False])
def test_masks_drop_exactly_the_count_lowest_first_on_heavily_tied_scores(pattern, per_row):
    """Weights with few distinct values (a dequantized int model) tie in whole levels: the mask
    still drops exactly the pattern's count, and never keeps a score below one it drops."""
    from modelpress.algorithms.sparsity import lowest

    g = torch.Generator().manual_seed(0)
    p = Pattern.parse(pattern)
    for _ in range(30):
        rows, cols = torch.randint(1, 6, (1,), generator=g).item(), 8 * torch.randint(1, 6, (1,), generator=g).item()
        score = torch.randint(0, 4, (rows, cols), generator=g).float()
        mask = lowest(score, p, per_row=per_row)
        if p.n is not None:
            groups, kept = score.reshape(-1, p.m), mask.reshape(-1, p.m)
        else:
            groups, kept = (score, mask) if per_row else (score.reshape(1, -1), mask.reshape(1, -1))
        k = p.n if p.n is not None else int(groups.shape[1] * p.sparsity)
        assert ((~kept).sum(1) == k).all()
        dropped_max = torch.where(kept, torch.tensor(-1.0), groups).amax(1)
        kept_min = torch.where(kept, groups, torch.tensor(99.0)).amin(1)
        assert (dropped_max <= kept_min).all()
        assert torch.equal(mask, lowest(score, p, per_row=per_row))  # seeded: the same mask every time


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
def test_ties_favour_no_column(pattern):
    """All scores equal: every column position is pruned in about the same share of rows (a fixed
    tie order would prune the same positions in every row)."""
    from modelpress.algorithms.sparsity import lowest

    share = (~lowest(torch.ones(2000, 16), Pattern.parse(pattern))).float().mean(0)
    assert (share - 0.5).abs().max() < 0.06
