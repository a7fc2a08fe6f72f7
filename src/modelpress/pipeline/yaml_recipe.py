"""YAML recipes: one model, an ordered list of stages, and how each step is measured.

A recipe is read into typed configs before any work, so that a misspelt field names its stage
and field, and an order that cannot work is refused with the reason::

    model: runs/smollm2-135m
    calibration: {text: data/austen/emma.txt, samples: 128}   # shared by every calibrated stage
    stages:
      - prune: {method: sparsegpt, sparsity: 0.3}
      - heal: {tokens: 200000, data: [data/austen/mansfield_park.txt]}
      - quantize: {method: gptq, bits: 4, group_size: 64}
    evaluate: {text: data/austen/pride_and_prejudice.txt, windows: 40, device: rtx4090}

Stage kinds and what each reads:

- ``prune``: a ``prune`` config (``method: magnitude|wanda|sparsegpt|structured`` and its fields,
  see :mod:`modelpress.pipeline.recipe`);
- ``quantize``: a ``compress`` config (``method: rtn|gptq|awq|smoothquant``);
- ``heal``: a distillation config (:class:`~modelpress.train.distill.DistillConfig`) whose
  teacher is the recipe's model unless ``teacher`` says otherwise; the student keeps its kind
  (a quantized stage trains through its own format);
- ``qat``: ``heal`` through the fake quantization of ``qat: FORMAT`` (``int4-g128``, ``q4_k_m``...),
  written in that format;
- ``distill``: the same as ``heal``, with ``teacher`` given explicitly (or ``alpha: 0``, no teacher);
- ``kv-cache``: ``{dtype: int8}`` or ``fp8``: every later step is evaluated with its keys and
  values quantized that way and planned with that cache size. As the last stage, ``fp8`` is
  carried in the checkpoint: calibrated per-layer scales and the ``kv_cache_scheme`` vLLM reads
  (:mod:`modelpress.kv_scales`), so vLLM runs it with an FP8 cache and no flag, and the step is
  measured with those scales. Otherwise it writes no files and the step's record says how to run
  it (vLLM has no int8 cache; llama.cpp takes ``-ctk q8_0 -ctv q8_0`` and has no FP8 cache);
- ``export``: ``{to: gguf, type: q4_k_m, calibrate: gptq}`` (``overrides: {module regex: q6_k}`` for
  per-tensor types) or ``{to: hf, dtype: bfloat16}``.

Training stages take ``data`` (text files), defaulting to the calibration text, and an optional
``eval_text`` (held-out text that picks the best weights). Relative paths are read from the
current directory, like the command line's.

Layer passes (:func:`passes`): a prune stage (magnitude, Wanda, SparseGPT) next to a quantize
stage runs in the same layer pass (``one_pass: true``, the default: one calibration forward
per layer instead of two, and each layer calibrated on the outputs of the layers before it as
written); the two are then one step of the table. ``one_pass: false`` runs each in its own pass
and measures each. A prune *after* a quantize always shares its pass: it prunes the quantized
codes (mask-only methods, integer formats), so the model stays on its grid.

Orders refused before any work, each with its reason: a stage after the export; quantizing twice;
pruning a quantized model other than right after its quantize stage with a mask-only method; a
GGUF export of a quantized model (the export quantizes in its own block types); QAT in a
training stage of an already quantized model (``heal`` trains through the format the model has).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelpress.errors import UserError
from modelpress.pipeline.recipe import METHODS, CalibrationConfig, methods
from modelpress.train.distill import DistillConfig

KINDS = ("prune", "quantize", "heal", "qat", "distill", "kv-cache", "export")
TRAIN_KINDS = ("heal", "qat", "distill")
_TRAIN_FIELDS = ("data", "teacher", "eval_text")


class EvaluateConfig(BaseModel):
    """How every step is measured: ``ppl-512`` on ``text`` (the first ``windows`` windows), KL and
    top-1 agreement against the recipe's model; ``device`` (a catalogue name, see ``plan
    --list-hardware``) adds the decode speed of light of each step, and ``context`` tokens for
    ``batch`` sequences size its KV cache in ``run --plan-only``. No text: the built-in one. Each
    step also continues ``prompts`` greedily by ``new_tokens`` tokens (none given: three plain
    openings; ``new_tokens: 0`` turns it off) and keeps histograms of a few weights (``histograms:
    false`` turns it off), shown before and after by the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None
    windows: int = Field(40, ge=1)
    device: str | None = None
    context: int = Field(4096, ge=1)
    batch: int = Field(1, ge=1)
    prompts: list[str] | None = None
    new_tokens: int = Field(32, ge=0, le=512)
    histograms: bool = True


