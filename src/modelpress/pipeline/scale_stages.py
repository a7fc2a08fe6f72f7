"""Layer stages that fold per-channel scales into the layer before rounding: AWQ and SmoothQuant.

Both move a per-channel scale ``s`` from a Linear's input into the module that produces it (a
norm, ``up_proj`` for ``down_proj``, ``v_proj`` for ``o_proj`` where the widths match; the
architecture table's ``scale_pairs``), which is exact in float (:func:`fold_scale`), and then
round the rescaled weights. See :mod:`modelpress.pipeline.stages` for the stage protocol.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from modelpress.algorithms.awq import search_clip, search_scale
from modelpress.algorithms.gptq import gptq
from modelpress.algorithms.smoothquant import STATIC_RANGE_WARN, check_finite, input_range_ratio, smoothing_scales, static_input_absmax
from modelpress.errors import UserError
from modelpress.formats.activations import InputQuant
from modelpress.pipeline.stages import ABS_MAX, ABS_MEAN, HESSIAN, LinearResult, output_rel, rtn_fallback

logger = logging.getLogger("modelpress")


class AWQStage:
    """AWQ: per-channel scales folded into the producers of the Linears' inputs (norms; up_proj
    for down_proj; v_proj for o_proj where the widths match), then clip search."""

    needs = frozenset({HESSIAN, ABS_MEAN})

    def __init__(self, config, arch):
        self.config = config
        self.arch = arch

    def run(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict, hc) -> dict:
        scaled: dict[str, torch.Tensor] = {}  # module -> s: its input is now x / s
        info: dict[str, dict] = {}
        for norm_name, linear_names, offset in self.arch.scale_pairs(layer):
            names = [f"{prefix}{n}" for n in linear_names if f"{prefix}{n}" in modules]
            if not names:
                continue
            H, n_tokens = hc.hessian(names[0])
            if n_tokens == 0:
                continue
            search = search_scale([modules[n].weight.data for n in names], H, hc.mean_abs(names[0]),
                                  [formats[n] for n in names], n_grid=self.config.n_grid,
                                  family=self.config.scale_search)
            fold_scale(layer.get_submodule(norm_name), [layer.get_submodule(n) for n in linear_names],
                       search.s, offset)
            for n in names:
                scaled[n] = search.s
                info[n] = {"awq_alpha": search.alpha, "awq_duo": search.duo, "awq_loss_gain": 1 - search.loss / max(search.loss_unscaled, 1e-30)}
        out = {}
        for name, linear in modules.items():
            W, fmt = linear.weight.data, formats[name]
            H, n_tokens = hc.hessian(name)
            if n_tokens == 0:
                out[name] = rtn_fallback(W, fmt)
            else:
                if name in scaled:  # the Linear now reads x / s: its Hessian is diag(1/s) H diag(1/s)
                    inv = (1 / scaled[name]).to(H.dtype)
                    H = H * inv[:, None] * inv[None, :]
                qt = search_clip(W, H, fmt, n_grid=self.config.n_grid) if self.config.clip else fmt.quantize(W)
                meta = {"tokens": n_tokens, "output_rel_mse": output_rel(W, qt.dequantize(), H), **info.get(name, {})}
                out[name] = LinearResult.quantized(W, qt, meta)
            linear.weight.data = out[name].stored.dequantize().to(W.dtype)
        return out


class SmoothQuantStage:
    """SmoothQuant W8A8: smoothing folded into the norms, int8 weights (RTN or GPTQ), int8 inputs.

    Per producer -> consumers pair of the architecture table (norm -> q/k/v and gate/up, up ->
    down, v -> o where the widths match): ``s`` from the inputs' per-channel max and the weights
    (Eq. 4 of arXiv:2211.10438), folded into the producer. Static input scales are the max ``|x|``
    over the calibration tokens of each Linear's (smoothed) input, measured on the outputs of the
    already-compressed layers before it; within the layer, on its float forward (as GPTQ's
    Hessians are).
    """

    needs = frozenset({HESSIAN, ABS_MAX})

    def __init__(self, config, arch):
        self.config = config
        self.arch = arch
        self.act = config.act_format()

    def run(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict, hc) -> dict:
        smoothing = self.smooth(layer, prefix, modules, hc)
        return {name: self._quantize(name, linear, formats[name], hc, smoothing.get(name))
                for name, linear in modules.items()}

    def smooth(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], hc) -> dict:
        """Fold each norm group's ``s`` into the layer (exact in float); ``module -> Smoothing``
        for the target Linears that now read ``x / s``."""
        smoothing = {}
        for norm_name, linear_names, offset in self.arch.scale_pairs(layer):
            names = [f"{prefix}{n}" for n in linear_names if f"{prefix}{n}" in modules]
            amax = hc.abs_max(names[0]) if names else None
            if amax is None:
                continue
            check_finite(names[0], amax)
            sm = smoothing_scales(amax, [layer.get_submodule(n).weight.data for n in linear_names], self.config.alpha)
            fold_scale(layer.get_submodule(norm_name), [layer.get_submodule(n) for n in linear_names],
                       sm.s, offset)
            smoothing.update(dict.fromkeys(names, sm))
        return smoothing

    def _quantize(self, name: str, linear: nn.Linear, fmt, hc, sm) -> LinearResult:
        W = linear.weight.data
        H, n_tokens = hc.hessian(name)
        amax = hc.abs_max(name)
        if amax is None:
            if not self.act.dynamic:
                raise UserError(f"no calibration tokens reached {name}, so its static input scale is unknown; "
                                "calibrate on more text or use dynamic activations")
            result = rtn_fallback(W, fmt)
            result.info["activations"], result.inputs = self.act.name, InputQuant(self.act)
            return result
        check_finite(name, amax)
        s = None if sm is None else sm.s
        if s is not None:  # the Linear now reads x / s: its Hessian is diag(1/s) H diag(1/s)
            inv = (1 / s).to(H.dtype)
            H = H * inv[:, None] * inv[None, :]
        if self.config.weights == "gptq":
            result = gptq(W, H, fmt, block_size=self.config.block_size, damp=self.config.damp,
                          act_order=self.config.act_order)
            qt, info = result.qt, {"gptq_loss": result.loss, "damp": result.damp}
        else:
            qt, info = fmt.quantize(W), {}
        absmax, ratio = static_input_absmax(amax, s), input_range_ratio(amax, s)
        inputs = InputQuant(self.act) if self.act.dynamic else InputQuant(self.act, self.act.static_scale(absmax))
        if not self.act.dynamic and ratio > STATIC_RANGE_WARN:
            logger.warning("%s: its input's max |x| (%.4g) is %.0fx its median channel's; one static int8 scale "
                           "rounds most of it away: use dynamic activations or --exclude it", name, absmax, ratio)
        info.update(activations=self.act.name, tokens=n_tokens, input_absmax=absmax, input_range_ratio=ratio,
                    output_rel_mse=output_rel(W, qt.dequantize(), H), **({} if sm is None else sm.summary()))
        if inputs.scale is not None:
            info["input_scale"] = inputs.scale.item()
        linear.weight.data = qt.dequantize().to(W.dtype)
        return LinearResult.quantized(W, qt, info, inputs)


def fold_scale(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the producer's output by ``s`` and multiply the Linears' input columns by it: exact.

    A norm computing ``x_hat * (offset + weight) + bias`` gets ``weight' = (offset + weight) / s - offset``;
    a Linear producer (the table's ``linear_to_linears``) gets its rows and bias divided by ``s``.
    """
    with torch.no_grad():
        w = norm.weight.data.to(torch.float32)
        if isinstance(norm, nn.Linear):
            norm.weight.data = (w / s[:, None]).to(norm.weight.dtype)
        else:
            norm.weight.data = ((offset + w) / s - offset).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.data.to(torch.float32) / s).to(norm.bias.dtype)
        for linear in linears:
            linear.weight.data = (linear.weight.data.to(torch.float32) * s).to(linear.weight.dtype)
