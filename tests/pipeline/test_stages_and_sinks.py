"""The seam: a new layer method is a stage, several stages share one layer pass, and every sink
takes any stage's results."""

from __future__ import annotations

import json

import torch
from conftest import checkpoint_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelpress.export.gguf import GGUFLayout, export_gguf, read_gguf_weights
from modelpress.formats.gguf_blocks import gguf_format
from modelpress.formats.integer import parse_int_format
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel
from modelpress.pipeline.runner import run_layers
from modelpress.pipeline.sinks import CompressedTensorsSink, FloatSink, GGUFSink
from modelpress.pipeline.stages import HESSIAN, LinearResult, RTNStage


class Scale:
    """A trivial layer method: every target weight times ``factor``; nothing stored but the float weight."""

    needs = frozenset()

    def __init__(self, factor: float, only: str = ""):
        self.factor, self.only = factor, only

    def run(self, layer, prefix, modules, formats, stats):
        out = {}
        for name, linear in modules.items():
            if not name.endswith(self.only):
                continue
            linear.weight.data = linear.weight.data * self.factor
            out[name] = LinearResult(stored=None, nbytes=4 * linear.weight.numel(), info={"scaled_by": self.factor})
        return out


class DownInputEnergy:
    """Records tr(H) of each down projection's input: what the stage's statistics saw."""

    needs = frozenset({HESSIAN})

    def run(self, layer, prefix, modules, formats, stats):
        return {n: LinearResult(stored=None, nbytes=0, info={"trace_H": stats.hessian(n)[0].trace().item()})
                for n in modules if n.endswith("down_proj")}


def _model(path, fmt_of=lambda name: parse_int_format("int4-g32")):
    """The model, layers not loaded, and a format for each of its decoder Linears."""
    lm = LayerwiseModel(loading.resolve(path))
    return lm, {n: fmt_of(n) for n, m in lm.model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith(lm.prefix + ".")}


def _pass(lm, formats, stages, sink):
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return run_layers(lm, stages, formats, sink, ids, batch_size=2)


class _NoWrite:
    """A sink that keeps nothing (the stages' numbers come back in the pass result)."""

    resuming, scratch = False, None

    def begin(self, lm):
        pass

    def write_layer(self, lm, i, results):
        pass

    def abort(self, keep=True):
        pass


def _logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


def test_trivial_stage_through_the_compressed_tensors_sink_leaves_the_model_unchanged(tiny_llama, tmp_path):
    lm, formats = _model(tiny_llama)
    with CompressedTensorsSink(tmp_path / "ct") as sink:
        run = _pass(lm, formats, [Scale(1.0)], sink)
        sink.finish(config=loading.clean_config(lm.config).to_dict(), copy_files_from=tiny_llama)
    assert all(layer["scaled_by"] == 1.0 for layer in run.layers.values()) and len(run.layers) == 14
    ids = torch.randint(3, 300, (1, 24))
    torch.testing.assert_close(_logits(tmp_path / "ct", ids), _logits(tiny_llama, ids))


def test_float_sink_holds_exactly_what_the_stages_left_and_their_artifacts(tiny_llama, tmp_path):
    lm, formats = _model(tiny_llama)
    with FloatSink(tmp_path / "float") as sink:
        _pass(lm, formats, [Scale(2.0), RTNStage(None, None)], sink)
        sink.finish(config=loading.clean_config(lm.config).to_dict(), copy_files_from=tiny_llama)
    source, written = checkpoint_tensors(tiny_llama), checkpoint_tensors(tmp_path / "float")
    name = "model.layers.1.mlp.up_proj"
    expected = parse_int_format("int4-g32").quantize(2 * source[name + ".weight"])  # the stages in order
    assert torch.equal(written[name + ".weight"], expected.dequantize())
    artifacts = load_file(tmp_path / "float" / "artifacts" / "layer-00001.safetensors")
    assert torch.equal(artifacts[name + ".weight_codes"], expected.q)
    assert torch.equal(artifacts[name + ".weight_scale"], expected.scale)
    assert torch.equal(written["model.norm.weight"], source["model.norm.weight"])  # outside the layers: as is
    assert json.loads((tmp_path / "float" / "config.json").read_text())["model_type"] == "llama"
    AutoModelForCausalLM.from_pretrained(tmp_path / "float")  # a plain checkpoint


def test_a_later_stage_sees_the_layer_as_the_earlier_one_left_it(tiny_llama, tmp_path):
    """Its statistics are collected again: doubling up_proj doubles down_proj's input, so H x4
    (in the first layer; the second's inputs come from the changed first)."""
    traces = {}
    for factor in (1.0, 2.0):
        run = _pass(*_model(tiny_llama), [Scale(factor, only="up_proj"), DownInputEnergy()], _NoWrite())
        assert run.layers["model.layers.0.mlp.up_proj"]["scaled_by"] == factor
        traces[factor] = run.layers["model.layers.0.mlp.down_proj"]["trace_H"]
    assert abs(traces[2.0] / traces[1.0] - 4.0) < 1e-4


def test_trivial_stage_through_the_gguf_sink_gives_the_plain_encoding(tiny_llama, tmp_path):
    """A stage that stores nothing: the GGUF sink encodes the layer's float weight in the Linear's
    type, which for an unchanged layer is exactly llama.cpp's plain encoding of the checkpoint."""
    layout = GGUFLayout(loading.load_config(loading.resolve(tiny_llama)), "q8_0")
    types = {e.name: e.type for e in layout.entries}
    lm, formats = _model(tiny_llama, lambda name: gguf_format(types[name + ".weight"]))
    with GGUFSink(formats) as sink:
        _pass(lm, formats, [Scale(1.0)], sink)
    export_gguf(str(tiny_llama), str(tmp_path / "staged.gguf"), "q8_0", encoded=sink.encoded)
    export_gguf(str(tiny_llama), str(tmp_path / "plain.gguf"), "q8_0")
    assert len(sink.encoded) == 14
    assert (tmp_path / "staged.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    weights = read_gguf_weights(tmp_path / "staged.gguf", layout)
    assert torch.isfinite(weights["model.layers.0.mlp.up_proj.weight"]).all()
