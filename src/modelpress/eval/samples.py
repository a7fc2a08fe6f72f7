"""What a person would look at: greedy generations from a few prompts, and histograms of chosen weights.

Perplexity and KL say how much a step cost; a continuation that turns to repetition, or a weight
distribution collapsed onto a few levels, shows it. Both are plain data measured on the model as
the evaluator sees it (dequantized weights, the KV cache as it is evaluated), saved with the
step's other numbers and drawn by the report before and after.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(64, 32)
    >>> with torch.no_grad():
    ...     _ = lin.weight[:, :32].zero_()
    >>> h = histogram(lin.weight, bins=50)
    >>> sum(h["counts"]), h["zeros"]
    (2048, 0.5)
"""

from __future__ import annotations

import torch

from modelpress.eval.kv_cache import FakeQuantKVCache, cache_kwargs
from modelpress.models.arch import layer_index

# Plain openings that base and instruction-tuned models both continue as prose.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three most important things to remember when you travel are",
)
HISTOGRAM_BINS = 120


@torch.inference_mode()
def greedy_generations(model, tokenizer, prompts, new_tokens: int, kv_cache: str | None = None,
                       kv_scales: dict[int, tuple[float, float]] | None = None) -> list[dict]:
    """Each prompt continued greedily by ``new_tokens`` tokens (one prompt at a time, so no padding
    changes what a model writes), with the KV cache quantized as ``kv_cache`` when given.

    Returns:
        ``[{"prompt", "continuation", "tokens"}]``: the decoded new text and its token ids.
    """
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        kwargs = {}
        if kv_cache is not None:
            kwargs = cache_kwargs(model, FakeQuantKVCache(kv_cache, model.config, scales=kv_scales))
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             **kwargs)
        new = gen[0, ids.shape[1]:].tolist()
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True), "tokens": new})
    return out


def probe_linears(model: torch.nn.Module) -> list[str]:
    """The Linears whose histograms the report shows: the first Linear of the first decoder layer
    and the last Linear of the middle and last layers (attention's input and the MLP's output, in
    the usual order), named as in the state dict."""
    layers: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        index = layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(f"{name}.weight")
    if not layers:
        return []
    order = sorted(layers)
    picks = [layers[order[0]][0], layers[order[len(order) // 2]][-1], layers[order[-1]][-1]]
    return list(dict.fromkeys(picks))


def histogram(weight: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict:
    """The distribution of ``weight``'s values over ``bins`` equal bins spanning ``±max|w|``, and
    the fraction of exact zeros (pruning's, which a bin would hide among small values)."""
    w = weight.detach().float().flatten()
    m = w.abs().max().item() or 1.0
    counts = torch.histc(w, bins=bins, min=-m, max=m)
    return {"edges": torch.linspace(-m, m, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()],
            "zeros": (w == 0).sum().item() / w.numel(), "shape": list(weight.shape)}


def weight_histograms(model: torch.nn.Module, names) -> dict[str, dict]:
    """:func:`histogram` of each named weight the model has (a name it lacks, such as a layer a
    structured stage dropped, is left out)."""
    state = dict(model.named_parameters())
    return {name: histogram(state[name]) for name in names if name in state}
