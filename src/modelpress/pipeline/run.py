"""Running a recipe: every stage in its own process, every step measured, a rerun resumes.

``run_recipe(recipe, OUT)`` runs the stages of a :class:`~modelpress.pipeline.yaml_recipe.Recipe`
in order, each reading the output of the one before, and keeps each stage's output under
``OUT/NN-kind[-method]/`` (a checkpoint folder; a GGUF stage's folder holds ``model.gguf``; a
prune and a quantize stage that share a layer pass write one, ``01-prune-wanda+02-quantize-gptq``).
After every stage the new model is measured against the recipe's model: parameters, the
planner's weight bytes for its format and the bytes on disk, bits per parameter, ``ppl-512`` on
the evaluation text, KL and top-1 agreement, the decode speed of light on the recipe's device,
the stage's wall time and peak memory. The result is the seed's stage table (each step's
accuracy impact and the cumulative one), printed by the CLI and kept in ``OUT/modelpress.json``.

Each stage, and each measurement, runs in a child process (``python -m modelpress.cli.worker``):
its peak resident memory is its own (``wait4``'s ``ru_maxrss``), not the largest of any step
before it, and the memory of one stage is returned to the system before the next starts.

Resume: ``OUT/pipeline-state.json`` records each stage's fingerprint (its settings and those of
every stage before it) when it starts, and its numbers when it ends. A rerun of the same recipe
skips finished stages and measurements and continues an interrupted stage through that verb's
own resume (``OUT/NN-....partial``); a changed recipe is refused rather than mixed with the old
outputs. Every stage's output appears by one rename, so a kill at any point leaves either a
finished output or a resumable one, and the files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelpress.data import builtin_text
from modelpress.errors import UserError
from modelpress.eval.samples import DEFAULT_PROMPTS
from modelpress.plan.formats import SHORT_DTYPES
from modelpress.pipeline.yaml_recipe import TRAIN_KINDS, Recipe, Stage, passes
from modelpress.record import to_json, versions

logger = logging.getLogger("modelpress")

STATE = "pipeline-state.json"
RECORD = "modelpress.json"
JOBS = ".jobs"


def run_recipe(recipe: Recipe, out_dir: str | Path, original: dict | None = None) -> dict:
    """Run ``recipe`` into ``out_dir`` (resuming what a previous run of it left there).

    ``original``: the recipe's model already measured the same way (another recipe's
    ``record["original"]``), so that recipes compared side by side measure it once.

    Returns:
        The run record (also ``OUT/modelpress.json``): the recipe, the original model's numbers
        and one entry per unit of stages (shown by :func:`modelpress.report.html.step_rows`).
    """
    out = Path(out_dir)
    check_inputs(recipe)
    state = _open_state(out, recipe)
    text = _evaluation_text(recipe, out)
    evaluation = _evaluation_key(recipe, text)
    if original is not None and state.get("original") is None and original.get("evaluation") == evaluation:
        state["original"] = original
    original = state.get("original")
    if original is None or original.get("evaluation") != evaluation:  # new, or the evaluate settings changed
        logger.info("measuring the original model %s", recipe.model)
        original = _measure(out, "00-original", recipe.model, text, recipe, baseline=None, spec=_float_spec(recipe.model))
        state["original"] = original = {**original, "evaluation": evaluation}
        _save_state(out, state)
    source, spec, fingerprint = recipe.model, original.get("format"), _model_fingerprint(recipe.model)
    steps = []
    n = len(recipe.stages)
    units = []
    for unit in passes(recipe):
        for stage in unit:
            fingerprint = stage.fingerprint(fingerprint)
        units.append((unit, "+".join(s.name for s in unit), fingerprint))
    _check_same_recipe(out, state, units)
    kv_cache = None
    for unit, name, fingerprint in units:
        title, label = " + ".join(s.title for s in unit), "+".join(str(s.index) for s in unit)
        where = f"stage {label}/{n}"
        folder = out / name
        done = state["stages"].get(name, {})
        kv_stage = unit[0] if unit[0].kind == "kv-cache" else None
        carried = kv_stage is not None and carries_kv_scheme(kv_stage, n)
        if kv_stage is not None:
            kv_cache = None if carried else kv_stage.config.dtype  # a carried scheme is read from the checkpoint
        if kv_stage is not None and not carried:  # no files: every step from here on is measured with it
            state["stages"][name] = done = {**done, "fingerprint": fingerprint, "title": title, "seconds": None,
                                            "peak_rss_mb": None}
        elif not folder.exists():
            state["stages"][name] = done = {"fingerprint": fingerprint, "title": title}
            _save_state(out, state)
            logger.info("%s: %s", where, title)
            done.update(_run_stage(out, unit, name, source, folder, recipe, f"stage {label} ({title})"))
            _save_state(out, state)
        elif "seconds" not in done:
            done.update({"fingerprint": fingerprint, "title": title, "seconds": None, "peak_rss_mb": None})
        if kv_stage is None or carried:
            source = str(model_in(folder))
        for stage in unit:
            spec = format_spec(stage, spec, source)
        if done.get("measured", {}).get("evaluation") != evaluation:
            logger.info("measuring %s: %s", where, title)
            done["measured"] = {**_measure(out, name, source, text, recipe, baseline=recipe.model, spec=spec,
                                           kv_cache=kv_cache, histograms=list(original.get("weight_histograms", {}))),
                                "evaluation": evaluation}
            _save_state(out, state)
        steps.append({"stages": [s.index for s in unit], "kinds": [s.kind for s in unit], "title": title,
                      "output": source, "seconds": done["seconds"], "peak_rss_mb": done["peak_rss_mb"],
                      **done["measured"], **({"kv_cache_how": kv_cache_note(kv_stage, carried)} if kv_stage else {})})
    record = {
        "command": "run",
        "recipe": _recipe_dump(recipe),
        "original": original,
        "steps": steps,
        "output": source,
        "versions": versions(),
    }
    tmp = out / f"{RECORD}.tmp"
    tmp.write_text(to_json(record, indent=2))
    tmp.replace(out / RECORD)
    return record


def carries_kv_scheme(stage: Stage, n_stages: int) -> bool:
    """Whether a kv-cache stage writes its scales into the checkpoint: an FP8 cache (the one KV
    scheme vLLM reads) as the recipe's last stage (a later quantize would rewrite the checkpoint,
    and a GGUF export cannot carry it: llama.cpp takes the cache type as flags)."""
    return stage.config.dtype == "fp8" and stage.index == n_stages


def kv_cache_note(stage: Stage, carried: bool) -> dict:
    """How an engine runs this step's KV cache, for the record and the table."""
    dtype = stage.config.dtype
    if carried:
        how = "carried in the checkpoint (kv_cache_scheme, calibrated per-layer scales): vLLM runs it as is"
    elif dtype == "int8":
        how = ("not in the checkpoint (vLLM has no int8 KV cache); llama.cpp: -ctk q8_0 -ctv q8_0; measured here "
               "per token and head")
    else:
        how = ("not in the checkpoint (only a last-stage FP8 cache is carried); vLLM: --kv-cache-dtype fp8; "
               "llama.cpp has no FP8 cache (q8_0 is its nearest); measured here with per-head scales")
    return {"dtype": dtype, "carried": carried, "how": how}


