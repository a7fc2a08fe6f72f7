"""Layer stages: what a method does to one decoder layer, and what it hands back as plain data.

A stage is given a loaded layer, its target Linears (full name -> module), each Linear's format,
and the statistics it asked for (:attr:`LayerStage.needs`), collected on that layer's real
calibration inputs. It changes the layer in place, so that the layer holds the float weights the
output will compute with (a stage that folds scales changes norms and biases too), and returns
one :class:`LinearResult` per Linear: what is stored for it (quantized codes, GGUF bytes, or
nothing), its error, its numbers for the record, how its input is quantized, and its mask. The
runner (:mod:`modelpress.pipeline.runner`) never looks inside; the sinks
(:mod:`modelpress.pipeline.sinks`) decide what gets written.

Statistics are named, so the runner collects only what the stages of a pass read:

- ``hessian``: ``H = 2 X X^T / n`` per distinct input (every calibrated stage reads it);
- ``abs_mean``, ``abs_max``: mean and max ``|x|`` per input channel (AWQ, SmoothQuant);
- ``sq_norm``: ``sum x^2`` per input channel (Wanda), without the cost of a Hessian.

This module holds the stages without scale folding (RTN, GPTQ, GPTQ on GGUF block grids);
AWQ and SmoothQuant are in :mod:`modelpress.pipeline.scale_stages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from modelpress.algorithms.gguf_gptq import gguf_gptq
from modelpress.algorithms.gptq import gptq
from modelpress.algorithms.hessian import HessianCollector
from modelpress.algorithms.rtn import LayerError
from modelpress.errors import UserError
from modelpress.formats.activations import InputQuant

HESSIAN, ABS_MEAN, ABS_MAX, SQ_NORM = "hessian", "abs_mean", "abs_max", "sq_norm"


@dataclass
class LinearResult:
    """What a stage made of one Linear (plain data for the sinks, the record and the report).

    Attributes:
        stored: what a deployment sink stores for the weight: a ``QuantizedTensor``, GGUF block
            bytes (a ``uint8`` tensor, rows in checkpoint order), or ``None`` (the float weight
            the layer now holds is the result, e.g. a pruned weight).
        nbytes: the stored size of the weight.
        error: distance of the new weight from the one the stage was given.
        info: the method's numbers (losses, chosen scales, tokens seen...).
        inputs: how the Linear's input is quantized (W8A8), else ``None``.
        mask: ``True`` where a weight is kept, for a stage that prunes; else ``None``.
    """

    stored: Any
    nbytes: int
    error: LayerError | None = None
    info: dict = field(default_factory=dict)
    inputs: InputQuant | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def quantized(cls, W: torch.Tensor, qt, info: dict, inputs: InputQuant | None = None) -> LinearResult:
        """The result for ``W`` stored as the quantized tensor ``qt``."""
        return cls(stored=qt, nbytes=qt.nbytes, error=LayerError.between(W, qt.dequantize()), info=info,
                   inputs=inputs)

    def entry(self, fmt_name: str, numel: int) -> dict:
        """The run record's entry for this Linear: format, weights, stored bytes, error, numbers."""
        return {"format": fmt_name, "numel": numel, "nbytes": self.nbytes,
                **(self.error.__dict__ if self.error else {}), **self.info}

    def then(self, later: LinearResult) -> LinearResult:
        """This result followed by a later stage's on the same Linear: the later one is what is
        stored; numbers of both are kept (the later wins a shared key), a mask survives.

        A later stage that only prunes (stores nothing, carries a mask) after one that quantized
        keeps the quantized weight with the pruned codes set to zero: it stays on its grid."""
        if later.stored is None and later.mask is not None and self.stored is not None:
            if not hasattr(self.stored, "masked"):
                raise UserError(f"pruning after quantizing keeps the weights on an integer grid; "
                                f"{type(self.stored).__name__} weights cannot be pruned in place: prune first")
            later = LinearResult(stored=self.stored.masked(later.mask), nbytes=self.nbytes, error=later.error,
                                 info=later.info, inputs=later.inputs, mask=later.mask)
        return LinearResult(stored=later.stored, nbytes=later.nbytes, error=later.error,
                            info={**self.info, **later.info}, inputs=later.inputs or self.inputs,
                            mask=later.mask if later.mask is not None else self.mask)


