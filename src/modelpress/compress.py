"""``compress``: the public verb that turns a float checkpoint into a quantized one.

One typed config per method, dispatched from one visible table
(:data:`modelpress.pipeline.recipe.METHODS`). The output is
a compressed-tensors checkpoint that plain ``transformers`` (and vLLM) load, plus
``modelpress.json``: the config, versions, sizes, timings and per-layer error.

Example::

    from modelpress.compress import compress, RTNConfig
    record = compress("smollm2-135m/", RTNConfig(bits=4, group_size=64), "smollm2-int4/")
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from modelpress.algorithms.rtn import rtn
from modelpress.errors import UserError
from modelpress.eval.guard import guard_output
from modelpress.export.compressed_tensors import storage_format
from modelpress.formats.activations import InputQuant
from modelpress.models import loading
from modelpress.models.arch import arch_for
from modelpress.models.layers import LayerwiseModel
from modelpress.models.loading import meta_model
from modelpress.models.tensors import head_name, plan_targets, prune_targets, tensor_stream
from modelpress.pipeline.recipe import (  # noqa: F401 (the configs, importable from here as before)
    METHODS,
    AWQConfig,
    CalibrationConfig,
    GPTQConfig,
    PruneConfig,
    QuantConfig,
    RTNConfig,
    SmoothQuantConfig,
    stage_for,
)
from modelpress.pipeline.runner import calibration_ids, fingerprint, run_layers, warn_if_too_few_tokens
from modelpress.pipeline.sinks import CompressedTensorsSink
from modelpress.pipeline.stages import LinearResult
from modelpress.progress import track
from modelpress.record import build_record, calibration_summary, read_record, to_json

logger = logging.getLogger("modelpress")


def compress(model: str, config: QuantConfig, out_dir: str, resume: bool = False, quality_guard: bool = True,
             prune: PruneConfig | None = None, prune_after: bool = False) -> dict:
    """Compress ``model`` with the method ``config`` names; see :func:`compress_rtn` and
    :func:`compress_calibrated` (which also prunes in the same layer pass when given ``prune``).

    With ``quality_guard`` the written model is then scored against ``model`` on a little of the
    calibration text (:mod:`modelpress.eval.guard`): an exploded perplexity fails the run and the
    output is renamed ``OUT.rejected``; the two perplexities go into the record.
    """
    config.act_format()  # W8A8's constraints on the weight format fail before any work
    if METHODS[config.method].calibrated or prune is not None:
        record = compress_calibrated(model, config, out_dir, resume=resume, prune=prune, prune_after=prune_after)
    else:
        if resume:
            raise UserError("--resume applies to calibrated methods; an RTN run is quick to redo")
        record = compress_rtn(model, config, out_dir)
    if quality_guard:
        record["quality_guard"] = guard_output(model, getattr(config, "calibration", None), out_dir)
    return record


def compress_rtn(model: str, config: RTNConfig, out_dir: str) -> dict:
    """Quantize ``model`` per ``config`` and write the checkpoint to ``out_dir``.

    Tensors stream one at a time from the safetensors shards when the checkpoint's names match
    the model's (peak memory: about one tensor); otherwise (GGUF input) the model is loaded once.
    ``out_dir`` appears only when complete.

    Args:
        model: checkpoint folder, .gguf file or hub id.
        config: the method's config.
        out_dir: output folder; must not exist.

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    from modelpress.export.checkpoint import tokenizer_to_save
    from modelpress.export.compressed_tensors import CompressedCheckpointWriter

    t0 = time.monotonic()
    source = loading.resolve(model)
    hf_config = loading.load_config(source)
    if arch_for(hf_config).moe:  # fail early, before any work, on an unsupported architecture
        raise UserError("RTN does not handle mixture-of-experts models yet (transformers fuses their experts); "
                        "use a calibrated method such as GPTQ, which quantizes each expert")
    meta = meta_model(hf_config)
    targets = plan_targets(meta, config)
    tokenizer = tokenizer_to_save(source)
    inputs = None if config.act_format() is None else InputQuant(config.act_format())
    layer_errors: dict[str, dict] = {}
    with CompressedCheckpointWriter(out_dir) as writer:
        stream, n_tensors = tensor_stream(source, meta)
        for name, tensor in track(stream, total=n_tensors, what="tensor"):
            module = name.removesuffix(".weight")
            fmt = targets.formats.get(module) if name.endswith(".weight") else None
            if fmt is None:
                writer.add_tensor(name, tensor)
                continue
            try:
                qt, err = rtn(tensor, fmt)
            except UserError as e:
                raise UserError(f"{module}: {e}") from None
            writer.add_quantized(module, qt, inputs)
            layer_errors[module] = {
                "format": fmt.name,
                "numel": tensor.numel(),
                "nbytes": qt.nbytes,
                **err.__dict__,
                **({} if inputs is None else {"activations": inputs.fmt.name}),
            }
        elapsed = time.monotonic() - t0
        record = build_record(source, config, targets, layer_errors, elapsed)
        finish_checkpoint(writer, source, hf_config, meta, targets, tokenizer, record)
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return record


