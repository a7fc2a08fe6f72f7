"""`prune`: magnitude, Wanda and SparseGPT on tiny models of every architecture; the output is a
dense checkpoint with exact zeros that plain transformers loads, and the zeros survive quantization."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.compress import GPTQConfig, RTNConfig, compress
from modelpress.pipeline.recipe import MagnitudeConfig, SparseGPTConfig, WandaConfig
from modelpress.pipeline.sinks import FloatSink
from modelpress.prune import prune

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
                   "out_proj", "qkv_proj", "gate_up_proj", "dense")


def _calib(**kw) -> dict:
    return {"text": str(austen("emma.txt")), "samples": 8, "seq_len": 64, "batch_size": 4, **kw}


def _pruned_linears(folder) -> dict[str, torch.Tensor]:
    return {n: t for n, t in checkpoint_tensors(folder).items()
            if n.endswith(".weight") and ".layers." in n and t.dim() == 2 and n.removesuffix(".weight").endswith(LINEAR_SUFFIXES)}


def _dense_weights(folder) -> dict[str, torch.Tensor]:
    """A compressed-tensors checkpoint's weights, decompressed by transformers itself."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.state_dict()


def _logit_error(path, out, ids) -> float:
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return (got(ids).logits - ref(ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3", "phi3", "opt", "mixtral"])
def test_every_method_on_every_architecture_writes_a_loadable_dense_checkpoint(tiny_models, tmp_path, model_type):
    path = tiny_models[model_type]
    for name, config in {"magnitude": MagnitudeConfig(pattern="2:4"),
                         "wanda": WandaConfig(pattern="2:4", calibration=_calib()),
                         "sparsegpt": SparseGPTConfig(pattern="2:4", calibration=_calib())}.items():
        out = tmp_path / name
        record = prune(str(path), config, str(out), quality_guard=False)
        linears = _pruned_linears(out)
        assert linears, "no pruned Linear found"
        for tensor_name, W in linears.items():  # measured in the file: 2 zeros in every 4 along the input
            groups = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
            assert (groups >= 2).all(), tensor_name
        assert record["pruned"]["sparsity"] >= 0.5 and record["pruned"]["pattern"] == "2:4"
        assert all(v["zeros"] >= v["numel"] // 2 for v in record["layers"].values())
        config_json = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config_json and "sparsity_config" not in json.dumps(config_json)
        model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_sparsegpt_beats_magnitude_on_the_model_output(tiny_models, tiny_tokenizer, tmp_path):
    """SparseGPT reconstructs each layer's output, so it wins even on a random model; Wanda's
    edge comes from the outlier features of trained LLMs (tests/integration/test_prune_real_models.py)."""
    path = tiny_models["llama"]
    for name, config in {"magnitude": MagnitudeConfig(sparsity=0.5),
                         "sparsegpt": SparseGPTConfig(sparsity=0.5, calibration=_calib())}.items():
        prune(str(path), config, str(tmp_path / name), quality_guard=False)
    text = austen("mansfield_park.txt").read_text()[:4000]
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert _logit_error(path, tmp_path / "sparsegpt", ids) < 0.7 * _logit_error(path, tmp_path / "magnitude", ids)


@pytest.mark.parametrize("quantize", [
    lambda: RTNConfig(bits=4, group_size=32),
    lambda: GPTQConfig(bits=4, group_size=32, keep_zeros=True, calibration=_calib()),
])
def test_zeros_survive_quantization(tiny_models, tmp_path, quantize):
    path = tiny_models["qwen2"]
    prune(str(path), SparseGPTConfig(pattern="2:4", calibration=_calib()), str(tmp_path / "sparse"), quality_guard=False)
    compress(str(tmp_path / "sparse"), quantize(), str(tmp_path / "q"), quality_guard=False)
    dense = _dense_weights(tmp_path / "q")
    pruned = _pruned_linears(tmp_path / "sparse")
    for name, W in pruned.items():
        assert (dense[name][W == 0] == 0).all(), name  # every pruned weight still exactly zero


def test_gptq_keeps_zeros_by_itself_on_a_checkpoint_prune_wrote(tiny_models, tmp_path):
    path = tiny_models["llama"]
    prune(str(path), WandaConfig(sparsity=0.5, calibration=_calib()), str(tmp_path / "sparse"), quality_guard=False)
    record = compress(str(tmp_path / "sparse"), GPTQConfig(bits=4, group_size=32, calibration=_calib()),
                      str(tmp_path / "q"), quality_guard=False)
    assert record["config"]["keep_zeros"] is True and all(v.get("kept_zeros") for v in record["layers"].values())
    dense = _dense_weights(tmp_path / "q")
    for name, W in _pruned_linears(tmp_path / "sparse").items():
        assert (dense[name][W == 0] == 0).all(), name


@pytest.mark.parametrize("argv, message", [
    (["--method", "wanda", "--sparsity", "1.0"], "in \\[0, 1\\)"),
    (["--method", "wanda", "--sparsity", "-0.2"], "in \\[0, 1\\)"),
    (["--method", "wanda", "--pattern", "4:2"], "0 < N < M"),
    (["--method", "wanda", "--pattern", "2:3"], "multiples of 3"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--per-row"], "--per-row applies to --method magnitude"),
    (["--method", "magnitude", "--sparsity", "0.5", "--exclude", "."], "no Linear layer is left"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "o"
    assert main(["prune", str(tiny_llama), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no output, no OUT.partial


def test_prune_cli_says_what_the_sparsity_buys(tiny_llama, tmp_path, capsys):
    assert main(["prune", str(tiny_llama), "--method", "magnitude", "--pattern", "2:4", "-o", str(tmp_path / "o"),
                 "--no-quality-guard"]) == 0
    out = capsys.readouterr().out
    assert "50.0% of their weights are zero" in out and "sparse-tensor-core" in out


def test_plan_of_a_pruned_checkpoint_says_its_zeros_save_no_memory(tiny_llama, tmp_path, capsys):
    prune(str(tiny_llama), MagnitudeConfig(sparsity=0.5), str(tmp_path / "sparse"), quality_guard=False)
    assert main(["plan", str(tmp_path / "sparse"), "--formats", "fp16", "--json"]) == 0
    sparse_plan = json.loads(capsys.readouterr().out)
    assert main(["plan", str(tiny_llama), "--formats", "fp16", "--json"]) == 0
    dense_plan = json.loads(capsys.readouterr().out)
    assert sparse_plan["formats"][0]["weight_bytes"] == dense_plan["formats"][0]["weight_bytes"]
    assert len(sparse_plan["notes"]) == 1 and "50.0%" in sparse_plan["notes"][0] and "no memory" in sparse_plan["notes"][0]
    assert dense_plan["notes"] == []


def test_an_interrupted_prune_resumes_to_the_same_checkpoint(tiny_models, tmp_path):
    from modelpress.pipeline.sinks import FloatSink

    class Crashing(FloatSink):
        def write_layer(self, lm, i, results):
            super().write_layer(lm, i, results)
            if i == 1:
                raise KeyboardInterrupt

    path, config = tiny_models["qwen2"], SparseGPTConfig(pattern="2:4", calibration=_calib())
    straight = prune(str(path), config, str(tmp_path / "straight"), quality_guard=False)
    with pytest.raises(KeyboardInterrupt):
        prune(str(path), config, str(tmp_path / "resumed"), quality_guard=False, make_sink=Crashing)
    resumed = prune(str(path), config, str(tmp_path / "resumed"), resume=True, quality_guard=False)
    assert resumed["resumed_at_layer"] == 1 and resumed["pruned"]["zeros"] == straight["pruned"]["zeros"]
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_streamed_magnitude_pruning_writes_what_the_layer_pass_writes(tiny_models, tmp_path, model_type, pattern):
    """``prune --method magnitude`` streams tensor by tensor (no calibration, no layer pass); its
    checkpoint and per-Linear record equal the layer runner's magnitude stage."""
    from modelpress.prune import _prune_layers

    path = tiny_models[model_type]
    config = MagnitudeConfig(pattern=pattern) if ":" in pattern else MagnitudeConfig(sparsity=float(pattern))
    streamed = prune(str(path), config, str(tmp_path / "streamed"), quality_guard=False)
    layered = _prune_layers(str(path), config, str(tmp_path / "layered"), resume=False, make_sink=FloatSink)
    a, b = checkpoint_tensors(tmp_path / "streamed"), checkpoint_tensors(tmp_path / "layered")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert streamed["layers"].keys() == layered["layers"].keys()
    for name, layer in streamed["layers"].items():
        assert layer["zeros"] == layered["layers"][name]["zeros"]
        assert layer["rel_mse"] == pytest.approx(layered["layers"][name]["rel_mse"], rel=1e-5)
    assert streamed["pruned"] == layered["pruned"] and streamed["kept_dense"] == layered["kept_dense"]
    assert "calibration" not in streamed
