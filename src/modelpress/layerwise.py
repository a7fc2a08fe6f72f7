"""Calibrated compression, layer by layer, resumable: the path for models larger than memory.

Peak memory is the embeddings, one decoder layer, and the calibration activations; every layer
is written to the output as soon as it is compressed. After each layer the run saves its state
(shards written, the next layer's input activations) in ``OUT.partial``; ``--resume`` continues
from the first unfinished layer and gives the same checkpoint as an uninterrupted run.

Methods are stages with one job: given a loaded layer whose Linears' Hessians were collected,
quantize the target Linears in place and return the stored artifacts (see :class:`GPTQStage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from modelpress.algorithms.awq import search_clip, search_scale
from modelpress.algorithms.gptq import gptq
from modelpress.algorithms.hessian import HessianCollector
from modelpress.algorithms.rtn import LayerError, rtn
from modelpress.algorithms.smoothquant import STATIC_RANGE_WARN, check_finite, input_range_ratio, smoothing_scales, static_input_absmax
from modelpress.compress import AWQConfig, CalibrationConfig, GPTQConfig, SmoothQuantConfig, finish_checkpoint
from modelpress.data import WindowProtocol, builtin_text, read_calibration, token_windows
from modelpress.errors import UserError
from modelpress.eval.fake_quant import activation_fake_quant
from modelpress.export.compressed_tensors import CompressedCheckpointWriter, storage_format
from modelpress.formats.activations import InputQuant
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel, run_layer
from modelpress.models.tensors import plan_targets
from modelpress.progress import track
from modelpress.record import build_record

logger = logging.getLogger("modelpress")

HIDDEN_FILE = "resume-hidden-{}.safetensors"  # the inputs of layer {} (outputs of the one before)


def calibration_ids(tokenizer, calib: CalibrationConfig) -> torch.Tensor:
    """Token windows ``(n, seq_len [+ BOS])`` from the configured text, or the built-in one."""
    if calib.text is None:
        text = builtin_text()
        logger.info("calibrating on modelpress's built-in text; pass your own for production runs")
    else:
        text = read_calibration(calib.text, calib.text_field)
    protocol = WindowProtocol("calibration", seq_len=calib.seq_len, n_windows=calib.samples)
    ids = token_windows(tokenizer, text, protocol)
    if len(ids) < calib.samples:
        logger.warning("calibration text gave %d windows of %d tokens, fewer than the %d asked for",
                       len(ids), calib.seq_len, calib.samples)
    return ids


class LayerStage(Protocol):
    """A calibrated method, as the runner sees it."""

    activation_stats: bool  # whether it reads ``hc.mean_abs``/``hc.abs_max`` besides the Hessians

    def compress_layer(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict,
                       hc: HessianCollector) -> dict[str, tuple]:
        """Compress ``modules`` (full name -> Linear) of ``layer`` in place, so that their weights
        become what the checkpoint holds; return ``name -> (QuantizedTensor, LayerError, info)``,
        or ``(..., info, InputQuant)`` for a Linear whose input is quantized too (W8A8)."""


def _rtn_fallback(W: torch.Tensor, fmt) -> tuple:
    qt, err = rtn(W, fmt)
    return qt, err, {"fallback": "rtn (no calibration tokens reached this module)", "tokens": 0}


class GPTQStage:
    """GPTQ on the target Linears of one layer, from Hessians of that layer's real inputs.

    Linears that read the same input (q/k/v, gate/up) and share a format are quantized in one
    GPTQ call on their row-stacked weights: GPTQ treats rows independently given ``H``, so this
    is exactly the per-Linear result, with one inverse Hessian and one column loop instead of three.

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

    activation_stats = False  # does it read mean/max |x| (besides H)?

    def __init__(self, config: GPTQConfig, arch):
        self.config = config

    def compress_layer(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict, hc) -> dict:
        out = {}
        for names in _stackable(modules, formats, hc):
            fmt = formats[names[0]]
            Ws = [modules[n].weight.data for n in names]
            H, n_tokens = hc.hessian(names[0])
            fallback = {}
            if n_tokens < Ws[0].shape[1]:
                H_all, n_all = hc.all_token_hessian(names[0])
                if H_all is not None:  # an MoE expert few tokens were routed to
                    fallback = {"fallback": f"gptq on all {n_all} tokens of the layer ({n_tokens} routed, fewer "
                                            f"than its {Ws[0].shape[1]} inputs)", "routed_tokens": n_tokens}
                    H, n_tokens = H_all, n_all
            if H is None or n_tokens == 0:  # no data, no second-order information
                for n, W in zip(names, Ws):
                    out[n] = _rtn_fallback(W, fmt)
            else:
                result = gptq(torch.cat(Ws), H, fmt, block_size=self.config.block_size, damp=self.config.damp,
                              act_order=self.config.act_order)
                H32, row = H.to(torch.float32), 0
                for n, W in zip(names, Ws):
                    qt = result.qt if len(names) == 1 else result.qt.rows(row, row + W.shape[0])
                    row += W.shape[0]
                    W_hat = qt.dequantize()
                    info = {"gptq_loss": result.loss, "damp": result.damp, "tokens": n_tokens,
                            "output_rel_mse": _output_rel(W, W_hat, H32), **fallback}
                    out[n] = (qt, LayerError.between(W, W_hat), info)
            for n, W in zip(names, Ws):
                modules[n].weight.data = out[n][0].dequantize().to(W.dtype)  # what the checkpoint holds
        return out


