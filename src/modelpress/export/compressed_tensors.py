"""Write quantized weights as a compressed-tensors checkpoint (what transformers and vLLM load).

Layouts, by format (verified against compressed-tensors' own decompressors; see the tests):

==================  =====================================================  ====================
format              tensors per quantized Linear ``M``                     used for
==================  =====================================================  ====================
``pack-quantized``  ``M.weight_packed`` int32 (``32 / bits`` codes each),   symmetric int, any
                    ``M.weight_scale``, ``M.weight_shape``                  bit width
``int-quantized``   ``M.weight`` int8 codes, ``M.weight_scale``,            asymmetric int;
                    ``M.weight_zero_point`` int8 (asymmetric only),        W8A8 (any int8 weight
                    ``M.input_scale`` ``(1,)`` (static activations only)   with quantized inputs)
==================  =====================================================  ====================

W8A8 follows llm-compressor's ``W8A8`` preset, which vLLM's int8 kernels take: ``int-quantized``
weights (int8, symmetric, per channel or tensor) and ``input_activations`` args (int8 symmetric,
dynamic per-token, or static per-tensor with ``M.input_scale``).

Asymmetric weights use ``int-quantized`` (8 bits per code on disk) because compressed-tensors
0.20's packed loader allocates an unpacked zero-point tensor and fails on packed ones; the
*values* are still ``bits``-bit codes and one zero point per group, and the run record reports
the packed size. Scales are stored in the format's ``scale_dtype``; per-tensor scales have
shape ``(1,)`` as compressed-tensors expects.

Each distinct (format, quantization args) pair becomes one config group whose targets are the
exact module names, so mixed precision (group-size fallbacks) is described faithfully; every
other Linear is listed in ``ignore``. A single group targets the class name ``Linear``, plus a
quantized output head by its name: vLLM builds the head as ``ParallelLMHead``, an embedding
subclass that the class name does not match, and refuses the packed head otherwise (measured,
vLLM 0.32: "no module or parameter named 'lm_head.weight_packed'"). Float and lookup formats (FP8, NVFP4, MXFP4, NF4) are laid
out by :mod:`modelpress.export.compressed_tensors_floats`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Collection

import torch

from modelpress.export import compressed_tensors_floats as floats
from modelpress.export.checkpoint import CheckpointWriter
from modelpress.formats.activations import ActFormat, InputQuant
from modelpress.formats.floats import FORMAT_CLASSES
from modelpress.formats.integer import SCALE_DTYPES, IntFormat, QuantizedTensor

logger = logging.getLogger("modelpress")


def storage_format(fmt: IntFormat, act: ActFormat | None = None) -> str:
    """The compressed-tensors format name a weight in ``fmt`` is stored as (with inputs in ``act``)."""
    if not isinstance(fmt, IntFormat):
        return floats.storage_format(fmt)
    return "pack-quantized" if fmt.symmetric and act is None else "int-quantized"


def quantization_args(fmt: IntFormat):
    from compressed_tensors.quantization import QuantizationArgs

    if not isinstance(fmt, IntFormat):
        return floats.quantization_args(fmt)
    return QuantizationArgs(
        num_bits=fmt.bits,
        type="int",
        symmetric=fmt.symmetric,
        strategy=fmt.granularity,
        group_size=fmt.group_size if fmt.granularity == "group" else None,
    )


def input_activation_args(act: ActFormat):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=act.bits, type="int", symmetric=True, strategy=act.strategy, dynamic=act.dynamic)


def compressed_tensors(module: str, qt: QuantizedTensor, inputs: InputQuant | None = None) -> dict[str, torch.Tensor]:
    """The tensors that store ``qt`` (and a static input scale) for Linear ``module``, by name."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt = qt.fmt
    if not isinstance(fmt, IntFormat):
        return floats.checkpoint_tensors(module, qt)
    scale = qt.scale.to(SCALE_DTYPES[fmt.scale_dtype])
    zero = qt.zero_point
    if fmt.granularity == "tensor":
        scale = scale.reshape(1)
        zero = None if zero is None else zero.reshape(1)
    out = {f"{module}.weight_scale": scale}
    if storage_format(fmt, inputs and inputs.fmt) == "pack-quantized":
        out[f"{module}.weight_packed"] = pack_to_int32(qt.q, fmt.bits)
        out[f"{module}.weight_shape"] = torch.tensor(list(qt.q.shape), dtype=torch.int64)
    else:
        out[f"{module}.weight"] = qt.q
    if zero is not None:
        out[f"{module}.weight_zero_point"] = zero
    if inputs is not None and inputs.scale is not None:
        out[f"{module}.input_scale"] = inputs.scale.reshape(1).to(SCALE_DTYPES[inputs.fmt.scale_dtype])
    return out


