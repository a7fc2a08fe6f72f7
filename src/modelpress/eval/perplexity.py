"""Perplexity and agreement with a baseline, over token windows (protocol ``ppl-512``).

For each window, ``ppl = exp(total NLL / number of predicted tokens)`` with labels = inputs
(every position but the first is predicted). With a baseline model, the same pass also gives
the mean per-token KL divergence ``KL(P_baseline || P_model)`` and the top-1 agreement (how
often both models' most likely next token is the same): the distance from the original
that perplexity alone hides.

Both models are run window by window, so only one window's logits per model live at a time.
With ``kv_cache="int8"|"fp8"`` the model attends over quantized keys and values
(:mod:`modelpress.eval.kv_cache`); the baseline never does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from modelpress.eval.kv_cache import FakeQuantKVCache, cache_kwargs, check_kv_format
from modelpress.progress import track


@dataclass
class EvalResult:
    """Plain numbers, ready for JSON."""

    protocol: str
    n_windows: int
    n_tokens: int
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    baseline_ppl: float | None = None
    kl: float | None = None  # mean KL(P_baseline || P_model) per token, nats
    top1_agreement: float | None = None
    kv_cache: str | None = None  # the KV-cache format the model was evaluated with (None: float)
    activations: str | None = None  # the input quantization applied (W8A8 checkpoints)

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: torch.nn.Module, ids: torch.Tensor, kv_cache: str | None = None,
            kv_scales: dict[int, tuple[float, float]] | None = None) -> torch.Tensor:
    device = next(model.parameters()).device
    if kv_cache is None:
        out = model(input_ids=ids.to(device), use_cache=False)
    else:  # a fresh cache per window: the window's keys/values are quantized as they are stored
        cache = FakeQuantKVCache(kv_cache, model.config, scales=kv_scales)
        out = model(input_ids=ids.to(device), **cache_kwargs(model, cache))
    return out.logits[:, :-1].float().cpu()


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    baseline: torch.nn.Module | None = None,
    protocol: str = "ppl-512",
    kv_cache: str | None = None,
    kv_scales: dict[int, tuple[float, float]] | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows: (n, T)``, and KL / top-1 agreement vs ``baseline``.

    Args:
        model: a causal LM returning ``.logits``.
        windows: token ids, one window per row (see :func:`modelpress.data.token_windows`).
        baseline: the reference model (usually the uncompressed one), or ``None``.
        protocol: the protocol name, recorded with the result.
        kv_cache: ``"int8"`` or ``"fp8"`` to evaluate ``model`` with a quantized KV cache.
        kv_scales: with ``"fp8"``: a checkpoint's per-layer ``(k_scale, v_scale)`` (else per-head
            scales from each window).

    Returns:
        An :class:`EvalResult`.
    """
    if kv_cache is not None:
        check_kv_format(kv_cache)
    nll_sum = base_nll_sum = kl_sum = 0.0
    agree = n_tokens = 0
    for window in track(windows, total=len(windows), what="eval window"):
        ids = window.unsqueeze(0)
        targets = ids[:, 1:].reshape(-1)
        logp = F.log_softmax(_logits(model, ids, kv_cache, kv_scales).view(targets.numel(), -1), dim=-1)
        nll_sum += -logp.gather(1, targets[:, None]).sum().item()
        n_tokens += targets.numel()
        if baseline is not None:
            base_logp = F.log_softmax(_logits(baseline, ids).view(targets.numel(), -1), dim=-1)
            base_nll_sum += -base_logp.gather(1, targets[:, None]).sum().item()
            kl_sum += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
    result = EvalResult(
        protocol=protocol,
        n_windows=len(windows),
        n_tokens=n_tokens,
        ppl=math.exp(nll_sum / n_tokens),
        nll=nll_sum / n_tokens,
        kv_cache=kv_cache,
    )
    if baseline is not None:
        result.baseline_ppl = math.exp(base_nll_sum / n_tokens)
        result.kl = kl_sum / n_tokens
        result.top1_agreement = agree / n_tokens
    return result