def _stackable(modules: dict[str, nn.Linear], formats: dict, hc) -> list[list[str]]:
    """``modules`` grouped into lists that share one Hessian and one (row-wise) format."""
    groups: dict[tuple, list[str]] = {}
    for name in modules:
        fmt = formats[name]
        key = (hc.owner_of(name), fmt) if fmt.granularity != "tensor" else (name, fmt)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class AWQStage:
    """AWQ: per-channel scales folded into the producers of the Linears' inputs (norms; up_proj
    for down_proj; v_proj for o_proj where the widths match), then clip search."""

    activation_stats = True  # does it read mean/max |x| (besides H)?

    def __init__(self, config: AWQConfig, arch):
        self.config = config
        self.arch = arch

    def compress_layer(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict, hc) -> dict:
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
                out[name] = _rtn_fallback(W, fmt)
            else:
                if name in scaled:  # the Linear now reads x / s: its Hessian is diag(1/s) H diag(1/s)
                    inv = (1 / scaled[name]).to(H.dtype)
                    H = H * inv[:, None] * inv[None, :]
                qt = search_clip(W, H, fmt, n_grid=self.config.n_grid) if self.config.clip else fmt.quantize(W)
                meta = {"tokens": n_tokens, "output_rel_mse": _output_rel(W, qt.dequantize(), H), **info.get(name, {})}
                out[name] = (qt, LayerError.between(W, qt.dequantize()), meta)
            linear.weight.data = out[name][0].dequantize().to(W.dtype)
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

    activation_stats = True  # does it read mean/max |x| (besides H)?

    def __init__(self, config: SmoothQuantConfig, arch):
        self.config = config
        self.arch = arch
        self.act = config.act_format()

    def compress_layer(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Linear], formats: dict, hc) -> dict:
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

    def _quantize(self, name: str, linear: nn.Linear, fmt, hc, sm) -> tuple:
        W = linear.weight.data
        H, n_tokens = hc.hessian(name)
        amax = hc.abs_max(name)
        if amax is None:
            if not self.act.dynamic:
                raise UserError(f"no calibration tokens reached {name}, so its static input scale is unknown; "
                                "calibrate on more text or use dynamic activations")
            qt, err, info = _rtn_fallback(W, fmt)
            return qt, err, {**info, "activations": self.act.name}, InputQuant(self.act)
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
                    output_rel_mse=_output_rel(W, qt.dequantize(), H), **({} if sm is None else sm.summary()))
        if inputs.scale is not None:
            info["input_scale"] = inputs.scale.item()
        linear.weight.data = qt.dequantize().to(W.dtype)
        return qt, LayerError.between(W, qt.dequantize()), info, inputs


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


