"""Collect ``H = 2 X X^T / n`` (and mean and max ``|x|`` per input channel) for one layer's Linears.

Linears that read the very same input tensor (q/k/v after one norm, gate/up after another)
share one accumulator: the Hessian is computed once per distinct input, not once per Linear.

Mixture-of-experts blocks (:class:`modelpress.models.moe.RoutedExperts`) call each expert's
Linears on the tokens routed to it only, so the hooks give per-expert Hessians. They also report,
without calling the Linears, what each expert would read were *all* tokens routed to it: those
"all-token" Hessians (:meth:`HessianCollector.all_token_hessian`) are the fallback for experts
that receive too few tokens. Gate/up of every expert read the block's input itself, so they
share one all-token accumulator; each expert's down projection has its own.
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.algorithms.gptq import accumulate_hessian


class HessianCollector:
    """Forward hooks on ``modules`` (name -> Linear) that accumulate each input's Hessian.

    Example::

        with HessianCollector({"q": layer.self_attn.q_proj}) as hc:
            layer(hidden)
        H, n_tokens = hc.hessian("q")
    """

    def __init__(self, modules: dict[str, nn.Linear], owner: nn.Module, activation_stats: bool = True,
                 hessian: bool = True, sq_norm: bool = False):
        self.modules = modules
        self.owner = owner  # the layer: its pre-hook marks the start of each forward
        self.activation_stats = activation_stats  # mean and max |x|: two passes over each input, for AWQ/SmoothQuant
        self.want_hessian = hessian  # False: count tokens only (a stage that reads no H, e.g. Wanda)
        self.want_sq_norm = sq_norm  # sum of x^2 per input channel (Wanda's ||X_j||^2): one pass
        self._sq: dict[str, torch.Tensor | None] = dict.fromkeys(modules)
        self._H: dict[str, torch.Tensor | None] = dict.fromkeys(modules)
        self._n: dict[str, int] = dict.fromkeys(modules, 0)
        self._abs: dict[str, torch.Tensor | None] = dict.fromkeys(modules)  # running sum of |x|
        self._amax: dict[str, torch.Tensor | None] = dict.fromkeys(modules)  # running max of |x|
        self._alias: dict[str, str] = {}  # name -> the name whose accumulator it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, first reader)
        self._name_of = {id(m): n for n, m in modules.items()}
        self._H_all: dict[str, torch.Tensor | None] = {}  # MoE experts: were all tokens routed to them
        self._n_all: dict[str, int] = {}
        self._alias_all: dict[str, str] = {}
        self._seen_all: dict[int, tuple[torch.Tensor, str]] = {}
        self._observed: list[nn.Module] = [m for m in owner.modules() if hasattr(m, "observe_all_tokens")]
        self._first_call = True
        self._handles: list = []

    def __enter__(self) -> HessianCollector:
        self._handles.append(self.owner.register_forward_pre_hook(self._begin))
        self._handles.append(self.owner.register_forward_hook(self._end))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        for m in self._observed:
            m.observe_all_tokens = self._observe_all_tokens
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self._seen_all.clear()
        for m in self._observed:
            m.observe_all_tokens = None

    def _begin(self, module, args) -> None:
        self._seen.clear()  # holds references, so no id can be reused within one forward
        self._seen_all.clear()

    def _end(self, module, args, output) -> None:
        self._seen.clear()
        self._seen_all.clear()
        self._first_call = False

    def _observe_all_tokens(self, inputs: dict[nn.Module, torch.Tensor]) -> None:
        for module, x in inputs.items():
            name = self._name_of.get(id(module))
            if name is None:  # not a target (excluded)
                continue
            if self._first_call:
                if id(x) in self._seen_all:
                    self._alias_all[name] = self._seen_all[id(x)][1]
                    continue
                self._seen_all[id(x)] = (x, name)
            elif name in self._alias_all:
                continue
            self._H_all[name], self._n_all[name] = accumulate_hessian(self._H_all.get(name), self._n_all.get(name, 0),
                                                                      x.detach())

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]  # the object itself: its identity tells which Linears share an input
            if self._first_call:
                if id(x) in self._seen:
                    self._alias[name] = self._seen[id(x)][1]
                    return
                self._seen[id(x)] = (x, name)
            elif name in self._alias:
                return
            x = x.detach()
            flat = x.reshape(-1, x.shape[-1])
            if self.activation_stats:
                self._observe_abs(name, flat.to(torch.float32))
            if self.want_sq_norm:
                sq = torch.linalg.vector_norm(flat.to(torch.float32), ord=2, dim=0).to(torch.float64).pow_(2)
                self._sq[name] = sq if self._sq[name] is None else self._sq[name] + sq
            if self.want_hessian:
                self._H[name], self._n[name] = accumulate_hessian(self._H[name], self._n[name], x)
            else:
                self._n[name] += flat.shape[0]

        return hook

    def _observe_abs(self, name: str, flat: torch.Tensor) -> None:
        # reductions straight from the input: ``flat.abs()`` would copy it (the widest input,
        # e.g. a down projection's, is the layer's largest activation)
        total = torch.linalg.vector_norm(flat, ord=1, dim=0).to(torch.float64)
        self._abs[name] = total if self._abs[name] is None else self._abs[name] + total
        if len(flat):  # NaN propagates through the max, so abs_max's callers see a bad activation
            amax = torch.linalg.vector_norm(flat, ord=float("inf"), dim=0)
            self._amax[name] = amax if self._amax[name] is None else torch.maximum(self._amax[name], amax)

    def hessian(self, name: str) -> tuple[torch.Tensor | None, int]:
        """``(H, tokens)`` for ``name``; ``(None, 0)`` when it saw no input (an idle expert)."""
        owner = self._alias.get(name, name)
        return self._H[owner], self._n[owner]

    def all_token_hessian(self, name: str) -> tuple[torch.Tensor | None, int]:
        """``(H, tokens)`` of an MoE expert's Linear had every token been routed to its expert;
        ``(None, 0)`` for a Linear outside an expert."""
        owner = self._alias_all.get(name, name)
        return self._H_all.get(owner), self._n_all.get(owner, 0)

    def sq_norm(self, name: str) -> torch.Tensor | None:
        """``sum_t x_tj^2`` per input channel over all calibration tokens (Wanda's ``||X_j||^2``)."""
        if not self.want_sq_norm:
            raise RuntimeError("this collector was made with sq_norm=False")
        owner = self._alias.get(name, name)
        return None if self._n[owner] == 0 else self._sq[owner].to(torch.float32)

    def owner_of(self, name: str) -> str:
        """The Linear whose accumulator ``name`` uses (itself unless it shares another's input)."""
        return self._alias.get(name, name)

    def owners(self) -> set[str]:
        """The Linears that own an accumulator (one per distinct input tensor)."""
        return {self._alias.get(name, name) for name in self.modules}

    def mean_abs(self, name: str) -> torch.Tensor | None:
        """Mean ``|x|`` per input channel over all calibration tokens (AWQ's activation scale)."""
        self._check_stats()
        owner = self._alias.get(name, name)
        n = self._n[owner]
        return None if n == 0 else (self._abs[owner] / n).to(torch.float32)

    def abs_max(self, name: str) -> torch.Tensor | None:
        """Max ``|x|`` per input channel over all calibration tokens (SmoothQuant's activation scale)."""
        self._check_stats()
        owner = self._alias.get(name, name)
        return None if self._n[owner] == 0 else self._amax[owner]

    def _check_stats(self) -> None:
        if not self.activation_stats:
            raise RuntimeError("this collector was made with activation_stats=False")