class KVCacheConfig(BaseModel):
    """The KV cache's element type from this step on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["int8", "fp8"]


class ExportConfig(BaseModel):
    """The last stage: a GGUF file (``type`` a llama.cpp file type; ``calibrate: gptq`` picks the
    codes with GPTQ on the recipe's calibration text) or a float checkpoint in ``dtype``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: Literal["gguf", "hf"]
    type: str | None = None
    calibrate: Literal["gptq"] | None = None
    pure: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # module-name regex -> GGUF type (q4_k, q8_0, f16...), first full match wins, over the type's mix
    overrides: dict[str, str] = {}

    @model_validator(mode="after")
    def _fields_of_its_container(self):
        if self.to == "hf" and (self.type or self.calibrate or self.pure or self.overrides):
            raise ValueError("type, calibrate, pure and overrides apply to to: gguf; an hf export takes dtype")
        if self.to == "gguf" and self.dtype:
            raise ValueError("dtype applies to to: hf; a GGUF export takes type (f16, q8_0, q4_k_m...)")
        return self


class TrainStageConfig(BaseModel):
    """A ``heal`` or ``distill`` stage: the training text, the teacher and the training config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: list[str] | None = None
    teacher: str | None = None
    eval_text: str | None = None
    train: DistillConfig


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe, validated.

    Attributes:
        index: 1-based position in the recipe.
        kind: one of :data:`KINDS`.
        config: the kind's config (a method config, :class:`TrainStageConfig` or :class:`ExportConfig`).
    """

    index: int
    kind: str
    config: BaseModel

    @property
    def method(self) -> str | None:
        return getattr(self.config, "method", None) or (self.config.to if self.kind == "export" else None)

    @property
    def name(self) -> str:
        """The stage's folder name under the run's output: ``02-quantize-gptq``."""
        return f"{self.index:02d}-{self.kind}" + (f"-{self.method}" if self.method else "")

    @property
    def title(self) -> str:
        """One short line for the stage table: ``quantize gptq int4-g64``."""
        c = self.config
        if self.kind == "quantize":
            mixed = f" + {len(c.overrides)} overrides" if getattr(c, "overrides", None) else ""
            return f"quantize {c.method} {c.weight_format().name}{mixed}"
        if self.kind == "prune":
            if c.method == "structured":
                parts = [f"mlp {c.mlp_keep:g}" if c.mlp_keep else "", f"heads {c.heads_keep:g}" if c.heads_keep else "",
                         f"-{c.drop_layers} layers" if c.drop_layers else ""]
                return "prune structured " + ", ".join(p for p in parts if p)
            return f"prune {c.method} {c.pattern or f'{c.sparsity:.0%}'}"
        if self.kind in TRAIN_KINDS:
            t = c.train
            budget = f"{t.tokens:,} tokens" if t.tokens else f"{t.steps} steps"
            return f"{self.kind} {t.mode} {budget}" + (f" {t.qat}" if t.qat else "")
        if self.kind == "kv-cache":
            return f"kv cache {c.dtype}"
        mixed = f" + {len(c.overrides)} overrides" if c.overrides else ""
        return f"export {c.to} {c.type or c.dtype or ('f16' if c.to == 'gguf' else 'bfloat16')}{mixed}"

    def fingerprint(self, source: str) -> str:
        """A hash of the stage's settings and its input: a resumed run must continue the same work."""
        blob = json.dumps({"kind": self.kind, "config": self.config.model_dump(mode="json"), "source": source},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: read one with :func:`load_recipe`."""

    path: str
    model: str
    calibration: CalibrationConfig
    stages: tuple[Stage, ...]
    evaluate: EvaluateConfig
    one_pass: bool = True


def load_recipe(path: str | Path, model: str | None = None) -> Recipe:
    """Read and validate the YAML recipe at ``path`` (run on ``model`` instead of the one it names,
    when given); every error is one :class:`UserError` line naming the stage and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if model is not None and isinstance(data, dict):
        data = {**data, "model": model}
    return parse_recipe(data, str(path))


def parse_recipe(data, where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from the YAML's plain data (see :func:`load_recipe`)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping with model, stages and optionally calibration, evaluate")
    unknown = sorted(set(data) - {"model", "calibration", "stages", "evaluate", "one_pass"})
    if unknown:
        raise UserError(f"{where}: unknown top-level field {unknown[0]!r} "
                        "(known: model, calibration, stages, evaluate, one_pass)")
    if not isinstance(data.get("one_pass", True), bool):
        raise UserError(f"{where}: one_pass: true (prune and quantize share a layer pass) or false (each stage "
                        "its own pass and its own row in the table)")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise UserError(f"{where}: model: give the model to start from (a checkpoint folder, .gguf file or hub id)")
    calibration = _validated(CalibrationConfig, data.get("calibration") or {}, f"{where}: calibration")
    evaluate = _validated(EvaluateConfig, data.get("evaluate") or {}, f"{where}: evaluate")
    items = data.get("stages")
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: stages: give a list of stages, e.g. [{{quantize: {{method: rtn, bits: 4}}}}]")
    stages = tuple(_stage(i + 1, item, calibration, where) for i, item in enumerate(items))
    check_order(stages)
    return Recipe(path=where, model=data["model"], calibration=calibration, stages=stages, evaluate=evaluate,
                  one_pass=data.get("one_pass", True))


def _stage(index: int, item, calibration: CalibrationConfig, where: str) -> Stage:
    at = f"{where}: stage {index}"
    if not isinstance(item, dict) or len(item) != 1:
        raise UserError(f"{at}: a stage is one kind and its settings, e.g. `- quantize: {{method: gptq, bits: 4}}` "
                        f"(kinds: {', '.join(KINDS)})")
    (kind, fields), = item.items()
    if kind not in KINDS:
        raise UserError(f"{at}: unknown stage kind {kind!r} (kinds: {', '.join(KINDS)})")
    fields = dict(fields or {})
    at = f"{at} ({kind})"
    if kind in ("prune", "quantize"):
        method = fields.get("method")
        if method not in methods(kind):
            raise UserError(f"{at}: method: {'give one' if method is None else f'unknown {method!r}'} "
                            f"(one of {', '.join(methods(kind))})")
        config_class = METHODS[method].config
        if "calibration" in config_class.model_fields:
            fields["calibration"] = calibration.model_copy(update=fields.get("calibration") or {}).model_dump()
        return Stage(index, kind, _validated(config_class, fields, at))
    if kind == "export":
        if fields.get("to") == "compressed-tensors":
            raise UserError(f"{at}: to: a quantize stage already writes compressed-tensors (its folder is the "
                            "checkpoint); an export stage writes gguf or hf")
        return Stage(index, kind, _validated(ExportConfig, fields, at))
    if kind == "kv-cache":
        return Stage(index, kind, _validated(KVCacheConfig, fields, at))
    train = {k: v for k, v in fields.items() if k not in _TRAIN_FIELDS}
    outer = {k: v for k, v in fields.items() if k in _TRAIN_FIELDS}
    if outer.get("data") is None:
        if calibration.text is None:
            raise UserError(f"{at}: data: give the training text files (or a calibration text to train on)")
        outer["data"] = [calibration.text]
    elif isinstance(outer["data"], str):
        outer["data"] = [outer["data"]]
    config = _validated(TrainStageConfig, {**outer, "train": train}, at)
    train_config = config.train
    if kind == "qat" and train_config.qat is None:
        raise UserError(f"{at}: qat: a qat stage trains through a format: give qat: FORMAT (int4-g128, q4_k_m...)")
    if kind == "distill" and config.teacher is None and train_config.needs_teacher:
        raise UserError(f"{at}: teacher: a distill stage names its teacher (or use heal, whose teacher is the "
                        "recipe's model, or alpha: 0 for plain training on the text)")
    return Stage(index, kind, config)


def _validated(config_class, fields, at: str):
    if not isinstance(fields, dict):
        raise UserError(f"{at}: expected a mapping of settings, got {fields!r}")
    try:
        return config_class(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p != "train")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            names = _field_names(config_class)
            close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
            msg = (f"unknown field{f', did you mean {close[0]!r}?' if close else ''} "
                   f"(the fields are: {', '.join(names)})")
        raise UserError(f"{at}: {loc + ': ' if loc else ''}{msg}") from None
    except UserError as e:  # a config's own cross-field checks
        raise UserError(f"{at}: {e}") from None


def _field_names(config_class) -> list[str]:
    names = [n for n in config_class.model_fields if n != "train"]
    if config_class is TrainStageConfig:
        names += list(DistillConfig.model_fields)
    return names


def check_order(stages: tuple[Stage, ...]) -> None:
    """Refuse, before any work, an order of stages that cannot work, saying why."""
    quantized_at = None
    kv = [s.index for s in stages if s.kind == "kv-cache"]
    if len(kv) > 1:
        raise UserError(f"stage {kv[1]} (kv-cache): the KV cache's type is already set at stage {kv[0]}; keep one")
    for stage in stages:
        at = f"stage {stage.index} ({stage.kind})"
        previous_export = next((s for s in stages if s.kind == "export" and s.index < stage.index), None)
        if previous_export is not None:
            raise UserError(f"{at} comes after the export at stage {previous_export.index}: the export writes the "
                            "deployment file and must be the last stage")
        if stage.kind == "prune" and quantized_at:
            _check_prune_after_quantize(stage, stages[quantized_at - 1], at)
        if stage.kind == "quantize" and quantized_at:
            raise UserError(f"{at}: the model is already quantized at stage {quantized_at}; quantizing twice "
                            "compounds the rounding: keep one quantize stage")
        if stage.kind == "export" and stage.config.to == "gguf" and quantized_at:
            raise UserError(f"{at}: a GGUF export quantizes into llama.cpp's block types itself, so it would "
                            f"re-quantize stage {quantized_at}'s weights; drop the quantize stage and give the export "
                            "its type (with calibrate: gptq for GPTQ codes)")
        if stage.kind == "export" and stage.config.to == "hf" and quantized_at:
            raise UserError(f"{at}: an hf export writes float weights, undoing stage {quantized_at}'s quantization; "
                            "the quantized stage's output is already a checkpoint transformers and vLLM load")
        if stage.kind in TRAIN_KINDS and stage.config.train.qat and quantized_at:
            raise UserError(f"{at}: qat on a model quantized at stage {quantized_at}: a training stage already "
                            "trains a quantized model through its own format; drop qat")
        if stage.kind == "quantize" or (stage.kind in TRAIN_KINDS and stage.config.train.qat):
            quantized_at = stage.index


def _check_prune_after_quantize(stage: Stage, quantize: Stage, at: str) -> None:
    """Pruning a quantized model is done in the quantizer's own layer pass, on its codes."""
    if quantize.kind != "quantize" or stage.index != quantize.index + 1:
        raise UserError(f"{at}: a quantized model is pruned in the quantizer's own layer pass, so the prune stage "
                        f"must come right after a quantize stage (stage {quantize.index} is {quantize.kind}); "
                        "or prune before quantizing")
    if stage.config.method not in ("magnitude", "wanda"):
        raise UserError(f"{at}: after quantizing, prune with magnitude or wanda (they only choose a mask); "
                        f"{stage.config.method}'s changes would leave the quantization grid, so it goes before the "
                        "quantize stage")
    from modelpress.formats.integer import IntFormat

    if not isinstance(quantize.config.weight_format(), IntFormat):
        raise UserError(f"{at}: pruning after quantizing keeps the weights on an integer grid; "
                        f"{quantize.config.weight_format().name} is not one: prune before quantizing")


def passes(recipe: Recipe) -> list[tuple[Stage, ...]]:
    """The recipe's stages as units of work: consecutive prune (magnitude, Wanda, SparseGPT) and
    quantize stages share one layer pass when ``one_pass`` is set, and a prune after a quantize
    always does (it prunes the quantizer's codes); every other stage is a unit of its own."""
    units: list[tuple[Stage, ...]] = []
    for stage in recipe.stages:
        last = units[-1] if units else ()
        if len(last) == 1 and _layer_stage(last[0]) and _layer_stage(stage) and last[0].kind != stage.kind \
                and (recipe.one_pass or last[0].kind == "quantize"):
            units[-1] = (last[0], stage)
        else:
            units.append((stage,))
    return units


def _layer_stage(stage: Stage) -> bool:
    return stage.kind == "quantize" or (stage.kind == "prune" and stage.config.method != "structured")


def stage_from_dump(index: int, kind: str, dump: dict) -> Stage:
    """The :class:`Stage` whose ``config.model_dump()`` is ``dump`` (how a stage is handed to the
    process that runs it)."""
    if kind in ("prune", "quantize"):
        return Stage(index, kind, METHODS[dump["method"]].config(**dump))
    if kind == "export":
        return Stage(index, kind, ExportConfig(**dump))
    if kind == "kv-cache":
        return Stage(index, kind, KVCacheConfig(**dump))
    return Stage(index, kind, TrainStageConfig(**dump))