def quantization_config(formats: dict[str, IntFormat], ignore: list[str],
                        activations: dict[str, ActFormat] | None = None, named: Collection[str] = ()) -> dict | None:
    """The ``quantization_config`` entry of ``config.json`` for these module formats (and the
    input-activation formats of the modules listed in ``activations``); ``None`` when every weight
    is stored dequantized. ``named``: modules that are no ``Linear`` to an engine (the output head),
    named in their group's targets even when one group targets every Linear."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    activations = activations or {}
    groups: dict[tuple[str, IntFormat, ActFormat | None], list[str]] = {}
    dequantized = [m for m, fmt in formats.items() if storage_format(fmt) == floats.DEQUANTIZED]
    for module, fmt in formats.items():
        if module not in dequantized:
            act = activations.get(module)
            groups.setdefault((storage_format(fmt, act), fmt, act), []).append(module)
    if not groups:
        return None
    ignore = list(ignore) + dequantized

    def scheme(targets: list[str], fmt: IntFormat, act: ActFormat | None, fmt_name: str):
        return QuantizationScheme(targets=targets, weights=quantization_args(fmt), format=fmt_name,
                                  input_activations=None if act is None else input_activation_args(act))

    if len(groups) == 1:
        ((fmt_name, fmt, act),) = groups
        schemes = {"group_0": scheme(["Linear", *sorted(set(named) & set(formats))], fmt, act, fmt_name)}
    else:
        schemes = {f"group_{i}": scheme(sorted(mods), fmt, act, fmt_name)
                   for i, ((fmt_name, fmt, act), mods) in enumerate(groups.items())}
    fmt_names = sorted({name for name, _, _ in groups})
    qc = QuantizationConfig(
        config_groups=schemes,
        ignore=sorted(ignore),
        format=fmt_names[0] if len(fmt_names) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    return qc.to_dict()


class CompressedCheckpointWriter(CheckpointWriter):
    """A :class:`CheckpointWriter` that also stores quantized Linears and their config.

    Example:
        >>> import tempfile
        >>> from modelpress.formats import IntFormat
        >>> qt = IntFormat(bits=4, group_size=32).quantize(torch.randn(8, 64))
        >>> with CompressedCheckpointWriter(Path(tempfile.mkdtemp()) / "ckpt") as w:
        ...     w.add_quantized("model.layers.0.mlp.up_proj", qt)
        ...     _ = w.finish(config={"model_type": "llama"}, ignore=["lm_head"])
        >>> w.formats["model.layers.0.mlp.up_proj"].name
        'int4-g32'
    """

    def __init__(self, out_dir: str | Path, **kwargs):
        super().__init__(out_dir, **kwargs)
        self.formats: dict[str, IntFormat] = {}
        self.activations: dict[str, ActFormat] = {}  # modules whose inputs are quantized too (W8A8)

    def add_quantized(self, module: str, qt: QuantizedTensor, inputs: InputQuant | None = None) -> None:
        """Store Linear ``module``'s weight ``qt`` and, for W8A8, how its input is quantized."""
        for name, tensor in compressed_tensors(module, qt, inputs).items():
            self.add_tensor(name, tensor)
        self.formats[module] = qt.fmt
        if inputs is not None:
            self.activations[module] = inputs.fmt

    def save_state(self, extra: dict) -> None:
        fields = {m: {"kind": type(f).__name__, **f.__dict__} for m, f in self.formats.items()}
        super().save_state({**extra, "format_fields": fields,
                            "activation_fields": {m: f.__dict__ for m, f in self.activations.items()}})

    def load_state(self) -> dict:
        state = super().load_state()
        classes = {"IntFormat": IntFormat, **FORMAT_CLASSES}
        self.formats = {m: classes[fields.pop("kind", "IntFormat")](**fields)
                        for m, fields in state["format_fields"].items()}
        self.activations = {m: ActFormat(**fields) for m, fields in state.get("activation_fields", {}).items()}
        return state

    def finish(self, config: dict, ignore: list[str] = (), named: Collection[str] = (), **kwargs) -> Path:
        """Write ``config`` with its ``quantization_config`` and complete the checkpoint.

        Args:
            config: the model config dict, without a quantization config.
            ignore: the Linear modules left unquantized (``lm_head`` and exclusions).
            named: quantized modules to name in the targets (the output head, see the module doc).
            **kwargs: passed to :meth:`CheckpointWriter.finish`.
        """
        config = dict(config)
        dequantized = sum(storage_format(f) == floats.DEQUANTIZED for f in self.formats.values())
        if dequantized:
            logger.warning("%d layers are in a format compressed-tensors cannot store (NF4); they are "
                           "written dequantized, in float32", dequantized)
        qc = quantization_config(self.formats, list(ignore), self.activations, named) if self.formats else None
        if qc is not None:
            config["quantization_config"] = qc
        return super().finish(config=config, **kwargs)


