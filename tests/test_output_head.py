"""The output head as a quantization target: an untied ``lm_head`` is quantized when no exclude
pattern matches it (GPTQ from the Hessian of what it receives, or round-to-nearest), a tied one
stays in float, and plain transformers computes with exactly the stored head."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CrashingSink, austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.compress import GPTQConfig, RTNConfig, compress, compress_calibrated
from modelpress.export.compressed_tensors import read_quantized
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel, run_layer
from modelpress.models.tensors import head_name

UNTIED = ["llama", "qwen3", "gemma2", "phi3", "mixtral", "qwen2_moe"]


def _gptq(**kw) -> GPTQConfig:
    fields = dict(bits=4, group_size=32, exclude=[],
                  calibration={"text": str(austen("emma.txt")), "samples": 8, "seq_len": 64, "batch_size": 4})
    return GPTQConfig(**{**fields, **kw})


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24))


@pytest.mark.parametrize("model_type", UNTIED)
def test_head_inputs_are_what_the_head_receives(tiny_models, model_type):
    """The modules found between the last layer and the head turn the layer runner's last
    outputs into exactly the head's input in a whole-model forward (no architecture table)."""
    path = tiny_models[model_type]
    lm = LayerwiseModel(loading.resolve(path))
    head = head_name(lm.model)
    lm.prepare_head(head)
    batches = [_ids()]
    capture = lm.capture(batches)
    hidden = capture.hidden
    for i in range(lm.n_layers):
        hidden = run_layer(lm.load_layer(i), hidden, capture.kwargs[i])
    lm.free_outside_layers()  # the final norm is kept for head_inputs; the head itself is freed
    assert lm.model.get_submodule(head).weight.device.type == "meta"
    got = lm.head_inputs(hidden)[0]
    full = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = {}
    full.get_submodule(head).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        full(input_ids=batches[0])
    torch.testing.assert_close(got, seen["x"], rtol=1e-5, atol=1e-5)
    assert torch.equal(lm.deferred_tensor(f"{head}.weight"), full.get_submodule(head).weight)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_gptq_quantizes_an_untied_head_and_transformers_computes_with_it(tiny_models, tmp_path, model_type):
    path, out = tiny_models[model_type], tmp_path / "q"
    record = compress(str(path), _gptq(), str(out), quality_guard=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in qc["ignore"]
    tensors = checkpoint_tensors(out)
    assert "lm_head.weight_packed" in tensors and "lm_head.weight" not in tensors
    head, first = record["layers"]["lm_head"], next(v for k, v in record["layers"].items() if k != "lm_head")
    assert head["format"] == "int4-g32" and head["tokens"] == first["tokens"] > 8 * 64
    # plain transformers' logits are the float model's with every stored weight dequantized, the head's included
    stored = read_quantized(out, qc)
    assert "lm_head" in stored
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, qt in stored.items():
        ours.get_submodule(name).weight.data = qt.dequantize().to(torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_gptq_head_has_less_output_error_than_round_to_nearest(tiny_models, tmp_path):
    """The head's GPTQ uses its input Hessian: on those inputs its output error is below rounding's."""
    path = tiny_models["llama"]
    gptq = compress(str(path), _gptq(bits=3), str(tmp_path / "g"), quality_guard=False)["layers"]["lm_head"]
    lm = LayerwiseModel(loading.resolve(path))
    W = lm.deferred_tensor("lm_head.weight").float()
    g = read_quantized(tmp_path / "g", json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"])
    r = _gptq(bits=3).format_for("lm_head").quantize(W)
    assert g["lm_head"].fmt.name == r.fmt.name == "int3-g32"
    assert not torch.equal(g["lm_head"].q, r.q)
    err_gptq, err_rtn = _rel_error(path, W, g["lm_head"].dequantize()), _rel_error(path, W, r.dequantize())
    print(f"head output error: gptq {err_gptq:.5f} (its own {gptq['output_rel_mse']:.5f}), rtn {err_rtn:.5f}")
    assert err_gptq < 0.9 * err_rtn


def _rel_error(path, W, W_hat) -> float:
    """The head's relative output error on the calibration inputs, from a whole-model forward."""
    from modelpress.data import read_text

    tokenizer = loading.load_tokenizer(loading.resolve(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(read_text(austen("emma.txt")), add_special_tokens=False)["input_ids"]
    x = {}
    model.lm_head.register_forward_pre_hook(lambda m, args: x.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor(ids[: 8 * 64]).reshape(8, 64))
    X = x["x"].reshape(-1, W.shape[1])
    return ((X @ (W_hat - W).T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()


def test_round_to_nearest_streams_the_head_too(tiny_models, tmp_path):
    path, out = tiny_models["qwen3"], tmp_path / "r"
    record = compress(str(path), RTNConfig(bits=8, granularity="channel", group_size=None, exclude=[]), str(out),
                      quality_guard=False)
    stored = read_quantized(out, json.loads((out / "config.json").read_text())["quantization_config"])
    W = LayerwiseModel(loading.resolve(path)).deferred_tensor("lm_head.weight").float()
    assert torch.equal(stored["lm_head"].q, RTNConfig(bits=8, granularity="channel", group_size=None)
                       .format_for("lm_head").quantize(W).q)
    assert record["layers"]["lm_head"]["format"] == "int8-channel"


def test_the_default_exclude_and_a_tied_head_keep_it_in_float(tiny_models, tmp_path):
    default = compress(str(tiny_models["llama"]), _gptq(exclude=["lm_head"]), str(tmp_path / "d"),
                       quality_guard=False)
    assert "lm_head" not in default["layers"] and "lm_head.weight" in checkpoint_tensors(tmp_path / "d")
    tied = compress(str(tiny_models["gemma3_text"]), _gptq(), str(tmp_path / "t"), quality_guard=False)
    assert "lm_head" not in tied["layers"]
    assert "tied to the input embedding" in tied["kept_unquantized"]["lm_head"]
    assert not any(k.startswith("lm_head") for k in checkpoint_tensors(tmp_path / "t"))  # still stored once
    loading.load_model(loading.resolve(tmp_path / "t"))


def test_resume_after_the_last_layer_quantizes_the_head_the_same(tiny_models, tmp_path):
    """Killed after the last layer was saved, before the head: the resumed run equals a straight one."""
    path, config = tiny_models["llama"], _gptq()
    compress(str(path), config, str(tmp_path / "straight"), quality_guard=False)

    class LastLayerCrash(CrashingSink):
        def save_state(self, state):
            super().save_state(state)
            if state["layers_done"] == 2:
                raise KeyboardInterrupt

        def write_layer(self, lm, i, results):
            super(CrashingSink, self).write_layer(lm, i, results)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress_calibrated(str(path), config, str(out), make_sink=LastLayerCrash)
    record = compress(str(path), config, str(out), resume=True, quality_guard=False)
    assert record["resumed_at_layer"] == 2
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(out)
    assert a.keys() == b.keys() and "lm_head.weight_packed" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_quantizes_the_head_when_asked(tiny_models, tmp_path):
    from modelpress.cli import main

    path = tiny_models["llama"]
    assert main(["compress", str(path), "--method", "rtn", "--bits", "8", "--granularity", "channel",
                 "--quantize-head", "--no-quality-guard", "-o", str(tmp_path / "h")]) == 0
    assert "lm_head.weight_packed" in checkpoint_tensors(tmp_path / "h") or \
        "lm_head.weight_scale" in checkpoint_tensors(tmp_path / "h")
    # named in the targets: vLLM builds the head as an embedding subclass that "Linear" does not match
    (group,) = json.loads((tmp_path / "h" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["targets"] == ["Linear", "lm_head"]
    assert main(["compress", str(path), "--method", "rtn", "--bits", "8", "--granularity", "channel",
                 "--no-quality-guard", "-o", str(tmp_path / "f")]) == 0
    assert "lm_head.weight" in checkpoint_tensors(tmp_path / "f")  # the default keeps it in float


def test_the_planner_counts_a_stored_quantized_head_as_quantized(tiny_models, tmp_path):
    """The run table's planner bytes: with the head's scale in the checkpoint, the head is priced
    in the format like the Linears, and the count matches the bytes on disk either way."""
    from modelpress.cli import main
    from modelpress.models.shape import shape_from_config
    from modelpress.plan.formats import as_written_from, config_dtype, plan_format
    from modelpress.plan.memory import weight_bytes

    def planned(folder):
        source = loading.resolve(folder)
        config = loading.load_config(source)
        shape = shape_from_config(config, "tiny", loading.tensor_headers(source))
        return weight_bytes(shape, as_written_from(plan_format("int8"), config_dtype(config)))

    path = tiny_models["llama"]
    for flags, out in ((["--quantize-head"], tmp_path / "h"), ([], tmp_path / "f")):
        assert main(["compress", str(path), "--method", "rtn", "--bits", "8", "--granularity", "channel", *flags,
                     "--no-quality-guard", "-o", str(out)]) == 0
        on_disk = sum(t.nbytes for t in checkpoint_tensors(out).values())
        assert planned(out) == pytest.approx(on_disk, rel=0.01)
    assert planned(tmp_path / "h") < 0.8 * planned(tmp_path / "f")  # a 384 x 64 float32 head of a 0.26 MB model