def compress_calibrated(model: str, config: QuantConfig, out_dir: str, resume: bool = False,
                        make_sink=CompressedTensorsSink, prune: PruneConfig | None = None,
                        prune_after: bool = False) -> dict:
    """Compress ``model`` layer by layer with the calibrated method ``config`` names (or RTN, when
    it shares the pass with ``prune``).

    With ``prune`` (magnitude, Wanda or SparseGPT), each layer is pruned and quantized in the
    same pass: pruned first (the quantizer keeps the zeros, ``keep_zeros``), or with
    ``prune_after`` quantized first and then pruned on the quantized weights, whose pruned codes
    are set to the zero point so the weight stays on its grid (a mask-only method: SparseGPT's
    update would move the kept weights off it). Either way each layer is calibrated on the
    outputs of the layers before it as they are written.

    Peak memory is one decoder layer plus the calibration activations; each layer is written as
    soon as it is done, and ``OUT.partial`` holds the resume point (see
    :mod:`modelpress.pipeline.runner`).

    Args:
        model: checkpoint folder, .gguf file or hub id.
        config: a calibrated method's config (e.g. :class:`~modelpress.pipeline.recipe.GPTQConfig`).
        out_dir: output folder; must not exist.
        resume: continue the interrupted run kept in ``OUT.partial``.
        make_sink: ``(out_dir, resume=...) -> sink`` with a ``finish`` like
            :class:`~modelpress.pipeline.sinks.CompressedTensorsSink`'s (tests pass one that fails).

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    t0 = time.monotonic()
    source = loading.resolve(model)
    if "keep_zeros" in type(config).model_fields and config.keep_zeros is None:
        pruned_first = prune is not None and not prune_after
        config = config.model_copy(update={"keep_zeros": pruned_first or written_by_prune(source)})
    lm = LayerwiseModel(source)
    targets = plan_targets(lm.model, config)
    tokenizer = loading.load_tokenizer(source)
    calibration = _pass_calibration(config, prune)
    ids = calibration_ids(tokenizer, calibration)
    check_expert_formats(lm, targets, config)
    warn_if_too_few_tokens(ids.numel(), max((targets.in_features[n] for n in targets.formats), default=0))
    stages = [stage_for(config, lm.arch)]
    if prune is not None:
        _check_prune_in_pass(lm, targets, prune, prune_after)
        stages.insert(len(stages) if prune_after else 0, stage_for(prune, lm.arch))
    run_id = fingerprint(model, config) + ("" if prune is None else fingerprint(model, prune) + str(prune_after))
    head = head_name(lm.model)
    head = head if head in targets.formats else None
    if head is not None:
        lm.prepare_head(head)
    with make_sink(out_dir, resume=resume) as sink:
        run = run_layers(lm, stages, targets.formats, sink, ids, calibration.batch_size, run_id=run_id)
        if head is not None:
            run.layers[lm.checkpoint_name(head)] = quantize_head(lm, head, targets.formats[head], config, run.hidden,
                                                                 sink)
        record = build_record(source, config, targets, run.layers, run.elapsed_s)
        record["kept_unquantized"] = {lm.checkpoint_name(n): why for n, why in targets.kept.items()}
        record["calibration"] = calibration_summary(ids, calibration)
        if prune is not None:
            record["pruned"] = pruned_summary(prune, run.layers, "after quantizing" if prune_after else "before quantizing")
        if run.resumed_at is not None:
            record["resumed_at_layer"] = run.resumed_at
        finish_checkpoint(sink, source, lm.config, lm.model, targets, tokenizer, record, lm.checkpoint_name)
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return record


def quantize_head(lm: LayerwiseModel, head: str, fmt, config: QuantConfig, hidden, sink) -> dict:
    """Quantize the untied output head after the layer pass and write it to ``sink``; its record entry.

    The head's Hessian comes from what it receives: the last compressed layer's outputs on the
    calibration windows through the final norm (:meth:`~modelpress.models.layers.LayerwiseModel.head_inputs`),
    so no logits (tokens x vocabulary) are ever computed. GPTQ quantizes it with that Hessian;
    the other methods round it to nearest. *Simplification:* AWQ's and SmoothQuant's scales fold
    into the norm before a Linear, and the head's norm is shared with nothing, so they could; we
    keep the head to the data-free rounding there, and say so in the record.
    """
    from modelpress.algorithms.gptq import accumulate_hessian, gptq
    from modelpress.pipeline.stages import output_rel

    W = lm.deferred_tensor(f"{head}.weight").to(torch.float32)
    H, n, absmax = None, 0, 0.0
    for x in lm.head_inputs(hidden):
        H, n = accumulate_hessian(H, n, x)
        absmax = max(absmax, x.abs().max().item())
    logger.info("quantizing %s (%d x %d) in %s with %s", head, *W.shape, fmt.name,
                "GPTQ" if config.method == "gptq" else "round-to-nearest")
    if config.method == "gptq":
        quantized = gptq(W, H, fmt, block_size=config.block_size, damp=config.damp, act_order=config.act_order)
        qt, info = quantized.qt, {"gptq_loss": quantized.loss, "damp": quantized.damp}
    else:
        qt, _ = rtn(W, fmt)
        info = {} if config.method == "rtn" else {"method": f"rtn (the head is not part of {config.method}'s search)"}
    act = config.act_format()
    inputs = None if act is None else InputQuant(act) if act.dynamic else \
        InputQuant(act, act.static_scale(torch.tensor(absmax)))
    if inputs is not None:
        info["activations"] = inputs.fmt.name
    result = LinearResult.quantized(W, qt, {**info, "tokens": n, "output_rel_mse": output_rel(W, qt.dequantize(), H)},
                                    inputs=inputs)
    sink.write_tensor(lm.checkpoint_name(head), result)
    return result.entry(fmt.name, W.numel())


def _pass_calibration(config: QuantConfig, prune: PruneConfig | None) -> CalibrationConfig:
    """The calibration text of a pass: the quantizer's, else the pruner's, else one short window
    (RTN and magnitude read no data; the runner still passes each layer's outputs on)."""
    for c in (config, prune):
        if getattr(c, "calibration", None) is not None:
            return c.calibration
    return CalibrationConfig(samples=1, seq_len=16, batch_size=1)


def _check_prune_in_pass(lm: LayerwiseModel, targets, prune: PruneConfig, prune_after: bool) -> None:
    if prune.method == "structured":
        raise UserError("structured pruning changes the model's shapes: it runs as its own pass, before quantizing")
    if prune_after and prune.method == "sparsegpt":
        raise UserError("SparseGPT after quantizing would move the kept weights off the quantization grid "
                        "(its update changes them); prune with wanda or magnitude after a quantize stage, or prune first")
    pruned = set(prune_targets(lm.model, prune).formats)
    if pruned != set(targets.formats):
        odd = sorted(pruned ^ set(targets.formats))[0]
        raise UserError(f"in one pass the pruner and the quantizer take the same Linears, but {odd} is in one "
                        "and not the other; give both the same exclude list")


def pruned_summary(prune: PruneConfig, layers: dict[str, dict], when: str) -> dict:
    """The record's ``pruned`` entry for a pass that pruned: pattern, sparsity, what it buys."""
    from modelpress.prune import what_it_buys

    pattern = prune.sparsity_pattern()
    sparsities = [info["sparsity"] for info in layers.values() if "sparsity" in info]
    numels = [info["numel"] for info in layers.values() if "sparsity" in info]
    total = sum(numels)
    return {"method": prune.method, "pattern": pattern.name, "when": when,
            "sparsity": sum(s * n for s, n in zip(sparsities, numels)) / total if total else None,  # of the masks
            "what_it_buys": what_it_buys(pattern)}


def written_by_prune(source) -> bool:
    """Whether ``source`` is a checkpoint ``modelpress prune`` wrote (its record says so): then
    GPTQ keeps its zeros unless told otherwise."""
    pruned = source.kind == "folder" and "pruned" in read_record(source.path)
    if pruned:
        logger.info("%s was pruned by modelpress: GPTQ keeps its zeros (keep_zeros: false to let it fill them)",
                    source.path)
    return pruned


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


def finish_checkpoint(writer, source, hf_config, model: nn.Module, targets, tokenizer, record: dict,
                      checkpoint_name=lambda name: name) -> None:
    """Complete a compressed checkpoint: config with its quantization config (every Linear not
    in ``targets`` is listed as ignored, under its ``checkpoint_name``; a quantized head named in
    its targets), tokenizer, run record, and the source's side files."""
    head = head_name(model)
    writer.finish(
        config=targets.output_config(hf_config),
        tokenizer=tokenizer,
        ignore=[checkpoint_name(n) for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n not in targets.formats],
        named=[checkpoint_name(head)] if head in targets.formats else [],
        extra_files={"modelpress.json": to_json(record, indent=2)},
        copy_files_from=source.path if source.kind == "folder" else None,
    )
