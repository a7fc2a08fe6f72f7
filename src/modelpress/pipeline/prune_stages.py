"""Layer stages that prune: magnitude, Wanda and SparseGPT (see :mod:`modelpress.pipeline.stages`).

Each zeroes weights of the layer's target Linears in place (SparseGPT also updates the kept
ones) and returns a :class:`~modelpress.pipeline.stages.LinearResult` that stores nothing (the
dense weight with its exact zeros is the result) and carries the mask, the measured sparsity and,
where calibration data reached the Linear, the relative output error. A later ``compress`` of the
pruned model keeps the zeros (GPTQ with ``keep_zeros``; RTN and AWQ keep them by construction).
"""

from __future__ import annotations

from modelpress.algorithms.rtn import LayerError
from modelpress.algorithms.structured import ImportanceCollector, LayerImportance
from modelpress.algorithms.sparsegpt import sparsegpt
from modelpress.algorithms.sparsity import PruneResult, magnitude
from modelpress.algorithms.wanda import wanda
from modelpress.pipeline.stages import HESSIAN, SQ_NORM, LinearResult, output_rel


def _pruned(linear, result: PruneResult, info: dict) -> LinearResult:
    W = linear.weight.data
    linear.weight.data = result.W.to(W.dtype)
    return LinearResult(stored=None, nbytes=W.numel() * W.element_size(), error=LayerError.between(W, result.W),
                        info={"sparsity": result.sparsity, **info}, mask=result.mask)


class MagnitudeStage:
    """The smallest ``|W|`` of each Linear (``per_row``: of each output row); no data."""

    needs = frozenset()

    def __init__(self, config, arch):
        self.config, self.pattern = config, config.sparsity_pattern()

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        return {name: _pruned(linear, magnitude(linear.weight.data, self.pattern, per_row=self.config.per_row), {})
                for name, linear in modules.items()}


class WandaStage:
    """``|W_ij| * ||X_j||`` within each output row, ``||X_j||`` over this layer's real inputs."""

    needs = frozenset({SQ_NORM})

    def __init__(self, config, arch):
        self.pattern = config.sparsity_pattern()

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        out = {}
        for name, linear in modules.items():
            x_sq = stats.sq_norm(name)
            if x_sq is None:  # no calibration token reached it (an idle expert): magnitude per row
                out[name] = _pruned(linear, magnitude(linear.weight.data, self.pattern, per_row=True),
                                    {"fallback": "magnitude (no calibration tokens reached this module)", "tokens": 0})
            else:
                out[name] = _pruned(linear, wanda(linear.weight.data, x_sq, self.pattern),
                                    {"tokens": stats.hessian(name)[1]})
        return out


class SparseGPTStage:
    """SparseGPT from each Linear's Hessian; Linears sharing an input share it."""

    needs = frozenset({HESSIAN})

    def __init__(self, config, arch):
        self.config, self.pattern = config, config.sparsity_pattern()

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        out = {}
        for name, linear in modules.items():
            W = linear.weight.data
            H, n_tokens = stats.hessian(name)
            if H is None or n_tokens == 0:
                out[name] = _pruned(linear, magnitude(W, self.pattern, per_row=True),
                                    {"fallback": "magnitude (no calibration tokens reached this module)", "tokens": 0})
                continue
            result = sparsegpt(W, H, self.pattern, block_size=self.config.block_size, damp=self.config.damp)
            out[name] = _pruned(linear, result, {"tokens": n_tokens, "output_rel_mse": output_rel(W, result.W, H)})
        return out


class StructuredScoreStage:
    """Structured pruning's measuring pass: each layer's channel, head and layer importance
    (:class:`~modelpress.algorithms.structured.ImportanceCollector`), on the unpruned model.

    It changes nothing: which channels, heads and layers go is decided once every layer is
    scored (layers are ranked against each other), and the surgery follows
    (:mod:`modelpress.models.surgery`). The scores accumulate in :attr:`scores`, in layer order.
    """

    needs = frozenset()

    def __init__(self, config, arch):
        self.config, self.spec = config, arch.structure
        self.scores: list[LayerImportance] = []
        self._probe: ImportanceCollector | None = None

    def probe(self, layer) -> ImportanceCollector:
        mlp_out = layer.get_submodule(self.spec.mlp_out) if self.config.mlp_keep is not None else None
        attn_out, n_heads = None, 0
        if self.config.heads_keep is not None:
            attn_out = layer.get_submodule(self.spec.attn_out)
            attention = layer.get_submodule(self.spec.attn_out.rpartition(".")[0])
            n_heads = attn_out.in_features // attention.head_dim
        self._probe = ImportanceCollector(layer, mlp_out, attn_out, n_heads)
        return self._probe

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        self.scores.append(self._probe.result())
        return {}