def _output_rel(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W_hat - W) X||^2 / ||W X||^2`` from the Hessian: the relative layer-output error."""
    W, H = W.to(torch.float32), H.to(torch.float32)
    D = W_hat.to(torch.float32) - W
    num = ((D @ H) * D).sum(dtype=torch.float64)
    den = ((W @ H) * W).sum(dtype=torch.float64)
    return (num / den.clamp(min=1e-30)).item()


STAGES = {"gptq": GPTQStage, "awq": AWQStage, "smoothquant": SmoothQuantStage}


def _run_fingerprint(model: str, config) -> str:
    blob = json.dumps({"model": str(Path(model).resolve()) if Path(model).exists() else model,
                       "config": config.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compress_layerwise(model: str, config: GPTQConfig, out_dir: str, resume: bool = False) -> dict:
    """Compress ``model`` layer by layer with the calibrated method ``config`` names.

    Args:
        model: checkpoint folder, .gguf file or hub id.
        config: a calibrated method's config (e.g. :class:`~modelpress.compress.GPTQConfig`).
        out_dir: output folder; must not exist.
        resume: continue the interrupted run kept in ``OUT.partial``.

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    t0 = time.monotonic()
    source = loading.resolve(model)
    lm = LayerwiseModel(source)
    targets = plan_targets(lm.model, config)
    tokenizer = loading.load_tokenizer(source)
    ids = calibration_ids(tokenizer, config.calibration)
    batches = list(torch.split(ids, config.calibration.batch_size))
    check_expert_formats(lm, targets, config)
    warn_if_too_few_tokens(ids.numel(), max((targets.in_features[n] for n in targets.formats), default=0))
    stage = STAGES[config.method](config, lm.arch)
    fingerprint = _run_fingerprint(model, config)

    with CompressedCheckpointWriter(out_dir, resumable=True, resume=resume) as writer:
        layer_errors: dict[str, dict] = {}
        start, spent = 0, 0.0
        resume = writer.resuming
        if resume:
            state = writer.load_state()
            if state["fingerprint"] != fingerprint:
                raise UserError(f"{writer.tmp_dir} was started with other settings or another model; "
                                "resume with the same command, or delete it to start over")
            start, layer_errors, spent = state["layers_done"], state["layer_errors"], state["elapsed_s"]
            logger.info("resuming at layer %d/%d", start + 1, lm.n_layers)
        logger.info("capturing layer inputs for %d calibration windows of %d tokens", len(ids), ids.shape[1])
        capture = lm.capture(batches)
        hidden = capture.hidden
        if resume:
            hidden = _load_hidden(writer.tmp_dir / state["hidden"], len(batches))
        else:
            for name, tensor in lm.outside_layers():
                writer.add_tensor(name, tensor.to(lm.source_dtype(name)))
            writer.flush()  # to disk now, so that they leave memory with the model's copies
        lm.free_outside_layers()
        for i in track(range(start, lm.n_layers), total=lm.n_layers - start, what="layer"):
            layer = lm.load_layer(i)
            prefix = lm.layer_prefix(i)
            modules = {n: layer.get_submodule(n.removeprefix(prefix + "."))
                       for n in targets.formats if n.startswith(prefix + ".")}
            where = f"layer {i + 1}/{lm.n_layers}"
            try:
                with HessianCollector(modules, owner=layer, activation_stats=stage.activation_stats) as hc:
                    run_layer(layer, hidden, capture.kwargs[i], where)
                results = stage.compress_layer(layer, prefix + ".", modules, targets.formats, hc)
            except UserError as e:  # the input itself is refused: a resume would fail the same way
                writer.abort(keep=False)
                raise (e if str(e).startswith(where) else UserError(f"{where}: {e}")) from None
            quantized, inputs = {}, {}
            for name, (qt, err, info, *input_quant) in results.items():
                quantized[name] = (qt, *input_quant)
                if input_quant:
                    inputs[name.removeprefix(prefix + ".")] = input_quant[0]
                layer_errors[lm.checkpoint_name(name)] = {"format": targets.formats[name].name, "numel": qt.q.numel(),
                                      "nbytes": qt.nbytes, **err.__dict__, **info}
            del hc
            with activation_fake_quant(layer, inputs):  # W8A8: the next layer sees quantized-input outputs
                hidden = run_layer(layer, hidden, capture.kwargs[i], f"{where}, quantized,")  # passed on to the next layer
            _write_layer(writer, lm, i, quantized)
            lm.free_layer(i)
            # the activations file is named by layer and the state switches to it only once both
            # are on disk, so a kill at any instant leaves a consistent (state, activations) pair
            hidden_file = HIDDEN_FILE.format(i + 1)
            _save_hidden(writer.tmp_dir / hidden_file, hidden)
            writer.save_state({"fingerprint": fingerprint, "layers_done": i + 1, "layer_errors": layer_errors,
                               "elapsed_s": spent + time.monotonic() - t0, "hidden": hidden_file})
            (writer.tmp_dir / HIDDEN_FILE.format(i)).unlink(missing_ok=True)
        elapsed = spent + time.monotonic() - t0
        record = build_record(source, config, targets, layer_errors, elapsed)
        record["kept_unquantized"] = {lm.checkpoint_name(n): why for n, why in targets.kept.items()}
        record["calibration"] = {"windows": len(ids), "tokens_per_window": ids.shape[1],
                                 "text": config.calibration.text or "built-in"}
        if resume:
            record["resumed_at_layer"] = start
        finish_checkpoint(writer, source, lm.config, lm.model, targets, tokenizer, record, lm.checkpoint_name)
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return record


