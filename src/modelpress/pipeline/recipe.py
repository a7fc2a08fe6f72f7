"""Recipes: one typed config per method, and the one table that maps a method's name to its
config and its layer stage (:data:`METHODS`). The CLI, the library verbs and (later) YAML
pipelines all read this table; a new layer method is one config class, one stage class and one
row here.

Every config is a pydantic model with ``extra="forbid"``: a misspelt field is an error that
names it, never a silent default.

Example:
    >>> METHODS["gptq"].config(bits=3, group_size=64).weight_format().name
    'int3-g64'
    >>> METHODS["gptq"].calibrated, METHODS["rtn"].calibrated
    (True, False)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelpress.algorithms.sparsity import Pattern
from modelpress.data import CALIB_128X512
from modelpress.errors import UserError
from modelpress.formats.activations import ActFormat, check_w8a8
from modelpress.formats.floats import parse_format
from modelpress.formats.integer import IntFormat
from modelpress.pipeline.prune_stages import MagnitudeStage, SparseGPTStage, StructuredScoreStage, WandaStage
from modelpress.pipeline.scale_stages import AWQStage, SmoothQuantStage
from modelpress.pipeline.stages import GPTQStage, LayerStage, RTNStage


class QuantConfig(BaseModel):
    """Fields every weight-quantization method shares: the format and what it applies to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str | None = None  # a format spec (nvfp4, fp8, nf4, int4-g128...): overrides the fields below
    bits: int = 4
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int | None = 128
    symmetric: bool = True
    symmetric_range: Literal["exact-negative", "full", "restricted"] = "exact-negative"  # see modelpress.formats.integer
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"])
    group_fallback: Literal["error", "keep", "shrink"] = "error"
    # module name (a regular expression, matched in full; the first match wins) -> format spec, or
    # "keep" to leave it in its float dtype: mixed precision, as `fit` writes it
    overrides: dict[str, str] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, overrides: dict[str, str]) -> dict[str, str]:
        for pattern, spec in overrides.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"overrides pattern {pattern!r} is not a valid regular expression: {e}") from None
            if spec != "keep":
                parse_format(spec)
        return overrides

    def format_for(self, module: str):
        """The format of Linear ``module``: the first ``overrides`` pattern that matches its
        whole name, else :meth:`weight_format`; ``None`` when an override keeps it in float."""
        for pattern, spec in self.overrides.items():
            if re.fullmatch(pattern, module):
                return None if spec == "keep" else self.spec_format(spec)
        return self.weight_format()

    def spec_format(self, spec: str):
        """The format ``spec`` names, with this config's observer, scale dtype and symmetric range."""
        return parse_format(spec, observer=self.observer, scale_dtype=self.scale_dtype,
                            symmetric_range=self.symmetric_range)

    @field_validator("exclude")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"exclude pattern {p!r} is not a valid regular expression: {e}") from None
        return patterns

    @field_validator("format")
    @classmethod
    def _valid_format(cls, spec: str | None) -> str | None:
        if spec is not None:
            parse_format(spec)
        return spec

    def weight_format(self) -> IntFormat:
        """The weight format: ``format`` when given (any spec, integer or float), else the
        integer format the other fields describe."""
        if self.format is not None:
            return self.spec_format(self.format)
        return IntFormat(
            bits=self.bits,
            granularity=self.granularity,
            group_size=self.group_size if self.granularity == "group" else None,
            symmetric=self.symmetric,
            symmetric_range=self.symmetric_range,
            observer=self.observer,
            scale_dtype=self.scale_dtype,
        )

    def act_format(self) -> ActFormat | None:
        """The Linear inputs' format (W8A8), or ``None``: weights only."""
        return None


class RTNConfig(QuantConfig):
    """Round-to-nearest over every Linear of the decoder layers.

    YAML:
        method: rtn
        # format: nvfp4       # or fp8, fp8-channel, nf4, mxfp4, int4-g128: instead of the fields below
        bits: 4
        granularity: group
        group_size: 128
        symmetric: true
        observer: mse
        exclude: ["lm_head"]
        group_fallback: error   # or: keep (leave such layers unquantized), shrink (smaller group)
        activations: none       # or: dynamic (W8A8: int8 per-token inputs; needs bits 8, no groups)
    """

    method: Literal["rtn"] = "rtn"
    activations: Literal["none", "dynamic"] = "none"

    def act_format(self) -> ActFormat | None:
        """The input-activation format (plain W8A8 without smoothing), or ``None``."""
        if self.activations == "none":
            return None
        check_w8a8(self.weight_format())
        return ActFormat(dynamic=True, scale_dtype=self.scale_dtype)


