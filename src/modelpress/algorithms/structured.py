"""Structured pruning's math: which MLP channels, attention heads and decoder layers to remove.

Importance is measured on calibration activations, once, on the unpruned model (one-shot, as
the papers do):

- **MLP channels and attention heads** (Minitron, Muralidharan et al., arXiv:2407.14679, sec. 2.2):
  a channel ``i`` by the activation ``a_i`` that feeds the MLP's output projection
  (``act(gate) * up``, or ``relu(fc1)``); a head ``h`` by the norm of its attention output
  ``||Attn(X W_Q^h, X W_K^h, X W_V^h)||_2`` (head ``h``'s slice of the output projection's
  input). Aggregated the paper's preferred way: mean over the sequence, L2 norm over the batch
  (of windows). The mean is taken of ``|a_i|``: a signed mean lets positive and negative
  activations cancel (the paper writes the plain sum; NVIDIA's implementation takes the magnitude).
- **Layers**, two criteria:
  - block influence (ShortGPT, Men et al., arXiv:2403.03853): ``BI_l = 1 - E_t cos(x_l,t, x_l+1,t)``
    over every token; the ``n`` layers with the lowest BI are removed (not necessarily adjacent);
  - angular distance (Gromov et al., arXiv:2403.17887): ``d(x_l, x_l+n) = arccos(cos) / pi`` on
    each window's last token, averaged; the block ``l .. l+n-1`` with the smallest distance is removed.

Widths stay uniform across layers (transformers and vLLM take one ``intermediate_size`` and one
head count per model); which channels and heads survive is chosen per layer.

Grouped-query attention: q head ``h`` reads kv head ``h // (H / KV)``. ``whole_groups=False``
keeps the same number of q heads in every group (the best of each group): the kv heads and the
KV cache stay, the groups shrink. ``whole_groups=True`` removes whole groups (ranked by the sum of
their q heads' importance): q and kv heads shrink together, and so does the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


def keep_count(n: int, fraction: float, multiple: int = 1) -> int:
    """How many of ``n`` units to keep for a kept ``fraction``: rounded to the nearest ``multiple``
    (kernels and GGUF's 32-wide blocks like aligned widths), at least one multiple, at most ``n``.

    >>> keep_count(1536, 0.75, 32), keep_count(64, 0.5), keep_count(100, 0.01, 32)
    (1152, 32, 32)
    """
    k = round(n * fraction / multiple) * multiple
    return max(min(k, n), min(multiple, n))


def top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the ``k`` largest ``scores``, in ascending order (the order they keep).
    Ties go to the lower index, so the choice is deterministic."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def head_counts(n_q: int, n_kv: int, keep: float, whole_groups: bool) -> tuple[int, int]:
    """``(q heads, kv heads)`` kept for a kept fraction ``keep`` (see :func:`choose_heads`).

    >>> head_counts(9, 3, 0.75, whole_groups=False), head_counts(9, 3, 0.75, whole_groups=True)
    ((6, 3), (6, 2))
    """
    group = n_q // n_kv
    if whole_groups:
        kept_kv = keep_count(n_kv, keep)
        return kept_kv * group, kept_kv
    return n_kv * keep_count(group, keep), n_kv


def choose_heads(scores: torch.Tensor, n_kv: int, keep: float, whole_groups: bool) -> tuple[list[int], list[int]]:
    """``(kept q heads, kept kv heads)`` for one layer, from the q heads' importance ``scores: (H,)``.

    Example:
        >>> s = torch.tensor([5., 1., 3., 4., 0., 2.])  # 6 q heads, 2 kv heads: groups {0,1,2}, {3,4,5}
        >>> choose_heads(s, 2, 2 / 3, whole_groups=False)
        ([0, 2, 3, 5], [0, 1])
        >>> choose_heads(s, 2, 0.5, whole_groups=True)
        ([0, 1, 2], [0])
    """
    n_q = len(scores)
    group = n_q // n_kv
    q_count, kv_count = head_counts(n_q, n_kv, keep, whole_groups)
    if whole_groups:
        kept_kv = top(scores.reshape(n_kv, group).sum(1), kv_count)
        return [g * group + j for g in kept_kv for j in range(group)], kept_kv
    per_group = q_count // n_kv
    kept_q = [g * group + j for g in range(n_kv) for j in top(scores[g * group:(g + 1) * group], per_group)]
    return kept_q, list(range(n_kv))


def lowest_influence(influence: list[float], n: int) -> list[int]:
    """ShortGPT: the ``n`` layers with the lowest block influence, ascending.

    >>> lowest_influence([0.9, 0.1, 0.3, 0.05, 0.8], 2)
    [1, 3]
    """
    return sorted(top(-torch.tensor(influence), n))


def closest_block(last_tokens: list[torch.Tensor], n: int) -> tuple[int, list[float]]:
    """Gromov et al.: the start ``l`` of the ``n`` consecutive layers whose input ``x_l`` and output
    ``x_l+n`` are closest in angle, and each start's distance.

    Args:
        last_tokens: ``x_0 .. x_L``, the hidden state at every layer boundary, each ``(windows, hidden)``
            (the last token of each calibration window).
        n: layers in the block.
    """
    distances = [angular_distance(last_tokens[l], last_tokens[l + n]) for l in range(len(last_tokens) - n)]
    return min(range(len(distances)), key=lambda l: (distances[l], l)), distances


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean arccos(cos(a_i, b_i)) / pi`` over rows."""
    cos = nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return (torch.arccos(cos) / math.pi).mean().item()


@dataclass
class LayerImportance:
    """One decoder layer's scores (plain data: they feed the record, the plan and the report).

    Attributes:
        channels: importance of each MLP channel ``(I,)``, or ``None`` where not measured.
        heads: importance of each q head ``(H,)``, or ``None``.
        influence: block influence ``1 - mean cos(x_in, x_out)``.
        last_in, last_out: the last token's hidden state of each window, into and out of the layer.
    """

    channels: torch.Tensor | None
    heads: torch.Tensor | None
    influence: float
    last_in: torch.Tensor
    last_out: torch.Tensor


class ImportanceCollector:
    """Hooks on one decoder layer that measure :class:`LayerImportance` while it runs.

    Example::

        with ImportanceCollector(layer, layer.mlp.down_proj, layer.self_attn.o_proj, n_heads=9) as probe:
            layer(hidden, **kwargs)
        scores = probe.result()
    """

    def __init__(self, layer: nn.Module, mlp_out: nn.Module | None, attn_out: nn.Module | None, n_heads: int):
        self.layer, self.mlp_out, self.attn_out, self.n_heads = layer, mlp_out, attn_out, n_heads
        self._channels = self._heads = None  # sums over windows of (mean over tokens)^2
        self._influence, self._tokens = 0.0, 0
        self._last_in: list[torch.Tensor] = []
        self._last_out: list[torch.Tensor] = []
        self._handles: list = []
        self._windows: tuple[int, int] = (0, 0)

    def __enter__(self) -> ImportanceCollector:
        self._handles.append(self.layer.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.layer.register_forward_hook(self._layer_hook, with_kwargs=True))
        if self.mlp_out is not None:
            self._handles.append(self.mlp_out.register_forward_pre_hook(self._mlp_hook))
        if self.attn_out is not None:
            self._handles.append(self.attn_out.register_forward_pre_hook(self._attn_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _begin(self, module, args, kwargs) -> None:
        self._windows = (args[0] if args else kwargs["hidden_states"]).shape[:2]  # (b, s)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(b, s, width)``: some layers flatten the tokens (OPT's MLP reads ``(b * s, width)``)."""
        return x.detach().float().reshape(*self._windows, x.shape[-1])

    def _mlp_hook(self, module, args) -> None:
        a = self._windowed(args[0])  # (b, s, I)
        per_window = a.abs().mean(dim=1)  # mean over the sequence
        self._channels = _add(self._channels, per_window.pow(2).sum(0))  # L2 over the batch, squared

    def _attn_hook(self, module, args) -> None:
        x = self._windowed(args[0])  # (b, s, H * d): the heads' outputs side by side
        b, s, width = x.shape
        head_norms = x.reshape(b, s, self.n_heads, width // self.n_heads).norm(dim=-1)  # (b, s, H)
        self._heads = _add(self._heads, head_norms.mean(dim=1).pow(2).sum(0))

    def _layer_hook(self, module, args, kwargs, output) -> None:
        x_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
        x_out = (output[0] if isinstance(output, tuple) else output).detach().float()
        cos = nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # (b, s)
        self._influence += (1 - cos).sum().item()
        self._tokens += cos.numel()
        self._last_in.append(x_in[:, -1].clone())  # a copy: a view would keep the whole batch alive
        self._last_out.append(x_out[:, -1].clone())

    def result(self) -> LayerImportance:
        sqrt = lambda t: None if t is None else t.sqrt()  # noqa: E731
        return LayerImportance(channels=sqrt(self._channels), heads=sqrt(self._heads),
                               influence=self._influence / max(self._tokens, 1),
                               last_in=torch.cat(self._last_in), last_out=torch.cat(self._last_out))


def _add(total: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    return t if total is None else total + t


@dataclass
class StructuredPlan:
    """What survives, per original layer index (plain data: saved in the record, diffable).

    Attributes:
        n_layers: decoder layers in the source.
        dropped: removed layers, ascending.
        channels: layer -> kept MLP channels (ascending), or ``None`` when the MLP keeps its width.
        q_heads, kv_heads: layer -> kept q / kv heads, or ``None`` when attention keeps its heads.
    """

    n_layers: int
    dropped: list[int]
    channels: dict[int, list[int]] | None = None
    q_heads: dict[int, list[int]] | None = None
    kv_heads: dict[int, list[int]] | None = None

    def new_index(self) -> dict[int, int]:
        """Original layer index -> its index in the pruned model, for the layers that stay."""
        kept = [i for i in range(self.n_layers) if i not in set(self.dropped)]
        return {old: new for new, old in enumerate(kept)}

    def to_dict(self) -> dict:
        """As JSON has it (layer indices as string keys), so the record in memory equals the file."""
        return {k: {str(i): v for i, v in value.items()} if isinstance(value, dict) else value
                for k, value in asdict(self).items()}
