"""Sinks: where the results of a layer pass go. The caller picks one; the runner never names it.

- :class:`CompressedTensorsSink`: a compressed-tensors checkpoint (what ``compress`` writes),
  resumable after a crash.
- :class:`FloatSink`: a plain float checkpoint whose Linear weights are exactly what the stages
  left, plus ``artifacts/`` (each layer's stored codes, scales, zero points and masks as
  safetensors): the hand-off from one stage of a pipeline to the next, and what any engine or a
  later whole-model stage (distillation, QAT) can read.
- :class:`ObserveSink`: nothing; for a pass that only measures (structured pruning's scores).
- :class:`GGUFSink`: the GGUF block bytes of each Linear, kept for the GGUF writer
  (``export --to gguf --calibrate gptq``), which writes the file in llama.cpp's tensor order.

A sink is a context manager: an exception inside the ``with`` block aborts it, so nothing
half-written is left looking finished (a resumable sink keeps its ``OUT.partial`` for ``--resume``).

Protocol (what :func:`~modelpress.pipeline.runner.run_layers` calls):
``resuming``, ``scratch`` (a folder for the runner's resume files, or ``None`` if the sink cannot
resume), ``load_state()``, ``save_state(dict)``, ``begin(lm)`` (tensors outside the decoder
layers), ``write_layer(lm, i, results)`` and ``abort(keep)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from modelpress.export.checkpoint import CheckpointWriter
from modelpress.export.compressed_tensors import CompressedCheckpointWriter
from modelpress.models.layers import LayerwiseModel
from modelpress.pipeline.stages import LinearResult

ARTIFACTS = "artifacts"  # FloatSink: one safetensors file of stored values per decoder layer


class Sink(Protocol):
    resuming: bool
    scratch: Path | None

    def load_state(self) -> dict: ...

    def save_state(self, state: dict) -> None: ...

    def begin(self, lm: LayerwiseModel) -> None: ...

    def write_layer(self, lm: LayerwiseModel, i: int, results: dict[str, LinearResult]) -> None: ...

    def abort(self, keep: bool = True) -> None: ...


class _CheckpointSink:
    """What the two checkpoint sinks share: a writer, resume through it, the outside tensors."""

    writer: CheckpointWriter

    @property
    def resuming(self) -> bool:
        return self.writer.resuming

    @property
    def scratch(self) -> Path:
        return self.writer.tmp_dir

    def load_state(self) -> dict:
        return self.writer.load_state()

    def save_state(self, state: dict) -> None:
        self.writer.save_state(state)

    def begin(self, lm: LayerwiseModel) -> None:
        for name, tensor in lm.outside_layers():
            self.writer.add_tensor(name, tensor.to(lm.source_dtype(name)))
        self.writer.flush()  # to disk now, so that they leave memory with the model's copies

    def abort(self, keep: bool = True) -> None:
        self.writer.abort(keep=keep)

    def finish(self, **kwargs) -> Path:
        return self.writer.finish(**kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)


class CompressedTensorsSink(_CheckpointSink):
    """A compressed-tensors checkpoint: stored Linears packed, everything else in the source dtype.

    Example::

        with CompressedTensorsSink("smollm2-int4", resume=False) as sink:
            run_layers(lm, [GPTQStage(config, lm.arch)], formats, sink, ids, batch_size=8)
            sink.finish(config=..., ignore=[...])
    """

    def __init__(self, out_dir: str | Path, resume: bool = False):
        self.writer = CompressedCheckpointWriter(out_dir, resumable=True, resume=resume)

    def write_layer(self, lm: LayerwiseModel, i: int, results: dict[str, LinearResult]) -> None:
        state = lm.layer_list[i].state_dict()
        prefix = lm.layer_prefix(i) + "."
        for name in lm.layer_tensor_names(i):
            module = name.removesuffix(".weight")
            result = results.get(module) if name.endswith(".weight") else None
            if result is not None and result.stored is not None:
                self.writer.add_quantized(lm.checkpoint_name(module), result.stored, result.inputs)
            else:
                self.writer.add_tensor(lm.checkpoint_name(name), state[name.removeprefix(prefix)].to(lm.source_dtype(name)))

    def write_tensor(self, module: str, result: LinearResult) -> None:
        """One Linear outside the decoder layers (a quantized output head), after the pass."""
        self.writer.add_quantized(module, result.stored, result.inputs)


class FloatSink(_CheckpointSink):
    """A plain float checkpoint of what the stages left, with their artifacts beside it.

    By default (``changed_dtype="float32"``, the hand-off between pipeline stages) a Linear a
    stage changed is written in the dtype the stages computed in, so that its values are exactly
    the stage's (a bfloat16 copy of an int4 weight times an fp16 scale is not); with ``"source"``
    (``prune``'s output: an ordinary checkpoint) it keeps the source's dtype like every other
    tensor, and exact zeros stay exact. ``artifacts/layer-{i}.safetensors`` holds, per changed
    Linear ``M``: ``M.weight_codes``, ``M.weight_scale``, ``M.weight_zero_point`` (when the stage
    stored quantized codes) and ``M.weight_mask`` (when it pruned); ``artifacts=False`` leaves
    them out. ``zeros`` counts the exact zeros of each changed Linear as written.
    """

    def __init__(self, out_dir: str | Path, resume: bool = False, changed_dtype: str = "float32",
                 artifacts: bool = True):
        if changed_dtype not in ("float32", "source"):
            raise ValueError(f"changed_dtype must be float32 or source, not {changed_dtype!r}")
        self.writer = CheckpointWriter(out_dir, resumable=True, resume=resume)
        self.changed_dtype, self.artifacts = changed_dtype, artifacts
        self.zeros: dict[str, int] = {}

    def save_state(self, state: dict) -> None:
        self.writer.save_state({**state, "zeros": self.zeros})

    def load_state(self) -> dict:
        state = self.writer.load_state()
        self.zeros = dict(state.get("zeros", {}))
        return state

    def write_layer(self, lm: LayerwiseModel, i: int, results: dict[str, LinearResult]) -> None:
        state = lm.layer_list[i].state_dict()
        prefix = lm.layer_prefix(i) + "."
        artifacts: dict[str, torch.Tensor] = {}
        for name in lm.layer_tensor_names(i):
            tensor = state[name.removeprefix(prefix)]
            module = name.removesuffix(".weight")
            result = results.get(module) if name.endswith(".weight") else None
            if result is None or self.changed_dtype == "source":
                tensor = tensor.to(lm.source_dtype(name))
            if result is not None:
                self.zeros[lm.checkpoint_name(module)] = int((tensor == 0).sum())
                if self.artifacts:
                    artifacts.update(_artifacts(lm.checkpoint_name(module), result))
            self.writer.add_tensor(lm.checkpoint_name(name), tensor)
        if artifacts:
            folder = self.writer.tmp_dir / ARTIFACTS
            folder.mkdir(exist_ok=True)
            tmp = folder / f"layer-{i:05d}.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in artifacts.items()}, tmp)
            tmp.replace(folder / f"layer-{i:05d}.safetensors")


_ARTIFACT_FIELDS = {"q": "weight_codes", "scale": "weight_scale", "zero_point": "weight_zero_point"}


def _artifacts(module: str, result: LinearResult) -> dict[str, torch.Tensor]:
    """The stored values of one Linear's result, under compressed-tensors-like names."""
    out = {f"{module}.{suffix}": getattr(result.stored, field) for field, suffix in _ARTIFACT_FIELDS.items()
           if isinstance(getattr(result.stored, field, None), torch.Tensor)}
    if result.mask is not None:
        out[f"{module}.weight_mask"] = result.mask
    return out


class GGUFSink:
    """Keeps each Linear's GGUF bytes (by checkpoint weight name) for the GGUF writer.

    A result that stores GGUF bytes is kept as is; one that stores nothing (the layer's float
    weight is the result, e.g. after pruning) is encoded here in the Linear's GGUF format
    (``formats``: module name -> :class:`~modelpress.formats.gguf_blocks.GGUFBlockFormat`). In
    memory, about ``bits / 8`` bytes per weight of those Linears; not resumable (the file is
    written in one go after the pass).
    """

    resuming = False
    scratch = None

    def __init__(self, formats: dict):
        self.formats = formats
        self.encoded: dict[str, torch.Tensor] = {}

    def load_state(self) -> dict:
        raise RuntimeError("a GGUF sink has no state to resume")

    def save_state(self, state: dict) -> None:
        pass

    def begin(self, lm: LayerwiseModel) -> None:
        pass  # the GGUF writer encodes the tensors outside the layers itself

    def write_layer(self, lm: LayerwiseModel, i: int, results: dict[str, LinearResult]) -> None:
        for module, result in results.items():
            stored = result.stored
            if stored is None:
                stored = self.formats[module].quantize(lm.model.get_submodule(module).weight.data.to(torch.float32))
            self.encoded[lm.checkpoint_name(module) + ".weight"] = stored

    def abort(self, keep: bool = True) -> None:
        self.encoded.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


class ObserveSink:
    """Writes nothing and cannot resume: for a pass that only measures (the stages keep what
    they measured), such as structured pruning's importance scores."""

    resuming = False
    scratch = None

    def begin(self, lm: LayerwiseModel) -> None:
        pass

    def write_layer(self, lm: LayerwiseModel, i: int, results: dict[str, LinearResult]) -> None:
        pass

    def abort(self, keep: bool = True) -> None:
        pass