class CalibrationConfig(BaseModel):
    """Calibration text as token windows (protocol ``calib-128x512`` by default).

    ``text`` is a UTF-8 .txt, a .jsonl file with a ``"text"`` field, a .parquet file or saved
    ``datasets`` folder, or ``hf:NAME[:CONFIG][@SPLIT]`` (see :func:`modelpress.data.read_calibration`);
    ``None`` uses the small calibration text built into modelpress (offline, a few windows: fine
    for a first try, use your own domain text for production).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None
    text_field: str = "text"
    samples: int = Field(CALIB_128X512.n_windows, ge=1)
    seq_len: int = Field(CALIB_128X512.seq_len, ge=8)
    batch_size: int = Field(8, ge=1)


class GPTQConfig(QuantConfig):
    """GPTQ (arXiv:2210.17323), layer by layer over calibration data.

    YAML:
        method: gptq
        bits: 4
        group_size: 128
        observer: mse          # MSE-searched group scales inside GPTQ
        act_order: true        # columns by decreasing Hessian diagonal, static groups
        damp: 0.01
        block_size: 128
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    method: Literal["gptq"] = "gptq"
    # Group scales by MSE search (clipping) rather than min/max: measured on SmolLM2-135M int4 g64,
    # ppl-512 +10.7% over float against +17.0% with min/max, for about 8% more wall time.
    observer: Literal["minmax", "percentile", "mse"] = "mse"
    act_order: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    # Keep exact zeros at zero (a pruned model stays sparse; errors go to the surviving weights).
    # None: on when the input's modelpress.json says `prune` wrote it.
    keep_zeros: bool | None = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class AWQConfig(QuantConfig):
    """AWQ (arXiv:2306.00978), layer by layer over calibration data.

    YAML:
        method: awq
        bits: 4
        group_size: 128
        n_grid: 20             # alpha grid of the scale search, and ratios of the clip search
        scale_search: both     # s = x^a (activation), x^a / w^(1-a) (duo), or the best of both
        clip: true             # per-group clip search scored by output error
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    method: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=2)
    scale_search: Literal["activation", "duo", "both"] = "both"
    clip: bool = True
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class SmoothQuantConfig(QuantConfig):
    """SmoothQuant W8A8 (arXiv:2211.10438): smoothing folded into the norms, int8 weights and inputs.

    YAML:
        method: smoothquant
        alpha: 0.5             # migration strength: s = max|X|^alpha / max|W|^(1 - alpha)
        activations: dynamic   # int8 per-token scales at run time; or static: one calibrated scale per Linear
        weights: rtn           # or gptq (then damp, block_size, act_order apply)
        granularity: channel   # int8 symmetric weights, per channel (default) or tensor
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    method: Literal["smoothquant"] = "smoothquant"
    bits: int = 8
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = None
    alpha: float = Field(0.5, ge=0, le=1)
    activations: Literal["dynamic", "static"] = "dynamic"
    weights: Literal["rtn", "gptq"] = "rtn"
    act_order: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    def act_format(self) -> ActFormat:
        check_w8a8(self.weight_format())
        return ActFormat(dynamic=self.activations == "dynamic", scale_dtype=self.scale_dtype)


class PruneConfig(BaseModel):
    """Fields every pruning method shares: how much, in which pattern, and what it applies to.

    Give ``sparsity`` (a fraction of each Linear's weights) or ``pattern`` (N:M such as ``"2:4"``:
    N zeros in every M consecutive weights along a row), not both.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float | None = None
    pattern: str | None = None
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"])

    @model_validator(mode="after")
    def _one_pattern(self):
        self.sparsity_pattern()  # sparsity in [0, 1), N < M, exactly one of the two
        return self

    def sparsity_pattern(self) -> Pattern:
        if self.pattern is not None:
            if self.sparsity is not None:
                raise UserError("give --sparsity or --pattern, not both")
            return Pattern.parse(self.pattern)
        if self.sparsity is None:
            raise UserError("pruning needs --sparsity F (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
        return Pattern(sparsity=self.sparsity)


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: the smallest ``|W|`` of each Linear (or of each output row).

    YAML:
        method: magnitude
        sparsity: 0.5          # or pattern: "2:4"
        per_row: false         # compare within each output row instead of the whole matrix
    """

    method: Literal["magnitude"] = "magnitude"
    per_row: bool = False


