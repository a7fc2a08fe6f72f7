"""The one layer loop: calibrate, run the stages, pass on the compressed outputs, write, free, resume.

Peak memory is the embeddings, one decoder layer, and the calibration activations. The loop
captures the first layer's inputs on the calibration windows, then for each decoder layer:

1. loads its weights (from the safetensors shards, one layer at a time);
2. for each stage in order: runs the layer on its inputs with hooks collecting the statistics the
   stage needs, then lets the stage change the layer (a later stage sees the layer as the earlier
   one left it: its statistics are collected again);
3. runs the changed layer again on the same inputs, so that the next layer is calibrated on what
   the compressed model really feeds it (with W8A8 input rounding where a stage asked for it);
4. hands the results to the sink, frees the layer and saves the resume point.

A stage with a ``probe`` only observes (structured pruning's importance scores): its hooks watch
step 3's forward, after every changing stage, and it changes nothing, so it costs no extra pass.

After every layer a resumable sink holds the state (layers done, per-Linear numbers, the next
layer's inputs in ``resume-hidden-{i}.safetensors``); ``resume=True`` continues from the first
unfinished layer and gives the same output as an uninterrupted run. The loop names no method
and no output format: stages are :mod:`modelpress.pipeline.stages`, outputs
:mod:`modelpress.pipeline.sinks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modelpress.algorithms.hessian import HessianCollector
from modelpress.data import WindowProtocol, builtin_text, read_calibration, token_windows
from modelpress.errors import UserError
from modelpress.formats.activations import activation_fake_quant
from modelpress.models.layers import LayerwiseModel, run_layer
from modelpress.pipeline.stages import ABS_MAX, ABS_MEAN, HESSIAN, SQ_NORM, LayerStage, LinearResult
from modelpress.progress import track

logger = logging.getLogger("modelpress")

HIDDEN_FILE = "resume-hidden-{}.safetensors"  # the inputs of layer {} (outputs of the one before)


@dataclass
class PassResult:
    """What a layer pass measured (plain data for the record).

    Attributes:
        layers: checkpoint name of each Linear -> its format, ``numel``, ``nbytes``, error and
            the stages' numbers.
        elapsed_s: wall time, including the time before an interruption when resumed.
        resumed_at: the first layer this invocation ran, when it resumed; else ``None``.
        hidden: the last decoder layer's outputs on the calibration batches, as the compressed
            layers computed them (what the final norm and the output head receive).
    """

    layers: dict[str, dict]
    elapsed_s: float
    resumed_at: int | None = None
    hidden: list[torch.Tensor] | None = None


def calibration_ids(tokenizer, calib) -> torch.Tensor:
    """Token windows ``(n, seq_len [+ BOS])`` from a :class:`~modelpress.pipeline.recipe.CalibrationConfig`'s
    text, or the built-in one."""
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


def warn_if_too_few_tokens(n_tokens: int, widest: int) -> None:
    """Fewer calibration tokens than a Linear has inputs leaves its Hessian singular: say so."""
    if n_tokens < widest:
        logger.warning(
            "calibration has %d tokens, fewer than the %d inputs of the widest layer: its Hessian is singular and "
            "the result leans on damping; use more or longer calibration samples (128 x 512 is the usual)",
            n_tokens, widest,
        )


def fingerprint(model: str, config) -> str:
    """A short hash of the model and the settings: a resume must continue the same run."""
    blob = json.dumps({"model": str(Path(model).resolve()) if Path(model).exists() else model,
                       "config": config.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_layers(lm: LayerwiseModel, stages: list[LayerStage], formats: dict, sink, ids: torch.Tensor,
               batch_size: int, run_id: str = "", resume: bool = False) -> PassResult:
    """Apply ``stages`` in order to every decoder layer of ``lm``; hand each layer to ``sink``.

    Args:
        lm: the model, layers not yet loaded.
        stages: layer stages, applied in order to each layer.
        formats: module name -> format of each target Linear (the Linears the stages change).
        sink: where the results go (:mod:`modelpress.pipeline.sinks`); its ``resuming`` says
            whether a previous run's state is to be continued.
        ids: calibration token windows ``(n, seq_len)``.
        batch_size: windows per forward.
        run_id: identifies the model and settings (:func:`fingerprint`); a resume must match it.

    Returns:
        The per-Linear numbers and timings (:class:`PassResult`).
    """
    t0 = time.monotonic()
    batches = list(torch.split(ids, batch_size))
    layers: dict[str, dict] = {}
    start, spent = 0, 0.0
    if sink.resuming:
        state = sink.load_state()
        if state["fingerprint"] != run_id:
            raise UserError(f"{sink.scratch} was started with other settings or another model; "
                            "resume with the same command, or delete it to start over")
        start, layers, spent = state["layers_done"], state["layer_errors"], state["elapsed_s"]
        logger.info("resuming at layer %d/%d", start + 1, lm.n_layers)
    logger.info("capturing layer inputs for %d calibration windows of %d tokens", len(ids), ids.shape[1])
    capture = lm.capture(batches)
    if sink.resuming:
        hidden = _load_hidden(sink.scratch / state["hidden"], len(batches))
    else:
        hidden = capture.hidden
        sink.begin(lm)
    lm.free_outside_layers()
    changing = [s for s in stages if not hasattr(s, "probe")]
    observers = [s for s in stages if hasattr(s, "probe")]
    for i in track(range(start, lm.n_layers), total=lm.n_layers - start, what="layer"):
        layer = lm.load_layer(i)
        prefix = lm.layer_prefix(i)
        modules = {n: layer.get_submodule(n.removeprefix(prefix + ".")) for n in formats if n.startswith(prefix + ".")}
        where = f"layer {i + 1}/{lm.n_layers}"
        try:
            results, unchanged_outputs = _apply_stages(changing, layer, prefix + ".", modules, formats, hidden,
                                                       capture.kwargs[i], where)
        except UserError as e:  # the input itself is refused: a resume would fail the same way
            sink.abort(keep=False)
            raise (e if str(e).startswith(where) else UserError(f"{where}: {e}")) from None
        for name, result in results.items():
            layers[lm.checkpoint_name(name)] = result.entry(formats[name].name, modules[name].weight.numel())
        inputs = {n.removeprefix(prefix + "."): r.inputs for n, r in results.items() if r.inputs is not None}
        with contextlib.ExitStack() as probes, activation_fake_quant(layer, inputs):
            for observer in observers:  # they watch the forward that feeds the next layer: no extra pass
                probes.enter_context(observer.probe(layer))
            if unchanged_outputs is not None and not observers and not inputs:
                hidden = unchanged_outputs  # the layer is as it was in the statistics forward
            else:
                hidden = run_layer(layer, hidden, capture.kwargs[i], f"{where}, quantized,")
        for observer in observers:
            observer.run(layer, prefix + ".", modules, formats, None)
        sink.write_layer(lm, i, results)
        lm.free_layer(i)
        if sink.scratch is not None:
            _save_resume_point(sink, i, hidden, {"fingerprint": run_id, "layers_done": i + 1, "layer_errors": layers,
                                                 "elapsed_s": spent + time.monotonic() - t0})
    return PassResult(layers=layers, elapsed_s=spent + time.monotonic() - t0,
                      resumed_at=start if sink.resuming else None, hidden=hidden)


def _apply_stages(stages: list[LayerStage], layer: nn.Module, prefix: str, modules: dict[str, nn.Linear],
                  formats: dict, hidden: list[torch.Tensor], kwargs: list[dict],
                  where: str) -> tuple[dict[str, LinearResult], list[torch.Tensor] | None]:
    """Each stage in turn, on statistics collected from the layer as the stages before it left it.

    Also returns the layer's outputs from the last statistics forward when no stage changed the
    layer after it (every stage from there on ``keeps_layer``): the next layer's inputs, free."""
    results: dict[str, LinearResult] = {}
    outputs = None
    for stage in stages:
        with HessianCollector(modules, owner=layer, activation_stats=bool(stage.needs & {ABS_MEAN, ABS_MAX}),
                              hessian=HESSIAN in stage.needs, sq_norm=SQ_NORM in stage.needs) as stats:
            if stage.needs:
                outputs = run_layer(layer, hidden, kwargs, where)
        for name, result in stage.run(layer, prefix, modules, formats, stats).items():
            results[name] = results[name].then(result) if name in results else result
        if not getattr(stage, "keeps_layer", False):
            outputs = None
    return results, outputs


def _save_resume_point(sink, i: int, hidden: list[torch.Tensor], state: dict) -> None:
    # the activations file is named by layer and the state switches to it only once both are on
    # disk, so a kill at any instant leaves a consistent (state, activations) pair
    hidden_file = HIDDEN_FILE.format(i + 1)
    _save_hidden(sink.scratch / hidden_file, hidden)
    sink.save_state({**state, "hidden": hidden_file})
    (sink.scratch / HIDDEN_FILE.format(i)).unlink(missing_ok=True)


def _save_hidden(path: Path, hidden: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({f"h{i}": h.contiguous() for i, h in enumerate(hidden)}, tmp)
    tmp.replace(path)


def _load_hidden(path: Path, n: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return [tensors[f"h{i}"] for i in range(n)]
