"""``compress``: the public verb that turns a float checkpoint into a quantized one.

One typed config per method, dispatched from one visible table (:data:`METHODS`). The output is
a compressed-tensors checkpoint that plain ``transformers`` (and vLLM) load, plus
``modelpress.json``: the config, versions, sizes, timings and per-layer error.

Example::

    from modelpress.compress import compress, RTNConfig
    record = compress("smollm2-135m/", RTNConfig(bits=4, group_size=64), "smollm2-int4/")
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from modelpress.algorithms.rtn import rtn
from modelpress.data import CALIB_128X512
from modelpress.errors import UserError
from modelpress.formats.activations import ActFormat, InputQuant, check_w8a8
from modelpress.formats.floats import parse_format
from modelpress.formats.integer import IntFormat
from modelpress.models import loading
from modelpress.models.arch import arch_for
from modelpress.models.loading import meta_model
from modelpress.models.tensors import plan_targets, tensor_stream
from modelpress.progress import track
from modelpress.record import build_record, to_json

logger = logging.getLogger("modelpress")


class QuantConfig(BaseModel):
    """Fields every weight-quantization method shares: the format and what it applies to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str | None = None  # a format spec (nvfp4, fp8, nf4, int4-g128...): overrides the fields below
    bits: int = 4
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int | None = 128
    symmetric: bool = True
    symmetric_range: Literal["full", "restricted"] = "full"  # restricted: max|w| / (2^(b-1) - 1)
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"])
    group_fallback: Literal["error", "keep", "shrink"] = "error"

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

    def int_format(self) -> IntFormat:
        """The weight format: ``format`` when given (any spec, integer or float), else the
        integer format the other fields describe."""
        if self.format is not None:
            return parse_format(self.format, observer=self.observer, scale_dtype=self.scale_dtype,
                                symmetric_range=self.symmetric_range)
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
        check_w8a8(self.int_format())
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
        check_w8a8(self.int_format())
        return ActFormat(dynamic=self.activations == "dynamic", scale_dtype=self.scale_dtype)


METHODS: dict[str, type[QuantConfig]] = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig,
                                         "smoothquant": SmoothQuantConfig}


def compress(model: str, config: QuantConfig, out_dir: str, resume: bool = False, quality_guard: bool = True) -> dict:
    """Compress ``model`` with the method ``config`` names; see :func:`compress_rtn` and
    :func:`modelpress.layerwise.compress_layerwise`.

    With ``quality_guard`` the written model is then scored against ``model`` on a little of the
    calibration text (:mod:`modelpress.eval.guard`): an exploded perplexity fails the run and the
    output is renamed ``OUT.rejected``; the two perplexities go into the record.
    """
    config.act_format()  # W8A8's constraints on the weight format fail before any work
    if isinstance(config, RTNConfig):
        if resume:
            raise UserError("--resume applies to calibrated methods; an RTN run is quick to redo")
        record = compress_rtn(model, config, out_dir)
    else:
        from modelpress.layerwise import compress_layerwise

        record = compress_layerwise(model, config, out_dir, resume=resume)
    if quality_guard:
        record["quality_guard"] = _guard(model, config, out_dir)
    return record


def _guard(model: str, config: QuantConfig, out_dir: str) -> dict | None:
    from pathlib import Path

    from modelpress.data import builtin_text, read_calibration
    from modelpress.eval.guard import check_output

    source = loading.resolve(model)
    calib = getattr(config, "calibration", None)
    text = builtin_text() if calib is None or calib.text is None else read_calibration(calib.text, calib.text_field)
    n_params = sum(p.numel() for p in meta_model(loading.load_config(source)).parameters())
    result = check_output(source, out_dir, text, n_params)
    if result is None:
        return None
    summary = {"source_ppl": result.source_ppl, "output_ppl": result.output_ppl,
               "windows": result.windows, "seq_len": result.seq_len}
    path = Path(out_dir) / "modelpress.json"  # the record in the checkpoint gets the guard's numbers
    record = json.loads(path.read_text())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json({**record, "quality_guard": summary}, indent=2))
    tmp.replace(path)
    return summary


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
    from modelpress.export.compressed_tensors import CompressedCheckpointWriter

    t0 = time.monotonic()
    source = loading.resolve(model)
    hf_config = loading.load_config(source)
    if arch_for(hf_config).moe:  # fail early, before any work, on an unsupported architecture
        raise UserError("RTN does not handle mixture-of-experts models yet (transformers fuses their experts); "
                        "use a calibrated method such as GPTQ, which quantizes each expert")
    meta = meta_model(hf_config)
    targets = plan_targets(meta, config)
    tokenizer = loading.load_tokenizer(source)
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


def finish_checkpoint(writer, source, hf_config, model: nn.Module, targets, tokenizer, record: dict,
                      checkpoint_name=lambda name: name) -> None:
    """Complete a compressed checkpoint: config with its quantization config (every Linear not
    in ``targets`` is listed as ignored, under its ``checkpoint_name``), tokenizer, run record,
    and the source's side files."""
    writer.finish(
        config=targets.output_config(hf_config),
        tokenizer=tokenizer,
        ignore=[checkpoint_name(n) for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n not in targets.formats],
        extra_files={"modelpress.json": to_json(record, indent=2)},
        copy_files_from=source.path if source.kind == "folder" else None,
    )
