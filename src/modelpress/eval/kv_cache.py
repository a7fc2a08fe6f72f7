"""KV-cache quantization as an evaluation option: keys and values rounded as they enter the cache.

A transformers ``DynamicCache`` whose ``update`` fake-quantizes the new keys and values before
storing them. ``update`` is where every attention implementation in transformers hands over its
keys (after RoPE and any k-norm: what an engine caches) and gets back the keys and values it
attends over, so the model attends over the quantized states, its own token's included, exactly
as an engine that writes the cache first and reads it back. The cache is built from the model
config, so sliding-window layers (Gemma 2/3, Mistral) keep their own layer type. Hooking
``k_proj`` outputs instead would round keys *before* RoPE, which is not what is stored.

Granularities (a scale per ``(batch, kv-head)`` and more, never across heads):

- ``int8``: symmetric, one scale per head per token, ``max |k_t,h| / 127`` over ``head_dim``
  (the granularity of per-token KV schemes; stricter than llama.cpp's ``q8_0`` 32-value blocks).
- ``fp8``: E4M3 (``torch.float8_e4m3fn``, max 448) with one scale per head, ``max |k_h| / 448``
  over the states of the first ``update`` (the prompt) and frozen afterwards; later values beyond
  the range saturate. vLLM's ``fp8`` cache uses one scale per layer (1.0 unless calibrated), so
  this is at least as fine-grained. In a one-pass evaluation the prompt is the whole window.
- ``fp8`` with ``scales`` (a checkpoint's ``kv_cache_scheme``, :mod:`modelpress.kv_scales`): one
  calibrated scale per layer for keys and one for values, exactly vLLM's static FP8 cache.

Example::

    cache = FakeQuantKVCache("int8", model.config)
    logits = model(input_ids=ids, **cache_kwargs(model, cache)).logits
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from modelpress.errors import UserError

KV_CACHE_FORMATS = ("int8", "fp8")
INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def check_kv_format(kind: str) -> str:
    """``kind`` if it is a known KV-cache format, else a :class:`UserError` naming the known ones."""
    if kind not in KV_CACHE_FORMATS:
        raise UserError(f"unknown KV-cache format {kind!r}; choose one of {', '.join(KV_CACHE_FORMATS)}")
    return kind


def fake_quant_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per ``(batch, head, token)``; ``x: (B, H, T, head_dim)``."""
    xf = x.to(torch.float32)
    s = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(xf / s).clamp_(-INT8_MAX - 1, INT8_MAX) * s).to(x.dtype)


def fp8_head_scale(x: torch.Tensor) -> torch.Tensor:
    """One E4M3 scale per ``(batch, head)``: ``max |x| / 448`` over tokens and ``head_dim``."""
    s = x.to(torch.float32).abs().amax(dim=(-2, -1), keepdim=True) / FP8_MAX
    return torch.where(s > 0, s, torch.ones_like(s))


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` cast to E4M3 (saturating at +-448) and back, times ``scale``."""
    y = (x.to(torch.float32) / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (y.to(torch.float32) * scale).to(x.dtype)


class FakeQuantKVCache(DynamicCache):
    """A ``DynamicCache`` storing keys and values as ``kind`` (``int8`` or ``fp8``) would hold them.

    Args:
        kind: ``"int8"`` or ``"fp8"``.
        config: the model config (layer types: full or sliding-window attention).
        scales: ``fp8`` only: layer index -> the ``(k_scale, v_scale)`` a checkpoint carries; without
            them each head's scale comes from the prompt.
    """

    def __init__(self, kind: str, config=None, scales: dict[int, tuple[float, float]] | None = None):
        super().__init__(config=config)
        self.kind = check_kv_format(kind)
        if scales is not None and self.kind != "fp8":
            raise ValueError("calibrated KV-cache scales are FP8 scales")
        self._fp8_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {  # layer -> (key, value) scales
            i: (torch.tensor(k), torch.tensor(v)) for i, (k, v) in (scales or {}).items()}
        self._static = scales is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.kind == "int8":
            k, v = fake_quant_int8(key_states), fake_quant_int8(value_states)
        else:
            if layer_idx not in self._fp8_scales:
                if self._static:
                    raise UserError(f"the checkpoint's kv_cache_scheme has no scales for layer {layer_idx}")
                self._fp8_scales[layer_idx] = (fp8_head_scale(key_states), fp8_head_scale(value_states))
            k_scale, v_scale = self._fp8_scales[layer_idx]
            k, v = fake_quant_fp8(key_states, k_scale), fake_quant_fp8(value_states, v_scale)
        return super().update(k, v, layer_idx, *args, **kwargs)


def cache_kwargs(model, cache) -> dict:
    """Forward keyword arguments that hand ``cache`` to ``model``: ``cache=`` (transformers >= 5.24
    names it so) or ``past_key_values=`` (earlier releases)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}
