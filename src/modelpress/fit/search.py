"""``fit``: the least-loss model that fits a device, found by measuring, not by rule.

1. **Budget** (:func:`budget_for`): the planner's arithmetic for the target, a catalogue device
   or a bare memory size: usable memory (the engine's reserve taken off) minus the KV cache at
   the context and batch, minus activations; or, with ``weights_only``, the bytes given.
2. **Sensitivity** (:mod:`modelpress.fit.sensitivity`): one layer pass for every Linear's error
   and bytes in every candidate format, then the probes that price output errors in KL.
3. **Candidates**: the mixed allocation at the budget (:mod:`modelpress.fit.allocate`) and the
   uniform formats that fit, the best few by predicted loss; the float model itself when it fits;
   and, when the KV cache is a sizeable share of the memory, the mixed allocation with the cache in
   fp8 and the bytes that frees given to the weights (measured with the cache rounded).
4. **Measured**: each candidate is quantized for real (GPTQ, each Linear in its format) as a
   recipe run side by side (:func:`modelpress.pipeline.run.run_recipe`: resumable, each in its
   own process) and measured on held-out text: perplexity, KL and top-1 agreement against the
   original. The winner is the least KL; among candidates within 1% of it, the smallest.
5. **Checked**: the winner's bytes on disk and the planner's count of them against the budget.

For llama.cpp the candidates are its block types, each Linear is its own group, the candidates
measured beside the allocation are llama.cpp's own mixes, and the winner is ``OUT/model.gguf``
(:mod:`modelpress.fit.gguf`).

Everything lands in ``OUT.partial/`` and is renamed to ``OUT`` when complete; a rerun of the
same command continues a stopped one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from modelpress.errors import UserError
from modelpress.fit import gguf as fit_gguf
from modelpress.fit.allocate import allocate, smallest_bytes, uniform
from modelpress.fit.sensitivity import (
    CANDIDATES,
    KEEP,
    Sensitivity,
    calibration_key,
    embedding_modules,
    measure_embeddings,
    measure_sensitivity,
    probe_gains,
)
from modelpress.plan.memory import RUNTIME_RESERVE

logger = logging.getLogger("modelpress")

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
SAME_LOSS = 0.01  # candidates whose KL is within 1% of the best count as equal: the smallest wins


def parse_bytes(text: str) -> float:
    """``"12GB"`` -> 12e9, ``"24GiB"`` -> 24 x 2^30 (units B, KB, MB, GB, TB and KiB...TiB).

    Raises:
        UserError: not a size with a unit.
    """
    m = _BYTES.match(text)
    if not m or m[2].lower() not in _UNITS:
        raise UserError(f"memory size {text!r}: give a number and a unit, e.g. 12GB, 24GiB or 500MB")
    return float(m[1]) * _UNITS[m[2].lower()]


@dataclass(frozen=True)
class Budget:
    """What the weights may take on the target, and how that was worked out (bytes)."""

    device: str
    memory: float
    reserve: float  # the engine's slack (vLLM's default gpu_memory_utilization leaves 10%)
    kv_cache: float
    activations: float
    weights: float  # what is left for the weights
    context: int
    batch: int
    kv_dtype: str
    weights_only: bool = False


def budget_for(shape, device: str | None = None, memory: str | None = None, context: int = 4096, batch: int = 1,
               kv_dtype: str = "fp16", weights_only: bool = False) -> Budget:
    """The weights' byte budget on a catalogue ``device`` or a bare ``memory`` size.

    ``weights_only``: the budget is ``memory`` (or the device's memory) itself, e.g. to match a
    file size; otherwise the device keeps :data:`~modelpress.plan.memory.RUNTIME_RESERVE` free
    and the KV cache (``context`` x ``batch`` in ``kv_dtype``) and activations come off it.
    """
    from modelpress.plan.hardware import find_hardware
    from modelpress.plan.memory import activation_bytes, kv_cache_bytes

    if (device is None) == (memory is None):
        raise UserError("give the target as --target NAME (see plan --list-hardware) or --memory SIZE (e.g. 12GB)")
    if device is not None:
        hw = find_hardware(device)
        name, total = hw.name, hw.memory
    else:
        total = parse_bytes(memory)
        name = memory.strip()
    if weights_only:
        return Budget(name, total, 0.0, 0.0, 0.0, total, context, batch, kv_dtype, True)
    kv = kv_cache_bytes(shape, context, batch, kv_dtype) or 0.0
    act = activation_bytes(shape, context, batch)
    reserve = total * RUNTIME_RESERVE
    return Budget(name, total, reserve, kv, act, total - reserve - kv - act, context, batch, kv_dtype)


def devices_holding(weight_bytes: float, budget: Budget) -> list[str]:
    """Catalogue devices on which ``weight_bytes`` plus the budget's KV cache and activations fit,
    smallest memory first."""
    from modelpress.plan.hardware import CATALOGUE

    need = weight_bytes + budget.kv_cache + budget.activations
    return [hw.name for hw in sorted(CATALOGUE, key=lambda hw: hw.memory)
            if (weight_bytes <= hw.memory if budget.weights_only else need <= hw.memory * (1 - RUNTIME_RESERVE))]


@dataclass
class Candidate:
    """One recipe ``fit`` considers: its formats, bytes and predicted loss, then its measurements."""

    name: str
    kind: str  # "float", "uniform" or "mixed"
    formats: dict[str, str]  # Linear -> format spec (or keep)
    nbytes: int
    predicted_kl: float
    measured: dict | None = None
    output: str | None = None  # the checkpoint its recipe wrote
    kv_dtype: str | None = None  # a KV-cache type other than the budget's (the bytes it frees pay for weights)
    weights_budget: float | None = None  # the budget it was allocated under

    @property
    def mix(self) -> dict[str, int]:
        return dict(Counter(self.formats.values()).most_common())


def predicted_kl(sens: Sensitivity, choice: dict[str, str]) -> float:
    """The KL the sensitivity model predicts for ``choice``: each group's gain x output error, summed."""
    return sum(sens.gain(s.group, choice[n]) * s.errors[choice[n]] for n, s in sens.linears.items())


def candidates(sens: Sensitivity, budget: float, n_uniform: int = 2,
               uniforms: dict[str, dict[str, str] | None] | None = None) -> list[Candidate]:
    """The float model if it fits, else the mixed allocation at ``budget`` and the ``n_uniform``
    uniform formats that fit with the least predicted KL (ordered by it). ``uniforms``: name ->
    choice of the fixed allocations to consider instead of one format everywhere (llama.cpp's
    own mixes, :mod:`modelpress.fit.gguf`)."""
    keep = {n: KEEP for n in sens.linears}
    if sens.bytes_of(keep) <= budget:
        return [Candidate("float", "float", keep, sens.bytes_of(keep), 0.0, weights_budget=budget)]
    if uniforms is None:
        uniforms = {spec: uniform(sens, spec) for spec in sens.candidates if spec != KEEP}
    out = []
    for name, choice in uniforms.items():
        if choice is not None and sens.bytes_of(choice) <= budget:
            out.append(Candidate(name, "uniform", choice, sens.bytes_of(choice), predicted_kl(sens, choice),
                                 weights_budget=budget))
    out = sorted(out, key=lambda c: c.predicted_kl)[:n_uniform]
    mixed = allocate(sens, budget, "kl")
    if all(mixed != c.formats for c in out):
        out.insert(0, Candidate("mixed", "mixed", mixed, sens.bytes_of(mixed), predicted_kl(sens, mixed),
                                weights_budget=budget))
    return out


KV_ALTERNATIVE = "fp8"
KV_WORTH = 0.05  # the KV cache must be at least 5% of the weights' budget for halving it to be worth a candidate


def weights_with_fp8_cache(budget: Budget) -> float | None:
    """The weights' budget when the KV cache is stored in fp8 instead of the budget's 16- or 32-bit
    type (the bytes that frees go to the weights); ``None`` when there is no such cache."""
    from modelpress.plan.memory import KV_BYTES

    if budget.weights_only or budget.kv_dtype not in ("fp16", "bf16", "fp32"):
        return None
    return budget.weights + budget.kv_cache * (1 - KV_BYTES[KV_ALTERNATIVE] / KV_BYTES[budget.kv_dtype])


def kv_candidate(sens: Sensitivity, budget: Budget, pool: list[Candidate]) -> Candidate | None:
    """The mixed allocation when the KV cache is stored in fp8 instead (its freed bytes go to the
    weights), if the cache is large enough to matter and the allocation changes; ``None`` otherwise.
    The measurement then runs with the keys and values rounded to fp8, so its cost is counted."""
    weights = weights_with_fp8_cache(budget)
    if weights is None or budget.kv_cache < KV_WORTH * budget.weights:
        return None
    if pool and pool[0].kind == "float":
        return None
    from modelpress.kv_scales import SCALE_BYTES_PER_LAYER

    # the checkpoint carries each attention layer's k_scale and v_scale: their bytes come off the budget
    scales = SCALE_BYTES_PER_LAYER * len({s.layer for s in sens.linears.values() if not s.kl_measured})
    choice = allocate(sens, weights - scales, "kl")
    if any(choice == c.formats for c in pool):
        return None
    return Candidate(f"mixed-kv-{KV_ALTERNATIVE}", "mixed", choice, sens.bytes_of(choice) + scales,
                     predicted_kl(sens, choice), kv_dtype=KV_ALTERNATIVE, weights_budget=weights)


def recipe_data(model: str, candidate: Candidate, config, evaluate: dict, gguf_base: str | None = None,
                float_types: dict[str, str] | None = None) -> dict:
    """The candidate as a YAML recipe's data: one GPTQ stage with ``config``'s settings, its most
    common format as the default and every other Linear named in ``overrides``; with ``gguf_base``,
    a calibrated GGUF export of that file type with every Linear's type named
    (:func:`modelpress.fit.gguf.export_stage`)."""
    if gguf_base is not None:
        return {"model": model, "calibration": config.calibration.model_dump(mode="json"), "evaluate": evaluate,
                "stages": [fit_gguf.export_stage(candidate, gguf_base, float_types)]}
    default = next(f for f in candidate.mix if f != KEEP)
    overrides = {re.escape(n): f for n, f in candidate.formats.items() if f != default}
    settings = config.model_dump(mode="json", exclude={"calibration", "format", "overrides", "bits", "granularity",
                                                        "group_size", "symmetric", "keep_zeros"})
    # every module the allocation chose for is a target (an untied head too, keep included): an
    # exclude pattern matching one (the default lm_head) would overrule the allocation
    settings["exclude"] = [p for p in settings["exclude"] if not any(re.search(p, n) for n in candidate.formats)]
    stages = [{"quantize": {**settings, "format": default, "overrides": overrides}}]
    if candidate.kv_dtype is not None:
        stages.append({"kv-cache": {"dtype": candidate.kv_dtype}})
    return {"model": model, "calibration": config.calibration.model_dump(mode="json"), "evaluate": evaluate,
            "stages": stages}


def fit_model(model: str, out_dir: str | Path, budget: Budget, config, engine: str = "vllm",
              formats: list[str] | None = None, eval_text: str | None = None, windows: int = 40,
              probe_windows: int = 2, n_uniform: int = 2, sensitivity_method: str = "gptq",
              report: bool = False, gguf_base: str = fit_gguf.BASE, speed: bool = False,
              sensitivity_from: str | Path | None = None) -> dict:
    """Find, build and check the least-loss model of ``model`` within ``budget`` (see the module doc).

    Args:
        model: float checkpoint folder.
        out_dir: output folder (must not exist; ``OUT.partial`` is where a stopped run resumes).
        budget: from :func:`budget_for`.
        config: the :class:`~modelpress.pipeline.recipe.GPTQConfig` (observer, damping, calibration).
        engine: ``vllm`` or ``transformers``: which formats are candidates (:data:`CANDIDATES`);
            ``llama.cpp``: a GGUF file with per-tensor block types (:mod:`modelpress.fit.gguf`).
        formats: candidate format specs instead of the engine's.
        eval_text: held-out text for the measurements; default: the calibration text past the
            windows calibration used.
        windows: ppl-512 windows per measurement.
        probe_windows: calibration windows per KL probe.
        n_uniform: how many uniform formats are measured beside the mixed allocation.
        sensitivity_method: ``gptq`` or ``rtn`` codes for the sensitivity pass.
        report: also write ``OUT/report.html`` (:mod:`modelpress.report.fit`).
        gguf_base: for llama.cpp, the file type whose types the tensors outside the decoder
            Linears, the embedding and the output head take (norms, biases).
        speed: also measure the winner's decode tokens/s in its engine on this machine, beside
            this machine's memory-bound ceiling (:mod:`modelpress.eval.speed`): ``record["speed"]``.
        sensitivity_from: an earlier fit's output folder (or its ``sensitivity.json``) of the same
            model, candidates, method and calibration: its measured sensitivity is used instead of
            a new layer pass and probes, so fitting one model to several budgets measures it once
            (:func:`reuse_sensitivity`); a candidate whose recipe it already measured is not run
            again (:class:`EarlierFit`).

    Returns:
        The fit record (also ``OUT/fit.json``).

    Raises:
        UserError: nothing fits (the message gives the smallest size reachable and the
            catalogue devices that would hold it).
    """
    from modelpress.pipeline.run import run_recipe
    from modelpress.pipeline.yaml_recipe import parse_recipe

    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output folder")
    work = out.with_name(out.name + ".partial")
    gguf = engine == fit_gguf.ENGINE
    candidates_specs = list(formats or (fit_gguf.CANDIDATES if gguf else CANDIDATES[engine]))
    if KEEP not in candidates_specs:
        candidates_specs.append(KEEP)
    reused = None if sensitivity_from is None else reuse_sensitivity(
        sensitivity_from, model, candidates_specs, sensitivity_method, config.calibration)
    work.mkdir(parents=True, exist_ok=True)
    check_reachable(model, candidates_specs, config, budget, work, gguf_base if gguf else None)
    sens_file, probe_dir = work / "sensitivity.json", work / "probe-weights"
    if reused is not None and not sens_file.is_file():
        reused.save(sens_file)
    sens = Sensitivity.load(sens_file) if sens_file.is_file() else None
    if (sens is None or sens.candidates != candidates_specs or sens.method != sensitivity_method
            or not (sens.probes or probe_dir.is_dir())):
        logger.info("sensitivity: %d candidate formats, one layer pass", len(candidates_specs))
        sens = measure_sensitivity(model, candidates_specs, config, sensitivity_method, probe_dir=probe_dir,
                                   fused=not gguf)
        sens.save(sens_file)
    if not sens.probes:
        logger.info("probing how each group's output error reaches the model's output (KL)")
        probe_gains(sens, config, windows=probe_windows, probe_dir=probe_dir)
        sens.save(sens_file)
    shutil.rmtree(probe_dir, ignore_errors=True)  # a model's worth of disk, needed by the probes only
    if not any(s.kl_measured for s in sens.linears.values()):
        if gguf:
            logger.info("measuring the embedding and output head in each block type (KL)")
            measure_embeddings(sens, config, windows=probe_windows)
        else:  # an untied head is a choice; vLLM and transformers take no quantized input embedding
            before = set(sens.linears)
            measure_embeddings(sens, config, windows=probe_windows, head_only=True)
            for name in set(sens.linears) - before:  # now counted as a choice, not as a fixed tensor
                sens.fixed_bytes -= sens.linears[name].nbytes[KEEP]
                logger.info("the output head %s is a choice too (KL measured in each format)", name)
        sens.save(sens_file)
    if gguf:  # the other tensors as the GGUF file stores them
        sens.fixed_bytes = fit_gguf.fixed_bytes(model, gguf_base, set(sens.linears))
    smallest = smallest_bytes(sens)
    if smallest > budget.weights:  # the planner's estimate said it might fit; the exact count says not
        _nothing_fits(budget, candidates_specs, smallest, work)
    mixes = {f"{m} mix": fit_gguf.mix_choice(model, m, sens.linears) for m in fit_gguf.MIXES} if gguf else None
    pool = candidates(sens, budget.weights, n_uniform, mixes)
    kv = None if gguf else kv_candidate(sens, budget, pool)  # llama.cpp's KV types are not measured yet
    if kv is not None:
        pool.append(kv)
    floats = fit_gguf.float_types(model) if gguf else None
    text = eval_text or held_out_text(model, config.calibration, work, windows)
    evaluate = {"text": text, "windows": windows, "new_tokens": 0, "histograms": False}  # numbers only: no page shows them
    if budget.device and not budget.weights_only and _in_catalogue(budget.device):
        evaluate["device"] = budget.device
    earlier = EarlierFit(Path(sensitivity_from)) if sensitivity_from is not None else None
    original = None

    def build(c: Candidate, data: dict) -> None:
        nonlocal original
        record = run_recipe(parse_recipe(data, where=c.name), work / "candidates" / c.name, original=original)
        original = record["original"]
        c.measured = {k: record["steps"][-1].get(k) for k in MEASURED}
        c.output = record["output"]

    recipes = {}
    for c in pool:
        if c.kind == "float" and not gguf:
            break
        recipes[c.name] = data = recipe_data(model, c, config, evaluate, gguf_base if gguf else None, floats)
        (work / "recipes").mkdir(exist_ok=True)
        (work / "recipes" / f"{c.name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        logger.info("candidate %s: %s, %.1f MB, predicted KL %.4f", c.name, c.mix, c.nbytes / 1e6, c.predicted_kl)
        row = earlier.measured(data) if earlier is not None else None
        if row is not None:  # the same recipe on the same text: its numbers hold
            logger.info("candidate %s: measured by %s as %s (the same recipe), not run again", c.name, earlier.path,
                        row["name"])
            c.measured = {**{k: row.get(k) for k in MEASURED}, "measured_in": str(earlier.path)}
            original = original or earlier.record.get("original")
            continue
        build(c, data)
    winner = _winner(pool)
    if winner.kind != "float" and winner.output is None:  # measured by the earlier fit: its files, or built now
        winner.output = earlier.copy_winner(recipes[winner.name], work / "reused-winner")
        if winner.output is None:
            build(winner, recipes[winner.name])
    record = {"command": "fit", "model": model, "engine": engine, **({"gguf_base": gguf_base} if gguf else {}),
              "budget": asdict(budget),
              "sensitivity": {"method": sens.method, "candidates": sens.candidates, "seconds": sens.seconds,
                              "smallest_bytes": smallest,
                              **({"reused_from": str(sensitivity_from)} if sensitivity_from is not None else {})},
              "original": original, "candidates": [_row(c) for c in pool], "winner": winner.name,
              "formats": winner.formats}
    if winner.kind == "float" and not gguf:
        _copy_float(model, work / "model")
    else:
        Path(winner.output).rename(work / ("model.gguf" if gguf else "model"))
    written = fit_gguf.tensor_bytes(work / "model.gguf") if gguf else _tensor_bytes(work / "model")
    record["check"] = {"written_tensor_bytes": written, "predicted_bytes": winner.nbytes,
                       "fits": written <= winner.weights_budget, "budget_weights_bytes": winner.weights_budget,
                       "kv_dtype": winner.kv_dtype or budget.kv_dtype}
    if written > winner.weights_budget:  # the sensitivity's byte count is exact: this is a bug, not a user error
        raise RuntimeError(f"the written model has {written} tensor bytes, over the budget of {winner.weights_budget:.0f}")
    if speed:  # the files as written, in the engine they are for
        from modelpress.eval.speed import decode_speed, with_ceiling

        record["speed"] = with_ceiling(decode_speed(str(work / ("model.gguf" if gguf else "model"))))
    # paths inside OUT.partial (the held-out text, the original's record) are written as they will be
    record = json.loads(json.dumps(record, default=str).replace(json.dumps(str(work))[1:-1], json.dumps(str(out))[1:-1]))
    (work / "fit.json").write_text(json.dumps(record, indent=1))
    for file in (work / "recipes").glob("*.yaml"):  # each candidate's recipe, runnable from OUT (and read by a later fit)
        file.write_text(file.read_text().replace(str(work), str(out)))
    if winner.output is not None:
        shutil.copyfile(work / "recipes" / f"{winner.name}.yaml", work / "recipe.yaml")
    for c in pool if winner.output is not None else []:  # the others' checkpoints (their records stay): a model's worth of disk each
        if c is not winner and c.output is not None:
            if Path(c.output).is_file():
                Path(c.output).unlink()
            else:
                shutil.rmtree(c.output, ignore_errors=True)
    work.rename(out)
    if report:
        from modelpress.report.fit import write_fit_report

        write_fit_report(out, out / "report.html")
    return record


MEASURED = ("ppl", "kl", "top1_agreement", "size_bytes")


class EarlierFit:
    """The candidates an earlier fit (``--sensitivity-from``) measured, found by their recipes:
    one that this fit would run again, identical and on the same text, is not run again."""

    def __init__(self, path: Path):
        self.path = path if path.is_dir() else path.parent
        fit_json = self.path / "fit.json"
        self.record = json.loads(fit_json.read_text()) if fit_json.is_file() else {"candidates": []}
        self.recipes = {}  # candidate name -> its recipe data (paths in OUT, as fit rewrites them on finishing)
        for row in self.record["candidates"]:
            file = self.path / "recipes" / f"{row['name']}.yaml"
            if file.is_file():
                self.recipes[row["name"]] = _comparable(yaml.safe_load(file.read_text()))

    def _match(self, data: dict) -> dict | None:
        key = _comparable(data)
        return next((r for r in self.record["candidates"] if self.recipes.get(r["name"]) == key), None)

    def measured(self, data: dict) -> dict | None:
        """The earlier row that measured this exact recipe, or ``None``."""
        row = self._match(data)
        return row if row is not None and row.get("kl") is not None else None

    def copy_winner(self, data: dict, dest: Path) -> str | None:
        """A copy at ``dest`` of the earlier fit's written model when its winner was this recipe."""
        row = self._match(data)
        if row is None or row["name"] != self.record.get("winner"):
            return None
        gguf = self.path / "model.gguf"
        if gguf.is_file():
            shutil.copy2(gguf, dest.with_suffix(".gguf"))
            return str(dest.with_suffix(".gguf"))
        if not (self.path / "model").is_dir():
            return None
        shutil.copytree(self.path / "model", dest)
        return str(dest)


def _comparable(data: dict) -> dict:
    """Recipe data with the evaluation text as its contents' digest: two fits' held-out texts are
    files in their own folders."""
    import hashlib

    data = json.loads(json.dumps(data))
    text = data.get("evaluate", {}).get("text")
    if text is not None and Path(text).is_file():
        data["evaluate"]["text"] = hashlib.sha256(Path(text).read_bytes()).hexdigest()
    return data


def reuse_sensitivity(path: str | Path, model: str, candidates: list[str], method: str, calibration) -> Sensitivity:
    """An earlier fit's measured sensitivity (its ``OUT`` folder or ``OUT/sensitivity.json``),
    checked to be what this fit would measure: the same model, candidate formats, method and
    calibration text and windows, with its KL probes done (a finished fit's are).

    Raises:
        UserError: missing or unreadable, or measured under other settings (which, and how to match).
    """
    path = Path(path)
    file = path / "sensitivity.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--sensitivity-from {path}: no sensitivity.json there; give a finished fit's output folder")
    try:
        sens = Sensitivity.load(file)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--sensitivity-from {file}: not a fit sensitivity file ({type(e).__name__}: {e})") from None

    def same_model(a: str, b: str) -> bool:
        return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b

    wanted = calibration_key(calibration)
    differences = [
        *([f"model {sens.model} (this fit: {model})"] if not same_model(sens.model, model) else []),
        *([f"candidates {','.join(sens.candidates)} (this fit: {','.join(candidates)}; match --formats and --engine)"]
          if sens.candidates != candidates else []),
        *([f"--sensitivity {sens.method} (this fit: {method})"] if sens.method != method else []),
        *([f"calibration {_calib_text(sens.calibration)} (this fit: {_calib_text(wanted)}; match the --calib options)"]
          if sens.calibration != wanted else []),
    ]
    if differences:
        raise UserError(f"--sensitivity-from {file} was measured with {'; '.join(differences)}")
    if not sens.probes:
        raise UserError(f"--sensitivity-from {file}: its fit stopped before the KL probes were done; finish it first "
                        "(rerun its command)")
    return sens


def _calib_text(c: dict) -> str:
    if not c:
        return "not recorded (measured before fit recorded it)"
    return f"{c['samples']} x {c['seq_len']} tokens of {c['text'] or 'the built-in text'}"


def check_reachable(model: str, specs: list[str], config, budget: Budget, work: Path,
                    gguf_base: str | None = None) -> None:
    """Refuse, before any work, a budget below the smallest model the candidates can make, by the
    planner's count from the checkpoint's header: every Linear in its smallest format, the rest
    as stored (with ``gguf_base``, in that GGUF file type's types). (The exact count after the
    sensitivity pass differs by a few bytes per tensor.)"""
    from modelpress.models import loading
    from modelpress.models.loading import meta_model
    from modelpress.models.tensors import plan_targets

    source = loading.resolve(model)
    meta = meta_model(loading.load_config(source))
    head = embedding_modules(meta)[1:]  # an untied output head: a choice like the Linears
    targets = plan_targets(meta, config.model_copy(update={
        "format": "int8", "overrides": {}, "exclude": [p for p in config.exclude if not any(re.search(p, h) for h in head)]}))
    stored = header_bytes(source)
    if gguf_base is not None:  # the decoder Linears, the embedding and an untied output head
        shapes = {m: tuple(meta.get_submodule(m).weight.shape)
                  for m in [*targets.formats, *embedding_modules(meta)]}
        smallest = fit_gguf.smallest_bytes(model, gguf_base, shapes, specs)
        if smallest > budget.weights:
            _nothing_fits(budget, specs, smallest, work)
        return
    smallest = 0.0
    for name, tensor_bytes in stored.items():
        module = name.removesuffix(".weight")
        if module not in targets.formats:
            smallest += tensor_bytes
            continue
        numel, in_f = meta.get_submodule(module).weight.numel(), targets.in_features[module]
        sizes = [config.spec_format(f).bits_per_weight(in_features=in_f, numel=numel) * numel / 8
                 for f in specs if f != KEEP and config.spec_format(f).divides(in_f)]
        smallest += min(sizes, default=tensor_bytes)
    if smallest > budget.weights:
        _nothing_fits(budget, specs, smallest, work)


def _nothing_fits(budget: Budget, specs: list[str], smallest: float, work: Path):
    holders = devices_holding(smallest, budget)
    shutil.rmtree(work, ignore_errors=True)
    fp8 = weights_with_fp8_cache(budget)
    raise UserError(
        f"nothing fits {budget.device}: the weights may take {human_bytes(budget.weights)} "
        f"({_budget_line(budget)}) and the smallest model reachable with {', '.join(specs)} is "
        f"{human_bytes(smallest)}; "
        + (f"with the KV cache in fp8 (--kv-dtype fp8) the weights may take {human_bytes(fp8)}, enough; or "
           if fp8 is not None and fp8 >= smallest else "")
        + (f"it would fit: {', '.join(holders[:3])}" + (" and larger" if len(holders) > 3 else "")
           if holders else "no catalogue device holds it")
        + (f" (at context {budget.context} x batch {budget.batch})" if not budget.weights_only else ""))


def header_bytes(source) -> dict[str, int]:
    """Each tensor's bytes in a checkpoint folder, from the safetensors headers (nothing loaded)."""
    from modelpress.models.loading import tensor_headers

    out = {name: math.prod(shape) * _itemsize(dtype) for name, (shape, dtype) in tensor_headers(source).items()}
    if not out:
        raise UserError(f"{source.path}: fit reads a safetensors checkpoint folder; convert a GGUF file with "
                        "`modelpress export --to hf` first")
    return out


def _winner(pool: list[Candidate]) -> Candidate:
    if pool[0].kind == "float":
        return pool[0]
    best = min(c.measured["kl"] for c in pool)
    equal = [c for c in pool if c.measured["kl"] <= best * (1 + SAME_LOSS)]
    return min(equal, key=lambda c: c.nbytes)


def _row(c: Candidate) -> dict:
    return {"name": c.name, "kind": c.kind, "bytes": c.nbytes, "mix": c.mix, "predicted_kl": c.predicted_kl,
            "kv_dtype": c.kv_dtype, "weights_budget": c.weights_budget, **(c.measured or {})}


def _budget_line(b: Budget) -> str:
    if b.weights_only:
        return "weights only"
    return (f"{human_bytes(b.memory)} less {human_bytes(b.reserve)} reserve, {human_bytes(b.kv_cache)} KV cache "
            f"at {b.context} x {b.batch} in {b.kv_dtype}, {human_bytes(b.activations)} activations")


def human_bytes(n: float) -> str:
    """``1.234 GB``, ``56.7 MB``, ``890 KB``, ``12 B`` (decimal units, as device memory is sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.{3 if unit == 'GB' else 1}f} {unit}"
    return f"{n:.0f} B"


def _in_catalogue(name: str) -> bool:
    from modelpress.plan.hardware import CATALOGUE

    return any(hw.name == name for hw in CATALOGUE)


def held_out_text(model: str, calibration, work: Path, windows: int) -> str:
    """The calibration text past the tokens calibration used, as a file in ``work``; the whole
    text (with a warning: not held out) when too little is left for ``windows`` windows."""
    from modelpress.data import PPL_512, builtin_text, read_calibration
    from modelpress.models import loading

    path = work / "held-out.txt"
    if path.is_file():
        return str(path)
    text = builtin_text() if calibration.text is None else read_calibration(calibration.text, calibration.text_field)
    tokenizer = loading.load_tokenizer(loading.resolve(model))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rest = ids[calibration.samples * calibration.seq_len:]
    if len(rest) < PPL_512.seq_len:
        logger.warning("the calibration text leaves no held-out window; measuring on it (not held out): pass "
                       "--eval-text for numbers that mean something")
        rest = ids
    elif len(rest) < windows * PPL_512.seq_len:
        logger.info("held-out text: %d tokens, fewer than %d windows of %d", len(rest), windows, PPL_512.seq_len)
    path.write_text(tokenizer.decode(rest), encoding="utf-8")
    return str(path)


def _copy_float(model: str, dest: Path) -> None:
    src = Path(model)
    if not src.is_dir():
        raise UserError(f"{model} fits as it is; fit copies a float checkpoint folder, give one")
    shutil.copytree(src, dest)


def _tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in the safetensors files of ``folder`` (headers excluded)."""
    from modelpress.models import loading

    return sum(header_bytes(loading.resolve(str(folder))).values())


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1,
            "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}[dtype]