class WandaConfig(PruneConfig):
    """Wanda (arXiv:2306.11695): ``|W_ij| * ||X_j||``, compared within each output row.

    YAML:
        method: wanda
        pattern: "2:4"
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    method: Literal["wanda"] = "wanda"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class SparseGPTConfig(PruneConfig):
    """SparseGPT (arXiv:2301.00774): adaptive masks and the OBS update, layer by layer.

    YAML:
        method: sparsegpt
        sparsity: 0.5
        block_size: 128        # columns per adaptive mask block (the paper's B_s)
        damp: 0.01
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, lt=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class StructuredConfig(BaseModel):
    """Structured pruning: remove MLP channels, attention heads and whole decoder layers, so the
    tensors and the config really shrink (Minitron's activation importance; ShortGPT's block
    influence or Gromov et al.'s angular distance for layers; see
    :mod:`modelpress.algorithms.structured`). Give any combination of the three.

    YAML:
        method: structured
        mlp_keep: 0.75            # fraction of MLP channels kept in every layer
        heads_keep: 0.75          # fraction of attention heads kept in every layer
        drop_layers: 4            # decoder layers removed
        layer_metric: block-influence   # or angular (the contiguous block closest in angle)
        head_mode: auto           # within-groups | whole-groups (grouped-query attention)
        channel_multiple: 32      # kept MLP width rounded to a multiple of this
        calibration: {text: calib.txt, samples: 128, seq_len: 512}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["structured"] = "structured"
    mlp_keep: float | None = Field(default=None, gt=0, le=1)
    heads_keep: float | None = Field(default=None, gt=0, le=1)
    drop_layers: int | None = Field(default=None, ge=0)
    layer_metric: Literal["block-influence", "angular"] = "block-influence"
    head_mode: Literal["auto", "within-groups", "whole-groups"] = "auto"
    channel_multiple: int = Field(default=32, ge=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _something_to_remove(self):
        if self.mlp_keep is None and self.heads_keep is None and not self.drop_layers:
            raise UserError("structured pruning needs --mlp-keep F, --heads-keep F or --drop-layers N (any combination)")
        return self


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: the config a method reads and the stage that runs it.

    ``calibrated`` methods run on the layer-by-layer runner; RTN (not calibrated) streams tensor
    by tensor in ``compress`` and uses its stage only inside a multi-stage layer pass.
    """

    config: type[QuantConfig] | type[PruneConfig]
    stage: type[LayerStage]
    kind: Literal["quantize", "prune"] = "quantize"  # the verb that runs it: compress or prune

    @property
    def calibrated(self) -> bool:
        return "calibration" in self.config.model_fields


METHODS: dict[str, Method] = {
    "rtn": Method(RTNConfig, RTNStage),
    "gptq": Method(GPTQConfig, GPTQStage),
    "awq": Method(AWQConfig, AWQStage),
    "smoothquant": Method(SmoothQuantConfig, SmoothQuantStage),
    "magnitude": Method(MagnitudeConfig, MagnitudeStage, kind="prune"),
    "wanda": Method(WandaConfig, WandaStage, kind="prune"),
    "sparsegpt": Method(SparseGPTConfig, SparseGPTStage, kind="prune"),
    "structured": Method(StructuredConfig, StructuredScoreStage, kind="prune"),
}


def methods(kind: str) -> list[str]:
    """The names of the methods one verb runs (``"quantize"``: compress; ``"prune"``: prune)."""
    return sorted(n for n, m in METHODS.items() if m.kind == kind)


def stage_for(config: QuantConfig | PruneConfig | StructuredConfig, arch) -> LayerStage:
    """The layer stage that runs ``config`` on a model of architecture ``arch``."""
    return METHODS[config.method].stage(config, arch)