def _evaluation_key(recipe: Recipe, text: str) -> str:
    """What a measurement depends on besides the model: a rerun with other evaluate settings
    measures again (the stages' files are kept)."""
    return json.dumps({"text": text, **recipe.evaluate.model_dump(mode="json")}, sort_keys=True)


def _check_same_recipe(out: Path, state: dict, units: list) -> None:
    """A rerun continues the same recipe: every unit already started has the same settings."""
    names = {name: fingerprint for _, name, fingerprint in units}
    for name, done in state["stages"].items():
        if names.get(name) != done.get("fingerprint"):
            first = next((u for u, n, f in units if state["stages"].get(n, {}).get("fingerprint") != f), units[-1][0])
            raise UserError(f"{out} holds a run of another recipe (from stage {first[0].index} on); write to a new "
                            f"output folder, or delete {name} and the stage folders after it")


def check_inputs(recipe: Recipe) -> None:
    """Every file a recipe names exists, and its device is in the catalogue, before any work."""
    from modelpress.models import loading

    loading.resolve(recipe.model)
    files = [("evaluate.text", recipe.evaluate.text), ("calibration.text", recipe.calibration.text)]
    for stage in recipe.stages:
        if stage.kind in TRAIN_KINDS:
            files += [(f"stage {stage.index}: data", f) for f in stage.config.data]
            files.append((f"stage {stage.index}: eval_text", stage.config.eval_text))
    for what, f in files:
        if f is not None and not f.startswith("hf:") and not Path(f).exists():
            raise UserError(f"{what}: file not found: {f}")
    if recipe.evaluate.device is not None:
        from modelpress.plan.hardware import find_hardware

        find_hardware(recipe.evaluate.device)