class LayerStage(Protocol):
    """A method, as the runner sees it.

    A stage with ``probe(layer)`` only observes (structured pruning's importance collector): the
    runner enters that context manager of hooks around the forward that passes the layer's
    outputs on (after every changing stage), then calls ``run``, which must change nothing.
    """

    needs: frozenset[str]  # the statistics it reads: HESSIAN, ABS_MEAN, ABS_MAX

    def run(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict,
            stats: HessianCollector) -> dict[str, LinearResult]:
        """Change ``modules`` (full name -> Linear) of ``layer`` (names start with ``prefix``) in
        place to what the output holds; return one result per Linear."""


def output_rel(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W_hat - W) X||^2 / ||W X||^2`` from the Hessian: the relative layer-output error."""
    W, H = W.to(torch.float32), H.to(torch.float32)
    D = W_hat.to(torch.float32) - W
    num = ((D @ H) * D).sum(dtype=torch.float64)
    den = ((W @ H) * W).sum(dtype=torch.float64)
    return (num / den.clamp(min=1e-30)).item()


def rtn_fallback(W: torch.Tensor, fmt) -> LinearResult:
    """Round-to-nearest for a Linear no calibration token reached."""
    return LinearResult.quantized(W, fmt.quantize(W), {"fallback": "rtn (no calibration tokens reached this module)",
                                                       "tokens": 0})


def stackable(modules: dict[str, nn.Linear], formats: dict, stats: HessianCollector) -> list[list[str]]:
    """``modules`` grouped into lists that share one Hessian and one (row-wise) format.

    GPTQ treats rows independently given ``H``, so Linears reading one input (q/k/v, gate/up)
    in one format are quantized in one call on their row-stacked weights: exactly the per-Linear
    result, with one inverse Hessian and one column loop instead of three.
    """
    groups: dict[tuple, list[str]] = {}
    for name in modules:
        fmt = formats[name]
        row_wise = getattr(fmt, "granularity", "group") != "tensor"
        key = (stats.owner_of(name), fmt) if row_wise else (name, fmt)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class RTNStage:
    """Round-to-nearest inside a layer pass (``compress --method rtn`` streams instead)."""

    needs = frozenset()

    def __init__(self, config, arch):
        self.config = config

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        out = {}
        for name, linear in modules.items():
            W = linear.weight.data
            out[name] = LinearResult.quantized(W, formats[name].quantize(W), {})
            linear.weight.data = out[name].stored.dequantize().to(W.dtype)
        return out


class GPTQStage:
    """GPTQ on the target Linears of one layer, from Hessians of that layer's real inputs.

    Mixture-of-experts: each expert's Hessian comes from the tokens the router sent to it. An
    expert that received fewer tokens than its Linear has inputs (zero, for an expert the
    calibration text never reaches) would get a singular Hessian fitted to a handful of tokens;
    it is quantized instead by GPTQ with the Hessian of *all* the layer's calibration tokens
    passed through that expert (what it would see were it always chosen), recorded as
    ``"fallback"`` in the run record. That keeps second-order error compensation on the real
    input distribution of the block, where RTN would ignore the data altogether; its cost is one
    extra float forward of every expert on every token during calibration, and one more Hessian
    per expert projection. Only a Linear with no data at all (no tokens, no all-token Hessian) is
    rounded to nearest.
    """

    needs = frozenset({HESSIAN})

    def __init__(self, config, arch):
        self.config = config

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        out = {}
        for names in stackable(modules, formats, stats):
            fmt = formats[names[0]]
            Ws = [modules[n].weight.data for n in names]
            H, n_tokens, fallback = _hessian_or_fallback(stats, names[0], Ws[0].shape[1])
            if H is None or n_tokens == 0:  # no data, no second-order information
                out.update({n: rtn_fallback(W, fmt) for n, W in zip(names, Ws)})
            else:
                W_all = torch.cat(Ws)
                mask = (W_all != 0) if getattr(self.config, "keep_zeros", False) and (W_all == 0).any() else None
                result = gptq(W_all, H, fmt, block_size=self.config.block_size, damp=self.config.damp,
                              act_order=self.config.act_order, mask=mask)
                H32, row = H.to(torch.float32), 0
                for n, W in zip(names, Ws):
                    qt = result.qt if len(names) == 1 else result.qt.rows(row, row + W.shape[0])
                    row += W.shape[0]
                    info = {"gptq_loss": result.loss, "damp": result.damp, "tokens": n_tokens,
                            "output_rel_mse": output_rel(W, qt.dequantize(), H32), **fallback}
                    if mask is not None:
                        info["kept_zeros"] = True
                    out[n] = LinearResult.quantized(W, qt, info)
            for n, W in zip(names, Ws):
                modules[n].weight.data = out[n].stored.dequantize().to(W.dtype)  # what the checkpoint holds
        return out


def _hessian_or_fallback(stats: HessianCollector, name: str, in_features: int) -> tuple:
    """``(H, tokens, fallback info)``: an MoE expert few tokens were routed to gets the Hessian
    of all the layer's tokens (see :class:`GPTQStage`)."""
    H, n_tokens = stats.hessian(name)
    if n_tokens < in_features:
        H_all, n_all = stats.all_token_hessian(name)
        if H_all is not None:
            return H_all, n_all, {"fallback": f"gptq on all {n_all} tokens of the layer ({n_tokens} routed, fewer "
                                              f"than its {in_features} inputs)", "routed_tokens": n_tokens}
    return H, n_tokens, {}


