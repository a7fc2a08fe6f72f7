"""Structured pruning's surgery: slice tensors to a plan, renumber the layers, edit the config.

Works on checkpoint tensors one at a time (the caller streams them from the shards), so it
needs about one tensor of memory. Which weights are sliced, along which axis and in which parts,
is the architecture table's :class:`~modelpress.models.arch.StructureSpec`; this module names no
model family.

Example::

    cutter = Surgery(plan, arch.structure, config_dict, layers_prefix="model.layers")
    for name, tensor in stream:
        new = cutter.apply(name, tensor)  # None: the tensor belongs to a dropped layer
"""

from __future__ import annotations

import torch

from modelpress.algorithms.structured import StructuredPlan
from modelpress.models.arch import Cut, StructureSpec

# config keys that list layer *indices* (renumbered); lists with one entry per layer are filtered
_LAYER_INDEX_KEYS = ("mlp_only_layers",)


def head_dim(config: dict) -> int:
    """The attention head size a config implies (explicit ``head_dim``, else hidden / heads)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


class Surgery:
    """Applies a :class:`StructuredPlan` to checkpoint tensors and to the config.

    Args:
        plan: what survives.
        spec: the architecture's removable groups.
        config: the source's ``config.json`` as a dict.
        layers_prefix: where the decoder layers are (``model.layers``).
    """

    def __init__(self, plan: StructuredPlan, spec: StructureSpec, config: dict, layers_prefix: str):
        self.plan, self.spec, self.config, self.prefix = plan, spec, config, layers_prefix + "."
        self.new_index = plan.new_index()
        self.d = head_dim(config)
        n_heads = config.get("num_attention_heads")
        self.sizes = {"mlp": config.get(spec.intermediate_size), "q": n_heads,
                      "kv": config.get("num_key_value_heads") or n_heads}
        self._cuts = {c.linear: c for c in spec.cuts}

    def apply(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """``(new name, sliced tensor)``, or ``None`` for a tensor of a dropped layer."""
        if not name.startswith(self.prefix):
            return name, tensor
        index, _, relative = name.removeprefix(self.prefix).partition(".")
        i = int(index)
        if i not in self.new_index:
            return None
        new_name = f"{self.prefix}{self.new_index[i]}.{relative}"
        linear, _, kind = relative.rpartition(".")
        cut = self._cuts.get(linear)
        if cut is None or (kind == "bias" and cut.axis == 1):  # a bias lives on the output side
            return new_name, tensor
        kept = self._kept_index(cut, i)
        if kept is None:
            return new_name, tensor
        return new_name, tensor.index_select(cut.axis if kind == "weight" else 0, kept).contiguous()

    def _kept_index(self, cut: Cut, i: int) -> torch.Tensor | None:
        """The kept positions along ``cut``'s axis, or ``None`` if the plan keeps all of them."""
        kept_units = {"mlp": self.plan.channels, "q": self.plan.q_heads, "kv": self.plan.kv_heads}
        if all(kept_units[p] is None for p in cut.parts):
            return None
        pieces, offset = [], 0
        for part in cut.parts:
            unit = 1 if part == "mlp" else self.d  # a head is head_dim consecutive rows
            n = self.sizes[part] * unit
            units = kept_units[part][i] if kept_units[part] is not None else range(self.sizes[part])
            pieces.append(offset + torch.tensor([u * unit + j for u in units for j in range(unit)], dtype=torch.long))
            offset += n
        return torch.cat(pieces)

    def edit_config(self) -> dict:
        """The pruned model's config: fewer layers (per-layer lists filtered, layer indices
        renumbered), the new MLP width and head counts, and an explicit ``head_dim`` (hidden
        size / heads no longer gives it)."""
        plan, out = self.plan, dict(self.config)
        kept_layers = sorted(self.new_index)
        for key, value in self.config.items():
            if isinstance(value, list) and len(value) == plan.n_layers:
                out[key] = [value[i] for i in kept_layers]
        for key in _LAYER_INDEX_KEYS:
            if isinstance(self.config.get(key), list):
                out[key] = [self.new_index[i] for i in self.config[key] if i in self.new_index]
        out["num_hidden_layers"] = len(kept_layers)
        if plan.channels is not None:
            out[self.spec.intermediate_size] = len(next(iter(plan.channels.values())))
        if plan.q_heads is not None:
            out["head_dim"] = self.d
            out["num_attention_heads"] = len(next(iter(plan.q_heads.values())))
            out["num_key_value_heads"] = len(next(iter(plan.kv_heads.values())))
        return out