def model_in(folder: Path) -> Path:
    """The model a stage wrote: its folder, or the GGUF file in it."""
    gguf = folder / "model.gguf"
    return gguf if gguf.is_file() else folder


def format_spec(stage: Stage, previous: str | None, model: str) -> str | None:
    """The planner's name for the weight format of ``stage``'s output (``int4-g64``, ``q4_k_m``,
    ``bf16``), or ``None`` when it has none."""
    c = stage.config
    if stage.kind == "quantize":
        return None if c.overrides else c.weight_format().name  # a mix: the planner has no one format for it
    if stage.kind in TRAIN_KINDS and c.train.qat:
        return c.train.qat
    if stage.kind == "export":
        return (c.type or "f16") if c.to == "gguf" else SHORT_DTYPES[c.dtype or "bfloat16"]
    if stage.kind == "kv-cache":
        return previous
    float_before = previous in SHORT_DTYPES.values() or previous is None
    return (_float_spec(model) or previous) if float_before else previous  # no checkpoint yet (a plan): unchanged


def _float_spec(model: str) -> str | None:
    """``fp32``/``bf16``/``fp16`` from a float checkpoint's config, else ``None``."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    dtype = data.get("dtype") or data.get("torch_dtype") or (data.get("text_config") or {}).get("dtype")
    return SHORT_DTYPES.get(str(dtype))


def _model_fingerprint(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def _open_state(out: Path, recipe: Recipe) -> dict:
    path = out / STATE
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("model") != _model_fingerprint(recipe.model):
            raise UserError(f"{out} holds a run on another model ({state.get('model')}); write to a new output folder")
        logger.info("resuming the run in %s", out)
        return state
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a recipe run; choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    state = {"model": _model_fingerprint(recipe.model), "stages": {}}
    _save_state(out, state)
    return state


def _save_state(out: Path, state: dict) -> None:
    tmp = out / f"{STATE}.tmp"
    tmp.write_text(to_json(state, indent=2))
    tmp.replace(out / STATE)


def _evaluation_text(recipe: Recipe, out: Path) -> str:
    if recipe.evaluate.text is not None:
        return recipe.evaluate.text
    path = out / "builtin-eval-text.txt"
    if not path.is_file():
        logger.info("no evaluate.text in the recipe: measuring on modelpress's built-in text, which is not "
                    "held out from calibration; give your own text for numbers that mean something")
        path.write_text(builtin_text(), encoding="utf-8")
    return str(path)


def _run_stage(out: Path, unit: tuple[Stage, ...], name: str, source: str, folder: Path, recipe: Recipe,
               what: str) -> dict:
    partial = folder.with_name(f"{folder.name}.partial")
    job = {"what": "stage", "stages": [{"index": s.index, "kind": s.kind, "config": s.config.model_dump(mode="json")}
                                       for s in unit],
           "source": source, "output": str(folder), "original": recipe.model, "resume": partial.exists(),
           "calibration": recipe.calibration.model_dump(mode="json"),
           # a model a later stage trains is expected to be damaged on the way: the heal is the fix,
           # and every step is measured anyway, so the quality guard does not stop the recipe there
           "quality_guard": not any(s.kind in TRAIN_KINDS for s in recipe.stages if s.index > unit[-1].index)}
    _, seconds, peak = _child(out, name, job, what)
    return {"seconds": round(seconds, 2), "peak_rss_mb": peak}


def _measure(out: Path, name: str, model: str, text: str, recipe: Recipe, baseline: str | None,
             spec: str | None, kv_cache: str | None = None, histograms: list[str] | bool = True) -> dict:
    """Measure ``model`` in a child process; ``histograms``: the weights to keep histograms of
    (``True``: the original's pick, which every later step repeats)."""
    ev = recipe.evaluate
    prompts = list(DEFAULT_PROMPTS if ev.prompts is None else ev.prompts) if ev.new_tokens else []
    job = {"what": "measure", "model": model, "text": text, "windows": ev.windows, "baseline": baseline,
           "format": spec, "device": ev.device, "kv_cache": kv_cache, "prompts": prompts, "new_tokens": ev.new_tokens,
           "histograms": histograms if ev.histograms else False}
    result, _, _ = _child(out, f"{name}.measure", job, f"measuring {model}")
    return result


def _child(out: Path, name: str, job: dict, what: str) -> tuple[dict, float, float]:
    """Run ``job`` in a child process; its result, wall seconds and peak RSS in MB."""
    jobs = out / JOBS
    jobs.mkdir(exist_ok=True)
    job_file, result_file = jobs / f"{name}.json", jobs / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(to_json(job, indent=2))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "modelpress.cli.worker", str(job_file), str(result_file)])
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:  # Ctrl-C reached both; a SIGTERM only us: pass it on, let it clean up
        proc.send_signal(signal.SIGTERM)
        os.wait4(proc.pid, 0)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if proc.returncode != 0 or "error" in result:
        if proc.returncode == 130 or proc.returncode == -signal.SIGINT:
            raise KeyboardInterrupt
        message = result.get("error") or f"the process stopped with exit code {proc.returncode} (its output is above)"
        raise UserError(f"{what}: {message}; fix it and rerun the same command to continue from this stage")
    return result.get("result") or {}, seconds, round(usage.ru_maxrss / 1024, 1)


