"""Mixture-of-experts blocks as per-expert Linears, so that the layer runner can calibrate them.

transformers 5 stores a block's experts fused, as 3-D parameters (Mixtral, Qwen2/3-MoE:
``mlp.experts.gate_up_proj`` ``(E, 2I, H)`` = ``[gate; up]`` per expert, ``mlp.experts.down_proj``
``(E, H, I)``), and converts the per-expert tensors of a checkpoint on disk
(``block_sparse_moe.experts.N.w1/w3/w2`` for Mixtral) into them at load time. The layer runner
works on ``nn.Linear`` modules, and quantized checkpoints (compressed-tensors, what vLLM and
transformers load) store experts per expert too. So the runner swaps each fused experts module
for :class:`RoutedExperts`: the same computation, with one ``nn.Linear`` per projection and per
expert, named as the checkpoint names them. Each expert's Linears are called on exactly the
tokens routed to it, so forward hooks see per-expert inputs; an expert no token reaches is
never called.

While :attr:`RoutedExperts.observe_all_tokens` is set, the block also reports what each
expert's projections *would* read if every token of the batch were routed to it (the input
of gate/up, and ``act(gate x) * up x`` for down), without calling the Linears (no hook fires).
That is the fallback Hessian for experts that receive too few calibration tokens
(see :class:`modelpress.pipeline.stages.GPTQStage`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Expert(nn.Module):
    """One expert's gated MLP: ``down(act(gate(x)) * up(x))``, its Linears under checkpoint names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int):
        super().__init__()
        self.names = names  # (gate, up, down) attribute names, e.g. ("w1", "w3", "w2")
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=False))

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)


class RoutedExperts(nn.Module):
    """Drop-in for transformers' fused experts module: ``forward(x, top_k_index, top_k_weights)``.

    ``x``: ``(tokens, hidden)``; ``top_k_index``, ``top_k_weights``: ``(tokens, k)`` from the router.
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, names: tuple[str, str, str],
                 act_fn: Callable):
        super().__init__()
        self.n_experts = n_experts
        for e in range(n_experts):  # children "0", "1", ...: the checkpoint's experts.N
            self.add_module(str(e), Expert(names, hidden, intermediate))
        self.act_fn = act_fn
        # set by a statistics collector: called with {Linear: the input it would read} per expert
        self.observe_all_tokens: Callable[[dict[nn.Linear, torch.Tensor]], None] | None = None

    def experts(self) -> list[Expert]:
        return [getattr(self, str(e)) for e in range(self.n_experts)]

    @classmethod
    def like(cls, fused: nn.Module, names: tuple[str, str, str]) -> RoutedExperts:
        """An empty (same-device) stand-in with the shapes of ``fused`` (``gate_up_proj (E, 2I, H)``)."""
        E, two_i, H = fused.gate_up_proj.shape
        return cls(E, H, two_i // 2, names, fused.act_fn)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts()):
            gate, up, down = expert.projections()
            if self.observe_all_tokens is not None:
                with torch.no_grad():
                    h = self.act_fn(nn.functional.linear(x, gate.weight)) * nn.functional.linear(x, up.weight)
                self.observe_all_tokens({gate: x, up: x, down: h})
            token_idx, k_pos = torch.where(top_k_index == e)
            if len(token_idx) == 0:
                continue
            xe = x[token_idx]
            ye = down(self.act_fn(gate(xe)) * up(xe)) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, ye.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, layers: str, spec, copy_weights: bool = False) -> None:
    """Replace every decoder layer's fused experts (``spec.experts``) by :class:`RoutedExperts`
    in place; layers without that module (dense layers of Qwen-MoE) are left alone.
    ``copy_weights``: the Linears take the fused weights (a loaded model keeps computing the same);
    otherwise they are empty stand-ins, for the layer runner to fill."""
    for layer in model.get_submodule(layers):
        parent_name, _, child = spec.experts.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        fused = getattr(parent, child, None)
        if fused is not None and not isinstance(fused, RoutedExperts):
            with torch.device(fused.gate_up_proj.device):
                routed = RoutedExperts.like(fused, spec.projections)
            if copy_weights:
                with torch.no_grad():
                    for e, expert in enumerate(routed.experts()):
                        gate, up, down = expert.projections()
                        gate_up = fused.gate_up_proj[e]  # (2I, H) = [gate; up]
                        gate.weight.copy_(gate_up[: gate.out_features])
                        up.weight.copy_(gate_up[gate.out_features :])
                        down.weight.copy_(fused.down_proj[e])
                routed.to(fused.gate_up_proj.dtype)
            setattr(parent, child, routed)

