"""``prune``: the public verb that zeroes weights (magnitude, Wanda, SparseGPT), layer by layer.

The output is an ordinary dense checkpoint in the source's dtype whose pruned weights are exact
zeros, with no ``sparsity_config`` (since 2026 compressed-tensors, transformers and vLLM have
dropped sparse formats, and vLLM refuses a leftover one; one found in the input is dropped), so
transformers, vLLM and llama.cpp (through ``export --to gguf``) all load it. ``modelpress.json``
records each Linear's sparsity counted in the written tensors, the pattern, and what the
sparsity buys (:data:`WHAT_IT_BUYS`).

Example::

    from modelpress.prune import prune
    from modelpress.pipeline.recipe import WandaConfig
    record = prune("smollm2-135m/", WandaConfig(pattern="2:4", calibration={"text": "emma.txt"}), "smollm2-2of4/")
"""

from __future__ import annotations

import logging
import time

from modelpress.algorithms.rtn import LayerError
from modelpress.algorithms.sparsity import magnitude
from modelpress.errors import UserError
from modelpress.eval.guard import guard_output
from modelpress.export.checkpoint import CheckpointWriter, tokenizer_to_save
from modelpress.models import loading
from modelpress.models.arch import arch_for
from modelpress.models.layers import LayerwiseModel
from modelpress.models.tensors import prune_targets, tensor_stream
from modelpress.pipeline.recipe import CalibrationConfig, PruneConfig, StructuredConfig, stage_for
from modelpress.pipeline.runner import calibration_ids, fingerprint, run_layers
from modelpress.pipeline.sinks import FloatSink
from modelpress.progress import track
from modelpress.prune_structured import prune_structured
from modelpress.record import calibration_summary, record_header, to_json

logger = logging.getLogger("modelpress")

WHAT_IT_BUYS = {
    "unstructured": "no memory and no speed on dense kernels: the zeros are stored like any weight. "
                    "To shrink the model, quantize it (compress) or prune whole channels, heads or layers.",
    "2:4": "no memory; faster matmuls only on engines with sparse-tensor-core kernels (NVIDIA Ampere and "
           "later) that take 2:4 weights; dense kernels run it at the dense speed.",
    "n:m": "no memory and no speed on today's kernels (only 2:4 has hardware support); "
           "it is a quality experiment, or a step before quantization.",
}

# A prune stage without data in a layer pass (a magnitude stage before a quantizer that needs
# none): the runner still passes each layer's output on, and one short window keeps that cheap.
_NO_DATA = CalibrationConfig(samples=1, seq_len=16, batch_size=1)


def what_it_buys(pattern) -> str:
    if pattern.n is None:
        return WHAT_IT_BUYS["unstructured"]
    return WHAT_IT_BUYS["2:4" if (pattern.n, pattern.m) == (2, 4) else "n:m"]


def what_it_buys_from_record(record: dict) -> str | None:
    """One line for ``plan``: the checkpoint's sparsity and what it buys, from its run record."""
    pruned = record.get("pruned") if isinstance(record, dict) else None
    if not isinstance(pruned, dict) or pruned.get("sparsity") is None:
        return None
    return (f"{100 * pruned['sparsity']:.1f}% of the pruned Linears' weights are zero ({pruned.get('pattern')}); "
            f"the sizes below count them as stored, since sparsity buys {pruned.get('what_it_buys')}")