def _recipe_dump(recipe: Recipe) -> dict:
    return {"path": recipe.path, "model": recipe.model, "calibration": recipe.calibration.model_dump(mode="json"),
            "evaluate": recipe.evaluate.model_dump(mode="json"),
            "stages": [{stage.kind: stage.config.model_dump(mode="json")} for stage in recipe.stages]}


def plan_recipe(recipe: Recipe) -> dict:
    """The recipe as arithmetic, before any work and without the weights: each step's weight
    format and bytes, KV cache, what it needs in all and whether it fits the recipe's device,
    and its decode speed of light (the memory column of the seed's table). The model may be a
    bare size (``70B``), a config.json or a checkpoint folder."""
    from modelpress.cli.plan import load_model
    from modelpress.plan import hardware
    from modelpress.plan.formats import as_written_from, config_dtype, plan_format
    from modelpress.plan.memory import activation_bytes, fit, kv_cache_bytes, weight_bytes
    from modelpress.plan.roofline import decode_roofline

    ev = recipe.evaluate
    shape, config = load_model(recipe.model)
    device = hardware.find_hardware(ev.device or "a100-80gb")
    spec = (_float_spec(recipe.model) or config_dtype(config) or "fp16") if config is not None else "fp16"
    kv_dtype, rows, unplanned = spec if spec in ("fp16", "bf16") else "fp16", [], []

    source_dtype = config_dtype(config) if config is not None else None

    def row(stages, title):
        fmt = as_written_from(plan_format(spec), source_dtype)  # unquantized tensors keep the source's dtype
        weights, kv = weight_bytes(shape, fmt), kv_cache_bytes(shape, ev.context, ev.batch, kv_dtype)
        needed = weights + (kv or 0.0) + activation_bytes(shape, ev.context, ev.batch)
        f = fit(needed, device.memory)
        rows.append({"stages": stages, "title": title, "format": spec, "kv_dtype": kv_dtype, "weight_bytes": weights,
                     "kv_cache_bytes": kv, "needed_bytes": needed, "fits": f.fits, "devices_needed": f.devices,
                     "decode_tok_s": decode_roofline(shape, fmt, device, context=ev.context, batch=ev.batch,
                                                     kv_dtype=kv_dtype).tokens_per_s})

    row([], f"original ({spec})")
    for unit in passes(recipe):
        title = " + ".join(s.title for s in unit)
        if any(s.kind == "prune" and s.config.method == "structured" for s in unit):
            unplanned.append(f"stage {unit[0].index} ({title}): its size depends on the importance scores the "
                             "model's weights give; the later rows assume the unpruned shape")
        for stage in unit:
            if stage.kind == "kv-cache":
                kv_dtype = stage.config.dtype
            else:
                spec = format_spec(stage, spec, recipe.model)
        row([s.index for s in unit], title)
    return {"model": shape.name, "params": shape.total_params, "device": device.name, "device_memory": device.memory,
            "context": ev.context, "batch": ev.batch, "steps": rows, "not_planned": unplanned,
            "not_measured": "perplexity, KL, top-1 agreement, wall time and peak memory of every step need the "
                            "model's weights: run the recipe without --plan-only"}

