"""A model's shape for the planner, read from its config with no weights loaded.

The model is built on the ``meta`` device (names and shapes, no memory), so parameter counts
are exact for any architecture transformers knows, including tied embeddings and fused
mixture-of-experts weights; the KV-cache geometry comes from the config's standard fields.
"""

from __future__ import annotations

from typing import Collection

from torch import nn

from modelpress.errors import UserError
from modelpress.models.arch import text_config
from modelpress.models.loading import meta_model
from modelpress.models.tensors import head_is_tied, head_name
from modelpress.plan.memory import ModelShape


def _attention_layers(cfg) -> tuple[tuple[int, int, int | None], ...]:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    all_windowed = bool(window) and not layer_types and getattr(cfg, "use_sliding_window", True)
    out = []
    for i in range(cfg.num_hidden_layers):
        windowed = all_windowed or (i < len(layer_types) and layer_types[i] == "sliding_attention")
        out.append((2 * kv_heads * head_dim, heads * head_dim, window if windowed and window else None))
    return tuple(out)


def shape_from_config(hf_config, name: str, stored: Collection[str] = ()) -> ModelShape:
    """Count parameters (per quantizable Linear row length) and read the attention geometry.

    Quantizable: every ``nn.Linear`` except the output head, plus fused expert weights
    (3-D parameters of ``experts`` modules), as ``compress`` treats them. ``stored``, a
    checkpoint's tensor names: an untied head stored quantized there (``lm_head.weight_scale``,
    ``compress --quantize-head``) counts as a quantized Linear too.
    """
    cfg = text_config(hf_config)
    try:
        meta = meta_model(hf_config)
    except (ValueError, KeyError) as e:
        raise UserError(f"transformers cannot build a model from this config: {str(e).splitlines()[0]}") from None
    head = meta.get_output_embeddings()
    if head is not None and f"{head_name(meta)}.weight_scale" in stored and not head_is_tied(meta):
        head = None  # quantized like the Linears
    linear: dict[int, int] = {}
    counted: set[int] = set()
    expert_params = 0
    for mod_name, module in meta.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            linear[module.in_features] = linear.get(module.in_features, 0) + module.weight.numel()
            counted.add(id(module.weight))
            if ".experts." in mod_name:
                expert_params += module.weight.numel()
        elif mod_name.endswith("experts"):
            for p in module.parameters(recurse=False):
                if p.dim() == 3:
                    linear[p.shape[-1]] = linear.get(p.shape[-1], 0) + p.numel()
                    counted.add(id(p))
                    expert_params += p.numel()
    unique = {id(p): p for p in meta.parameters()}
    other = sum(p.numel() for i, p in unique.items() if i not in counted)
    total = sum(linear.values()) + other
    active = None
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if expert_params and n_experts and top_k:
        active = total - expert_params + expert_params * top_k // n_experts
    has_attention = all(hasattr(cfg, a) for a in ("num_attention_heads", "num_hidden_layers", "hidden_size"))
    return ModelShape(
        name=name,
        linear_params=linear,
        other_params=other,
        active_params=active,
        attention=_attention_layers(cfg) if has_attention else (),
        n_layers=getattr(cfg, "num_hidden_layers", 0),
        hidden_size=getattr(cfg, "hidden_size", 0),
    )