class GGUFGPTQStage:
    """GPTQ onto the block grids of llama.cpp's types (``export --to gguf --calibrate gptq``).

    Each Linear's format is a :class:`~modelpress.formats.gguf_blocks.GGUFBlockFormat`;
    :func:`~modelpress.algorithms.gguf_gptq.gguf_gptq` picks the codes on llama.cpp's own block
    parameters, so the tensor type, headers and size are those of ``llama-quantize``'s output.
    Each row keeps GPTQ's codes or llama.cpp's plain ones, whichever has the lower output error on
    the calibration data (:func:`better_rows`), so a calibrated file is never worse than
    llama.cpp's on that objective. Linears without calibration tokens get the plain encoding.
    """

    needs = frozenset({HESSIAN})

    def __init__(self, damp: float = 0.01, block_size: int = 128):
        self.damp, self.block_size = damp, block_size

    def run(self, layer, prefix, modules, formats, stats) -> dict[str, LinearResult]:
        out = {}
        for names in stackable(modules, formats, stats):
            fmt = formats[names[0]]
            Ws = [modules[n].weight.data.to(torch.float32) for n in names]
            H, n_tokens = stats.hessian(names[0])
            W = torch.cat(Ws)
            try:
                data = fmt.quantize(W)  # llama.cpp's own encoding
                if H is not None and n_tokens:
                    data = better_rows(W, H.to(torch.float32), fmt, data,
                                       gguf_gptq(W, H, fmt, self.block_size, self.damp).data)
            except UserError as e:
                raise UserError(f"{', '.join(names)}: {e}") from None
            W_hat, row = fmt.dequantize(data, tuple(W.shape)), 0
            for n, Wn in zip(names, Ws):
                rows = slice(row, row + Wn.shape[0])
                row += Wn.shape[0]
                info = {"gguf_type": fmt.name, "tokens": n_tokens}
                if H is not None and n_tokens:
                    info["output_rel_mse"] = output_rel(Wn, W_hat[rows], H)
                stored = data[rows].clone()
                out[n] = LinearResult(stored=stored, nbytes=stored.numel(),
                                      error=LayerError.between(Wn, W_hat[rows]), info=info)
                modules[n].weight.data = W_hat[rows].to(modules[n].weight.dtype)
        return out


def better_rows(W: torch.Tensor, H: torch.Tensor, fmt, rtn: torch.Tensor, gptq: torch.Tensor) -> torch.Tensor:
    """Row by row, GPTQ's bytes or llama.cpp's, whichever gives the lower output error
    ``d H d^T`` on the calibration inputs. Both share each row's block headers (llama.cpp's own
    search), so a row from either is a valid row of the same type and size. GPTQ's greedy
    column order is not optimal: where a weight already sits on its grid (a model dequantized
    from this very type) the plain encoding can be exact and GPTQ slightly worse."""
    def row_err(data: torch.Tensor) -> torch.Tensor:
        D = fmt.dequantize(data, tuple(W.shape)) - W
        return ((D @ H) * D).sum(dim=1)

    keep_gptq = row_err(gptq) < row_err(rtn)  # a tie keeps llama.cpp's codes
    return torch.where(keep_gptq[:, None], gptq, rtn)