def check_expert_formats(lm: LayerwiseModel, targets, config) -> None:
    """Refuse MoE expert formats that transformers cannot load.

    transformers (5.x) loads a compressed-tensors checkpoint's experts by decompressing each
    expert's ``weight_packed`` / ``weight_scale`` at load time and stacking them into its fused
    3-D parameters; that path exists only for ``pack-quantized`` (symmetric int, weight-only) and
    FP8 experts: an ``int-quantized`` expert (asymmetric int, W8A8) fails to load.
    """
    if lm.arch.moe is None:
        return
    act = config.act_format()
    marker = f".{lm.arch.moe.experts}."
    bad = sorted({targets.formats[n].name for n in targets.formats
                  if marker in n and storage_format(targets.formats[n], act) != "pack-quantized"})
    if bad:
        raise UserError(f"mixture-of-experts experts in {', '.join(bad)}{' with quantized inputs' if act else ''} "
                        "cannot be loaded by transformers (it reads quantized experts only as packed, symmetric "
                        "int weights); use symmetric int weights (e.g. W4A16, W8A16) or --exclude the experts")


def warn_if_too_few_tokens(n_tokens: int, widest: int) -> None:
    """Fewer calibration tokens than a Linear has inputs leaves its Hessian singular: say so."""
    if n_tokens < widest:
        logger.warning(
            "calibration has %d tokens, fewer than the %d inputs of the widest layer: its Hessian is singular and "
            "the result leans on damping; use more or longer calibration samples (128 x 512 is the usual)",
            n_tokens, widest,
        )


def _write_layer(writer: CompressedCheckpointWriter, lm: LayerwiseModel, i: int, quantized: dict) -> None:
    state = lm.layer_list[i].state_dict()
    prefix = lm.layer_prefix(i) + "."
    for name in lm.layer_tensor_names(i):
        module = name.removesuffix(".weight")
        if module in quantized and name.endswith(".weight"):
            writer.add_quantized(lm.checkpoint_name(module), *quantized[module])
        else:
            writer.add_tensor(lm.checkpoint_name(name), state[name.removeprefix(prefix)].to(lm.source_dtype(name)))


def _save_hidden(path: Path, hidden: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({f"h{i}": h.contiguous() for i, h in enumerate(hidden)}, tmp)
    tmp.replace(path)


def _load_hidden(path: Path, n: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return [tensors[f"h{i}"] for i in range(n)]