def _int_format(args: dict, scale_dtype: torch.dtype) -> IntFormat | None:
    """The :class:`IntFormat` of a config group's ``weights`` args (``None``: not an int format)."""
    if args.get("type") != "int" or args.get("strategy") not in ("tensor", "channel", "group"):
        return None
    dtype = next((k for k, v in SCALE_DTYPES.items() if v == scale_dtype), None)
    if dtype is None:
        return None
    return IntFormat(bits=args["num_bits"], granularity=args["strategy"], symmetric=args.get("symmetric", True),
                     group_size=args.get("group_size") if args["strategy"] == "group" else None, scale_dtype=dtype)


def read_quantized(folder: str | Path, quantization_config: dict) -> dict[str, QuantizedTensor]:
    """The integer-quantized Linears of a compressed-tensors checkpoint, as stored: module name ->
    codes, scales and zero points (the inverse of :func:`compressed_tensors`; a module whose
    format is not an integer one is left out).

    Example:
        >>> import tempfile
        >>> qt = IntFormat(bits=4, group_size=32).quantize(torch.randn(8, 64))
        >>> with CompressedCheckpointWriter(Path(tempfile.mkdtemp()) / "ckpt") as w:
        ...     w.add_quantized("model.layers.0.mlp.up_proj", qt)
        ...     out = w.finish(config={"model_type": "llama"}, ignore=["lm_head"])
        >>> import json
        >>> back = read_quantized(out, json.loads((out / "config.json").read_text())["quantization_config"])
        >>> torch.equal(back["model.layers.0.mlp.up_proj"].q, qt.q)
        True
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(
                (".weight_scale", ".weight_packed", ".weight_shape", ".weight_zero_point", ".weight"))})
    groups = (quantization_config.get("config_groups") or {}).values()
    out = {}
    for module in (k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")):
        args = next((g["weights"] for g in groups if module in g.get("targets", []) or "Linear" in g.get("targets", [])),
                    None)
        fmt = None if args is None else _int_format(args, tensors[f"{module}.weight_scale"].dtype)
        if fmt is None:
            continue
        if f"{module}.weight_packed" in tensors:
            shape = tensors[f"{module}.weight_shape"].tolist()
            q = unpack_from_int32(tensors[f"{module}.weight_packed"], fmt.bits, torch.Size(shape)).to(torch.int8)
        else:
            q = tensors[f"{module}.weight"].to(torch.int8)
        rows = 1 if fmt.granularity == "tensor" else q.shape[0]
        scale = tensors[f"{module}.weight_scale"].float().reshape(rows, -1)
        zero = tensors.get(f"{module}.weight_zero_point")
        out[module] = QuantizedTensor(q=q, scale=scale, zero_point=None if zero is None else zero.reshape(rows, -1),
                                      fmt=fmt)
    return out
