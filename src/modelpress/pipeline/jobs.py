"""What one child process of a recipe run does: run one stage, or measure one model.

A job is plain JSON written by :mod:`modelpress.pipeline.run`; ``python -m modelpress.cli.worker
JOB RESULT`` calls :func:`run_job` and writes its result (or its one-line error) to ``RESULT``.
The stages call the same library verbs as the commands (``prune``, ``compress``, ``distill``,
``export``), so a stage of a recipe is exactly the command it names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modelpress.errors import UserError
from modelpress.pipeline.recipe import METHODS, CalibrationConfig
from modelpress.pipeline.yaml_recipe import Stage, stage_from_dump
from modelpress.record import to_json


def run_job(job: dict) -> dict:
    """Run a ``"stage"`` or ``"measure"`` job; its plain-data result."""
    if job["what"] == "stage":
        stages = tuple(stage_from_dump(s["index"], s["kind"], s["config"]) for s in job["stages"])
        run_stage(stages, job["source"], job["output"], original=job["original"],
                  calibration=CalibrationConfig(**job["calibration"]), resume=job["resume"],
                  quality_guard=job.get("quality_guard", True))
        return {}
    return measure_model(job["model"], job["text"], job["windows"], job["baseline"], job["format"], job["device"],
                         kv_cache=job.get("kv_cache"), prompts=job.get("prompts", ()),
                         new_tokens=job.get("new_tokens", 0), histograms=job.get("histograms", False))


def resumable(stages: tuple[Stage, ...]) -> bool:
    """Whether the unit's verb continues from its ``OUT.partial`` (the layer-pass and training verbs)."""
    if len(stages) > 1:  # prune and quantize in one layer pass
        return True
    stage, = stages
    if stage.kind in ("prune", "quantize"):
        return stage.config.method != "structured" and METHODS[stage.config.method].calibrated
    return stage.kind in ("heal", "qat", "distill")


def run_stage(stages: tuple[Stage, ...], source: str, output: str, original: str, calibration: CalibrationConfig,
              resume: bool = False, quality_guard: bool = True) -> None:
    """Run one stage, or a prune and a quantize stage in one layer pass, on ``source`` into the
    folder ``output`` (see :mod:`modelpress.pipeline.run`); ``quality_guard``: a prune or
    quantize output far worse than its source stops the recipe (``compress``'s guard)."""
    partial = Path(f"{output}.partial")
    if resume and not resumable(stages):  # a quick stage's scratch from an interrupted run: redo it
        shutil.rmtree(partial, ignore_errors=True)
        resume = False
    if len(stages) == 2:
        from modelpress.compress import compress

        quantize, = (s for s in stages if s.kind == "quantize")
        prune, = (s for s in stages if s.kind == "prune")
        compress(source, quantize.config, output, resume=resume, prune=prune.config,
                 prune_after=prune.index > quantize.index, quality_guard=quality_guard)
        return
    stage, = stages
    c = stage.config
    if stage.kind == "prune":
        from modelpress.prune import prune

        prune(source, c, output, resume=resume, quality_guard=quality_guard)
    elif stage.kind == "quantize":
        from modelpress.compress import compress

        compress(source, c, output, resume=resume, quality_guard=quality_guard)
    elif stage.kind == "export":
        _export(c, source, output, calibration)
    elif stage.kind == "kv-cache":
        from modelpress.kv_scales import carry_kv_cache
        from modelpress.models import loading
        from modelpress.pipeline.runner import calibration_ids

        ids = calibration_ids(loading.load_tokenizer(loading.resolve(source)), calibration)
        carry_kv_cache(source, output, ids, calibration.batch_size)
    else:
        from modelpress.train.distill import distill

        teacher = c.teacher or (original if stage.kind != "distill" else None)
        distill(source, c.data, output, c.train, teacher=teacher, eval_text=c.eval_text, resume=resume)


def _export(c, source: str, output: str, calibration: CalibrationConfig) -> None:
    if c.to == "hf":
        from modelpress.export.hf import export_hf

        export_hf(source, output, c.dtype or "bfloat16")
        return
    from modelpress.export.gguf import export_gguf

    gguf_type = c.type or "f16"
    tmp = Path(f"{output}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if c.calibrate:
            from modelpress.calibrated_gguf import export_calibrated_gguf

            result = export_calibrated_gguf(source, str(tmp / "model.gguf"), gguf_type, calibration, pure=c.pure,
                                            overrides=c.overrides)
        else:
            result = export_gguf(source, str(tmp / "model.gguf"), gguf_type, pure=c.pure, overrides=c.overrides)
        (tmp / "modelpress.json").write_text(to_json({"command": "export", "source": source, "to": "gguf",
                                                      "type": gguf_type, **result}, indent=2))
        tmp.replace(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_model(model: str, text: str, windows: int, baseline: str | None, spec: str | None,
                  device: str | None, kv_cache: str | None = None, prompts=(), new_tokens: int = 0,
                  histograms: list[str] | bool = False) -> dict:
    """:func:`~modelpress.eval.compare.measure` (with the KV cache in ``kv_cache``, generations
    from ``prompts`` and the ``histograms`` asked for) plus the
    planner's view of ``model`` in format ``spec``: parameters, weight bytes, bits per parameter
    on disk, decode speed of light on ``device``."""
    from modelpress.eval.compare import measure
    from modelpress.models import loading
    from modelpress.models.shape import shape_from_config
    from modelpress.plan.formats import as_written_from, config_dtype, plan_format
    from modelpress.plan.memory import weight_bytes

    result = measure(model, text, windows, baseline=baseline, kv_cache=kv_cache, prompts=prompts,
                     new_tokens=new_tokens, histograms=histograms)
    source = loading.resolve(model)
    config = loading.load_config(source)
    shape = shape_from_config(config, Path(model).name, loading.tensor_headers(source))  # a quantized head counted as one
    fmt = None
    if spec is not None:
        try:  # the unquantized tensors as the checkpoint holds them (a float32 source keeps float32 ones)
            fmt = as_written_from(plan_format(spec), config_dtype(config))
        except UserError:  # a format the planner does not price (it is still measured on disk)
            fmt = None
    result.update(windows_asked=windows, params=shape.total_params, format=spec,
                  planner_bytes=None if fmt is None else weight_bytes(shape, fmt),
                  bits_per_param=None if not result.get("size_bytes") else 8 * result["size_bytes"] / shape.total_params)
    if device is not None and fmt is not None:
        from modelpress.plan.hardware import find_hardware
        from modelpress.plan.roofline import decode_roofline

        hw = find_hardware(device)
        result.update(device=hw.name, decode_tok_s=decode_roofline(shape, fmt, hw).tokens_per_s)
    return result
