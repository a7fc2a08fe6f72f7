"""SmoothQuant: migrate activation outliers into the weights, then quantize both to int8 (W8A8).

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438.

A few input channels of LLM activations are 10-100x larger than the rest, so a per-token int8
scale (set by the largest channel) leaves the other channels with a handful of levels. Weights
are easy to quantize. SmoothQuant divides each input channel ``j`` by ``s_j`` and multiplies the
matching weight column by it, ``Y = (X diag(s)^-1) (diag(s) W^T)``, which is exact in float, with
(Eq. 4)::

    s_j = max_t |X_tj|^alpha / max_i |W_ij|^(1 - alpha)

``alpha`` (the migration strength, 0.5 by default) moves difficulty from activations to
weights; ``max_i |W_ij|`` is taken over every Linear that reads ``X`` (q/k/v share one ``s``).
``diag(s)^-1`` is folded into the norm that produces ``X`` (see
:func:`modelpress.pipeline.scale_stages.fold_scale`), so the smoothed model has the same shape and cost.

Which Linears are smoothed: those fed by a norm (the architecture table's ``norm_to_linears``:
q/k/v and gate/up in Llama-like models), as in the paper's released code (``smooth_lm``), and,
beyond it, down_proj (OPT: fc2), whose input ``act(gate) * up`` is linear in up_proj's output
channel by channel, so ``diag(s)^-1`` folds exactly into up_proj's rows (the table's
``linear_to_linears``), and o_proj through v_proj's rows where each v channel feeds one o
column (multi-head attention: o reads a convex mix of v's rows). With grouped-query attention
one v channel feeds several o columns, so o_proj stays unsmoothed there.

Static vs dynamic inputs: a static per-tensor scale must cover the largest input ever seen.
Unsmoothed, the down_proj inputs carry "massive activations" (a few channels of a few tokens,
~1000x the rest; SmolLM2-135M: max 2892 against ~10), so one static scale rounds the rest of
them away: on SmolLM2 (4 ppl-512 windows), before down_proj was smoothed, static W8A8 cost +90%
perplexity where dynamic cost +1.3%, and static inputs everywhere except down_proj +0.6%. The
stage warns about Linears whose input range is still that spiky (:data:`STATIC_RANGE_WARN`).

The pure math lives here (tensors in, tensors out); the layer-by-layer stage that collects
``max |X_j|``, folds, and quantizes is :class:`modelpress.pipeline.scale_stages.SmoothQuantStage`.

Example:
    >>> import torch
    >>> X = torch.randn(256, 64); X[:, 3] *= 50          # one outlier channel
    >>> W = torch.randn(32, 64)
    >>> sm = smoothing_scales(X.abs().amax(0), [W], alpha=0.5)
    >>> bool(torch.allclose((X / sm.s) @ (W * sm.s).T, X @ W.T, atol=1e-3))   # exact in float
    True
    >>> sm.act_outlier_ratio_after < sm.act_outlier_ratio_before
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.errors import UserError

EPS = 1e-5  # floor of max|X_j|, max|W_j| and s_j, as in the reference code (dead channels)
# A static per-tensor int8 scale leaves the median channel's largest value 127 / ratio levels;
# past this ratio (4 levels) the Linear's input is mostly rounded away.
STATIC_RANGE_WARN = 32


@dataclass
class Smoothing:
    """The per-input-channel smoothing factor and its evidence (plain data for the record)."""

    s: torch.Tensor  # (in,): the input is divided by s, the weight columns multiplied by it
    alpha: float
    act_outlier_ratio_before: float  # max_j max|X_j| / median_j max|X_j|: how spiky the input is
    act_outlier_ratio_after: float  # the same for X / s

    def summary(self) -> dict:
        return {"sq_alpha": self.alpha, "sq_outlier_ratio_before": self.act_outlier_ratio_before,
                "sq_outlier_ratio_after": self.act_outlier_ratio_after,
                "sq_s_min": self.s.min().item(), "sq_s_max": self.s.max().item()}


def _outlier_ratio(amax: torch.Tensor) -> float:
    return (amax.max() / amax.median().clamp(min=EPS)).item()


def check_finite(name: str, act_absmax: torch.Tensor) -> None:
    """Raise a :class:`UserError` when a Linear's calibration inputs held NaN or inf."""
    if not torch.isfinite(act_absmax).all():
        raise UserError(f"the calibration inputs of {name} contain NaN or inf; the model overflows "
                        "on this text in this dtype: check the checkpoint, or calibrate in float32")


def smoothing_scales(act_absmax: torch.Tensor, Ws: list[torch.Tensor], alpha: float = 0.5) -> Smoothing:
    """Eq. 4: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` for Linears sharing one input.

    Args:
        act_absmax: ``max_t |X_tj|`` per input channel over the calibration tokens, ``(in,)``.
        Ws: weights ``(out_k, in)`` of every Linear that reads ``X``.
        alpha: migration strength in [0, 1].

    Returns:
        A :class:`Smoothing`.
    """
    a = act_absmax.to(torch.float32).clamp(min=EPS)  # (in,)
    w = torch.cat([W.detach().to(torch.float32).abs() for W in Ws]).amax(0).clamp(min=EPS)  # (in,)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=EPS)
    return Smoothing(s=s, alpha=alpha, act_outlier_ratio_before=_outlier_ratio(a),
                     act_outlier_ratio_after=_outlier_ratio(a / s))


def static_input_absmax(act_absmax: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """``max_t max_j |X_tj / s_j|``: the calibrated range of a Linear's (smoothed) input.

    Exact from the per-channel maxima (``max_t |X_tj / s_j| = max_t |X_tj| / s_j``), so the
    calibration data need not be run again after smoothing.
    """
    a = act_absmax.to(torch.float32)
    return (a if s is None else a / s.to(torch.float32)).max().item()


def input_range_ratio(act_absmax: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """``max_j m_j / median_j m_j`` with ``m_j = max|X_j| / s_j``: how much of a per-tensor range
    one channel takes. Massive activations (a few channels of a few tokens, often ~1000x the rest,
    typically at down_proj inputs, which have no norm to smooth into) make it large."""
    a = act_absmax.to(torch.float32)
    return _outlier_ratio(a if s is None else a / s.to(torch.float32))
