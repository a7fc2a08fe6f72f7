"""Distillation losses: tensor math only (no model, no optimizer, no data).

**Logit distillation** (Hinton, Vinyals & Dean 2015, arXiv:1503.02531; EQ 7.2 of our seed):

    L = (1 − α)·CE(y, p_S) + α·τ²·KL(p_T^τ ‖ p_S^τ),     p^τ = softmax(z / τ)

per token, the KL summed over the vocabulary, then both terms averaged over tokens. The τ²
is the paper's: the soft term's gradient scales as 1/τ², so without it the blend α would mean
something different at every temperature. (The tools differ here: ModelOpt also averages
the KL over the vocabulary, which divides it by ~50k-262k; TRL's GKD drops τ². Ours is the
formula, and ``tests/train/test_losses.py`` checks it against a hand computation.)

**Generalized Jensen-Shannon divergence** (GKD, Agarwal et al. 2024, arXiv:2306.13649, eq. 3):

    JSD(β)(P_T ‖ P_S) = β·KL(P_T ‖ M) + (1 − β)·KL(P_S ‖ M),     M = β·P_T + (1 − β)·P_S

which interpolates between forward KL (β → 0, mass-covering) and reverse KL (β → 1,
mode-seeking); at the end points, where the mixture degenerates, the plain KLs are used, as the
paper and TRL do.

Logits are never held whole: :func:`chunked` computes a loss over slices of tokens and
recomputes each slice's logits in the backward pass (``torch.utils.checkpoint``), so at most
``chunk_tokens × vocab`` floats of logits are alive (Gemma's 262k vocabulary is 0.5 GB per
512-token window in float32 otherwise, twice with the teacher's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LossSums:
    """Sums over tokens (divide by ``n`` for means); each chunk adds its own."""

    loss: torch.Tensor
    ce: torch.Tensor  # Σ −log p_S(y), temperature 1
    soft: torch.Tensor  # Σ of the soft term as it enters the loss (τ²·KL, or the JSD)
    n: int

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(self.loss + other.loss, self.ce + other.ce, self.soft + other.soft, self.n + other.n)

    def means(self) -> dict[str, float]:
        """Per-token means as plain floats (for the log)."""
        return {"loss": self.loss.item() / self.n, "ce": self.ce.item() / self.n, "soft": self.soft.item() / self.n}


def _wide(z: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted to float32 for the softmax; float64 stays float64."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities ``(tokens, vocab)``; returns ``(tokens,)``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's JSD(β)(P_T ‖ P_S) per token, ``(tokens, vocab) -> (tokens,)``.

    ``beta=0`` is forward KL(P_T ‖ P_S), ``beta=1`` reverse KL(P_S ‖ P_T).

    Example:
        >>> s, t = torch.randn(3, 7), torch.randn(3, 7)
        >>> fwd = kl(F.log_softmax(t, -1), F.log_softmax(s, -1))
        >>> torch.allclose(generalized_jsd(s, t, beta=0.0), fwd)
        True
        >>> bool((generalized_jsd(s, t, beta=0.5) <= torch.log(torch.tensor(2.0))).all())  # JSD(½) ≤ ln 2
        True
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    if beta == 0.0:
        return kl(log_t, log_s)
    if beta == 1.0:
        return kl(log_s, log_t)
    # log M = log(β·P_T + (1 − β)·P_S), in log space for the tails
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)


def kd_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
            temperature: float = 1.0, alpha: float = 0.5) -> LossSums:
    """EQ 7.2 summed over the tokens of one chunk.

    Args:
        student_logits: ``(tokens, vocab)``.
        teacher_logits: ``(tokens, vocab)``, or ``None`` when ``alpha == 0`` (plain CE).
        targets: ``(tokens,)`` next-token ids.
        temperature: τ, applied to both distributions in the soft term only.
        alpha: λ, the soft term's weight.

    Example (α = 0 is cross-entropy, whatever the teacher says):
        >>> z, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        >>> s = kd_sums(z, torch.randn(4, 10), y, temperature=2.0, alpha=0.0)
        >>> torch.allclose(s.loss / s.n, F.cross_entropy(z, y))
        True
    """
    ce = F.cross_entropy(_wide(student_logits), targets, reduction="sum")
    if alpha == 0.0 or teacher_logits is None:
        if alpha != 0.0:
            raise ValueError("a soft term (alpha > 0) needs teacher logits")
        return LossSums(ce, ce.detach(), ce.new_zeros(()), targets.numel())
    log_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    soft = temperature**2 * kl(log_t, log_s).sum()
    return LossSums((1.0 - alpha) * ce + alpha * soft, ce.detach(), soft.detach(), targets.numel())


def topk_kd_sums(student_logits: torch.Tensor, teacher_topk: torch.Tensor, targets: torch.Tensor,
                 temperature: float = 1.0, alpha: float = 0.5) -> LossSums:
    """EQ 7.2 with the teacher's distribution kept as its top-k only (precomputed: the teacher need
    not be resident while the student trains, as DistillKit's sparse logits do).

    The soft term is τ² times the KL between both tempered distributions coarsened to k + 1
    outcomes: the teacher's k most likely tokens, and everything else as one (the teacher's tail
    mass ``1 − Σ_k p_T`` against the student's mass outside those k tokens). By the data
    processing inequality it is a lower bound of the full KL, and it is exact at k = vocabulary
    (:func:`kd_sums`). *Why not renormalize over the k*, the common shortcut: the student then
    learns to put no mass outside the k tokens, and its KL to the full teacher grows. Measured on
    a tiny llama (vocabulary 384, τ = 2, 60 steps, KL 0.345 before): renormalized top-8 0.752,
    this loss at k = 8 0.338 and at k = 64 0.173, the dense loss 0.158.

    Args:
        teacher_topk: ``(tokens, 2, k)``: the teacher's ``log p_T^τ`` of its k most likely tokens
            (row 0) and those tokens' ids (row 1, exact in float32 below 2**24).

    Example (k = vocabulary: the dense loss):
        >>> z_s, z_t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        >>> v, i = F.log_softmax(z_t / 2.0, -1).topk(10, dim=-1)
        >>> a = topk_kd_sums(z_s, torch.stack([v, i.float()], 1), y, temperature=2.0, alpha=0.7)
        >>> b = kd_sums(z_s, z_t, y, temperature=2.0, alpha=0.7)
        >>> bool(torch.allclose(a.loss, b.loss, atol=1e-5))
        True
    """
    ce = F.cross_entropy(_wide(student_logits), targets, reduction="sum")
    log_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_t, ids = teacher_topk[:, 0].float(), teacher_topk[:, 1].long()
    log_s_k = log_s.gather(-1, ids)
    head = (log_t.exp() * (log_t - log_s_k)).sum(-1)
    tail_t = _log_rest(log_t)  # log of the mass outside the k, for each model
    tail = tail_t.exp() * (tail_t - _log_rest(log_s_k))
    soft = temperature**2 * (head + tail).sum()
    return LossSums((1.0 - alpha) * ce + alpha * soft, ce.detach(), soft.detach(), targets.numel())


def _log_rest(log_p: torch.Tensor) -> torch.Tensor:
    """``log(1 − Σ p)`` over the last dimension, for probabilities that sum to at most one (floored
    where rounding makes the rest vanish: then it contributes nothing)."""
    total = torch.logsumexp(log_p, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(total)).clamp(min=-80.0)


def jsd_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             temperature: float = 1.0, beta: float = 0.5) -> LossSums:
    """GKD's loss over one chunk: the JSD(β) alone (the CE is reported, not trained on)."""
    ce = F.cross_entropy(_wide(student_logits.detach()), targets, reduction="sum")
    soft = generalized_jsd(student_logits, teacher_logits, beta, temperature).sum()
    return LossSums(soft, ce, soft.detach(), targets.numel())


Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states (tokens, d) -> logits (tokens, vocab)


