"""Measuring is a library call: perplexity of a model, and how far it is from a baseline.

The CLI (``modelpress eval``, ``compress --eval``), the benchmarks and the pipelines all measure
through :func:`measure`, so a number means the same thing wherever it is quoted.

Example::

    result = measure("smollm2-int4/", "pride_and_prejudice.txt", windows=40, baseline="smollm2-135m/")
    result["ppl"], result["kl"], result["top1_agreement"]
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from modelpress.data import PPL_512, read_text, token_windows
from modelpress.errors import UserError
from modelpress.eval.fake_quant import activation_fake_quant, checkpoint_input_quant
from modelpress.eval.kv_cache import check_kv_format
from modelpress.eval.perplexity import evaluate
from modelpress.eval.samples import greedy_generations, probe_linears, weight_histograms
from modelpress.kv_scales import checkpoint_kv_scales
from modelpress.models import loading


def size_on_disk(source: loading.ModelSource) -> int | None:
    """Bytes of the weight files (safetensors shards or the GGUF file); None for a hub id."""
    if source.kind == "gguf":
        return Path(source.path).stat().st_size
    if source.kind == "folder":
        return sum(p.stat().st_size for p in source.safetensors_files())
    return None


def eval_windows(source: loading.ModelSource, text: str | None, windows: int,
                 base_source: loading.ModelSource | None = None, tokenizer=None) -> tuple[torch.Tensor, str]:
    """The ``ppl-512`` token windows of ``text`` in ``source``'s tokenizer, and the protocol's name
    for that many windows (``tokenizer``: ``source``'s, when the caller has it loaded already); a
    baseline that tokenizes the text differently is refused (KL and top-1
    agreement compare the same positions). Every engine's measurement starts here."""
    if text is None:
        raise UserError("no evaluation text: pass --text FILE (UTF-8 .txt or .jsonl)")
    raw = read_text(text)
    ids = token_windows(tokenizer or loading.load_tokenizer(source), raw, replace(PPL_512, n_windows=windows))
    protocol = PPL_512.name if windows == PPL_512.n_windows else f"{PPL_512.name} (first {len(ids)} windows)"
    if base_source is not None:
        base_ids = token_windows(loading.load_tokenizer(base_source), raw, replace(PPL_512, n_windows=windows))
        if not (base_ids.shape == ids.shape and (base_ids == ids).all()):
            raise UserError("the model and the baseline tokenize the text differently; compare models that share a tokenizer")
    return ids, protocol


def measure(model: str, text: str | None, windows: int, baseline: str | None = None,
             kv_cache: str | None = None, prompts=(), new_tokens: int = 32,
             histograms: list[str] | bool = False) -> dict:
    """Evaluate ``model`` (and compare with ``baseline``) on ``text``; plain-data result.

    Args:
        model: checkpoint folder, .gguf file or hub id.
        text: UTF-8 .txt or .jsonl to evaluate on (protocol ``ppl-512``).
        windows: how many 512-token windows (40 is the protocol).
        baseline: a reference model for KL divergence and top-1 agreement.
        kv_cache: ``int8``/``fp8``: evaluate with the KV cache quantized. A checkpoint that
            carries a ``kv_cache_scheme`` is always evaluated with its FP8 scales, as vLLM runs it
            (``kv_cache`` is then refused: the checkpoint already says).
        prompts: continue each greedily by ``new_tokens`` tokens, with the same KV cache
            (:func:`~modelpress.eval.samples.greedy_generations`): ``"generations"``.
        histograms: the weights (state-dict names) whose value histograms to keep, or ``True``
            for :func:`~modelpress.eval.samples.probe_linears`' choice: ``"weight_histograms"``,
            of the dequantized weights.

    Returns:
        ``{"text", "model", "size_bytes", "protocol", "ppl", "n_tokens", ...}`` and, with a
        baseline, ``"baseline_ppl"``, ``"kl"``, ``"top1_agreement"``, ``"baseline_size_bytes"``.


    A W8A8 checkpoint is evaluated with its Linear inputs fake-quantized the engine's way
    (:mod:`modelpress.eval.fake_quant`); ``kv_cache`` (``int8``/``fp8``) quantizes its KV cache.
    """
    source = loading.resolve(model)
    base_source = loading.resolve(baseline) if baseline else None
    # loaded once, for the windows and the generations (Gemma-3's tokenizer is 470 MB)
    tokenizer = loading.load_tokenizer(source) if text is not None else None
    ids, protocol = eval_windows(source, text, windows, base_source, tokenizer)
    if kv_cache is not None:
        check_kv_format(kv_cache)
    kv_scales = checkpoint_kv_scales(source)
    if kv_scales is not None:
        if kv_cache is not None:
            raise UserError(f"{model} carries its own FP8 KV-cache scales (kv_cache_scheme); evaluate it without "
                            "--kv-cache")
        kv_cache = "fp8"
    loaded = loading.load_model(source)
    inputs = checkpoint_input_quant(loaded)
    with activation_fake_quant(loaded, inputs):
        result = evaluate(
            loaded,
            ids,
            baseline=loading.load_model(base_source) if base_source else None,
            protocol=protocol,
            kv_cache=kv_cache,
            kv_scales=kv_scales,
        )
        generations = greedy_generations(loaded, tokenizer, prompts, new_tokens, kv_cache, kv_scales) if prompts else None
    if not math.isfinite(result.ppl):
        raise UserError(f"perplexity of {model} is {result.ppl}: its outputs overflow or are NaN; "
                        "evaluate it in float32, or check the weights")
    result.activations = ", ".join(sorted({q.fmt.name for q in inputs.values()})) or None
    if kv_scales is not None:
        result.kv_cache = "fp8 (the checkpoint's scales)"
    out = {"text": str(text), "model": model, "size_bytes": size_on_disk(source), **result.to_dict()}
    if generations is not None:
        out["generations"] = generations
    if histograms:
        names = probe_linears(loaded) if histograms is True else list(histograms)
        if _holds_codes(loaded, names):  # a compressed checkpoint: its float view, one copy at a time
            del loaded
            loaded = loading.load_model(source, dequantize=True)
        out["weight_histograms"] = weight_histograms(loaded, names)
    if base_source is not None:
        out["baseline"] = baseline
        out["baseline_size_bytes"] = size_on_disk(base_source)
    return out


def _holds_codes(model: torch.nn.Module, names: list[str]) -> bool:
    """Whether a compressed checkpoint's modules hold the named weights as codes and scales."""
    params = dict(model.named_parameters())
    return any(n not in params and n.removesuffix("weight") + "weight_scale" in params for n in names)