def prune(model: str, config: PruneConfig | StructuredConfig, out_dir: str, resume: bool = False, quality_guard: bool = True,
          make_sink=FloatSink) -> dict:
    """Prune ``model`` with the method ``config`` names and write a dense checkpoint to ``out_dir``
    (``structured``: a smaller one, see :mod:`modelpress.prune_structured`).

    Each layer is pruned on the outputs of the already-pruned layers before it (as the papers
    do); ``OUT.partial`` holds the resume point after every layer. Magnitude pruning reads no
    data, so it streams instead (:func:`prune_magnitude`). With ``quality_guard`` the
    output is scored against ``model`` on a little of the calibration text, and an exploded
    perplexity fails the run (see :mod:`modelpress.eval.guard`).

    Args:
        make_sink: ``(out_dir, resume=..., changed_dtype=..., artifacts=...) -> sink`` like
            :class:`~modelpress.pipeline.sinks.FloatSink` (tests pass one that fails).

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    if config.method == "structured":  # removes whole channels, heads and layers: its own two-step path
        if resume:
            raise UserError("structured pruning does not resume: its scoring pass writes nothing and the cut "
                            "streams in one go; run it again without --resume")
        return prune_structured(model, config, out_dir, quality_guard=quality_guard)
    if config.method == "magnitude" and not _fused_experts(model):
        if resume:
            logger.info("magnitude pruning streams the checkpoint once, with nothing to resume; starting over")
        record = prune_magnitude(model, config, out_dir)
    else:
        record = _prune_layers(model, config, out_dir, resume, make_sink)
    if quality_guard:
        record["quality_guard"] = guard_output(model, getattr(config, "calibration", None), out_dir)
    return record


def prune_magnitude(model: str, config: PruneConfig, out_dir: str) -> dict:
    """Magnitude pruning tensor by tensor, straight from the source's shards into the output.

    It needs no activations, so there is no calibration forward and no layer runner: the peak
    memory is about one tensor (the largest, often the embedding) plus the libraries, and the
    time is reading and writing the file.

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    t0 = time.monotonic()
    pattern = config.sparsity_pattern()
    source = loading.resolve(model)
    hf_config = loading.load_config(source)
    meta = loading.meta_model(hf_config)
    targets = prune_targets(meta, config)
    _note_dropped_sparsity_config(hf_config)
    copy_from = source.path if source.kind == "folder" else None
    tokenizer = tokenizer_to_save(source)
    layers: dict[str, dict] = {}
    with CheckpointWriter(out_dir) as writer:
        stream, n_tensors = tensor_stream(source, meta)
        for name, tensor in track(stream, total=n_tensors, what="tensor"):
            module = name.removesuffix(".weight")
            if not name.endswith(".weight") or module not in targets.formats:
                writer.add_tensor(name, tensor)
                continue
            result = magnitude(tensor, pattern, per_row=config.per_row)
            written = result.W.to(tensor.dtype)
            layers[module] = {"format": pattern.name, "numel": tensor.numel(),
                              "nbytes": tensor.numel() * tensor.element_size(),
                              **LayerError.between(tensor, written).__dict__,
                              "sparsity": result.sparsity, "zeros": int((written == 0).sum())}
            del result
            writer.add_tensor(name, written)
        elapsed = time.monotonic() - t0
        record = _record(source, config, pattern, targets, layers, elapsed, checkpoint_name=lambda n: n)
        writer.finish(config=loading.clean_config(hf_config).to_dict(), tokenizer=tokenizer,
                      extra_files={"modelpress.json": to_json(record, indent=2)}, copy_files_from=copy_from)
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return record


def _fused_experts(model: str) -> bool:
    """Whether transformers fuses the model's experts into 3-D tensors: the layer runner splits
    them into one Linear per expert, so magnitude pruning of such a model takes that path."""
    return arch_for(loading.load_config(loading.resolve(model))).moe is not None


def _prune_layers(model: str, config: PruneConfig, out_dir: str, resume: bool, make_sink) -> dict:
    """Wanda, SparseGPT, and magnitude on a mixture of experts: one pass of the layer runner."""
    t0 = time.monotonic()
    pattern = config.sparsity_pattern()
    source = loading.resolve(model)
    lm = LayerwiseModel(source)
    targets = prune_targets(lm.model, config)
    tokenizer = loading.load_tokenizer(source)
    calibration = getattr(config, "calibration", None)
    ids = calibration_ids(tokenizer, calibration or _NO_DATA)
    _note_dropped_sparsity_config(lm.config)
    with make_sink(out_dir, resume=resume, changed_dtype="source", artifacts=False) as sink:
        run = run_layers(lm, [stage_for(config, lm.arch)], targets.formats, sink, ids,
                         (calibration or _NO_DATA).batch_size, run_id=fingerprint(model, config))
        for name, zeros in sink.zeros.items():  # counted in the tensors as written
            run.layers[name]["zeros"] = zeros
        record = _record(source, config, pattern, targets, run.layers, run.elapsed_s, lm.checkpoint_name)
        if run.resumed_at is not None:
            record["resumed_at_layer"] = run.resumed_at
        if calibration is not None:
            record["calibration"] = calibration_summary(ids, calibration)
        sink.finish(config=loading.clean_config(lm.config).to_dict(), tokenizer=tokenizer,
                    extra_files={"modelpress.json": to_json(record, indent=2)},
                    copy_files_from=source.path if source.kind == "folder" else None)
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return record


def _record(source, config, pattern, targets, layers: dict, elapsed_s: float, checkpoint_name) -> dict:
    numel = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {
        **record_header(source, config, elapsed_s),
        "pruned": {"layers": len(layers), "params": numel, "zeros": zeros,
                   "sparsity": zeros / numel if numel else None, "pattern": pattern.name,
                   "what_it_buys": what_it_buys(pattern)},
        "kept_dense": {checkpoint_name(n): why for n, why in targets.kept.items()},
        "layers": layers,
    }


def _note_dropped_sparsity_config(hf_config) -> None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if qc and qc.get("sparsity_config"):
        logger.warning("the input's quantization_config has a sparsity_config; the output is dense and "
                       "carries none (vLLM refuses one)")