def chunked(sums: Callable[..., LossSums], h_s: torch.Tensor, student_head: Head, targets: torch.Tensor,
            h_t: torch.Tensor | None = None, teacher_head: Head | None = None, chunk_tokens: int = 1024,
            **kwargs) -> LossSums:
    """``sums(student_logits, teacher_logits, targets, **kwargs)`` over slices of tokens.

    The heads run inside each slice; with more than one slice each runs under
    ``torch.utils.checkpoint``, so the slice's logits are freed after the forward and recomputed
    in the backward. The result equals the unchunked loss (up to float summation order).

    Args:
        h_s: student hidden states ``(tokens, d)``, with grad.
        student_head: hidden -> logits for the student (its LM head, softcap included).
        targets: ``(tokens,)``.
        h_t, teacher_head: the teacher's (no grad), or ``None`` for plain CE. ``h_t`` may be any
            per-token tensor ``(tokens, ...)`` that ``teacher_head`` turns into what ``sums`` takes
            (the identity for precomputed top-k logits).
        chunk_tokens: tokens per slice.
    """
    n = targets.numel()

    def one(h_s_c, h_t_c, y_c):
        with torch.no_grad():
            z_t = teacher_head(h_t_c) if h_t_c is not None else None
        r = sums(student_head(h_s_c), z_t, y_c, **kwargs)
        return r.loss, r.ce, r.soft

    if n <= chunk_tokens:
        return LossSums(*one(h_s, h_t, targets), n)
    total = None
    for start in range(0, n, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        part = LossSums(*checkpoint(one, h_s[sl], None if h_t is None else h_t[sl], targets[sl],
                                    use_reentrant=False), targets[sl].numel())
        total = part if total is None else total + part
    return total
