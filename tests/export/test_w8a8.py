"""W8A8 checkpoints (SmoothQuant, plain RTN W8A8): llm-compressor's layout, loaded by plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CrashingSink, austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.compress import CalibrationConfig, RTNConfig, SmoothQuantConfig, compress, compress_calibrated
from modelpress.errors import UserError
from modelpress.eval.fake_quant import activation_fake_quant, checkpoint_input_quant
from modelpress.formats.activations import ActFormat, InputQuant
from modelpress.pipeline.runner import calibration_ids
from modelpress.models import loading

def _calib():
    return CalibrationConfig(text=str(austen("emma.txt")), samples=8, seq_len=64, batch_size=4)



def _reference(src, out, dynamic: bool) -> tuple[torch.nn.Module, dict[str, InputQuant]]:
    """The float architecture holding the checkpoint's tensors dequantized by our own code
    (``q * scale``), and our own input formats: what a W8A8 engine computes, without transformers'
    compressed-tensors loader."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors = checkpoint_tensors(out)
    state, inputs = {}, {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if f"{name}_scale" in tensors:
            assert t.dtype == torch.int8
            state[name] = t.to(torch.float32) * tensors[f"{name}_scale"].to(torch.float32)
            module = name.removesuffix(".weight")
            scale = tensors.get(f"{module}.input_scale")
            inputs[module] = InputQuant(ActFormat(dynamic=dynamic), None if dynamic else scale.to(torch.float32))
        else:
            state[name] = t
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head
    return model, inputs


@pytest.mark.parametrize("model_type, activations", [
    ("llama", "dynamic"), ("llama", "static"), ("gemma3_text", "static"), ("gemma3_text", "dynamic"),
    ("qwen3", "static"), ("phi3", "static"), ("opt", "static"), ("mistral", "dynamic"),
])
def test_smoothquant_checkpoint_loads_in_plain_transformers(tiny_models, tmp_path, model_type, activations):
    src, out = tiny_models[model_type], tmp_path / "q"
    compress(str(src), SmoothQuantConfig(activations=activations, calibration=_calib()), str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "int-quantized" and group["format"] == "int-quantized"
    assert group["weights"].items() >= {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}.items()
    assert group["input_activations"].items() >= {"num_bits": 8, "type": "int", "symmetric": True,
                                                  "strategy": "token" if activations == "dynamic" else "tensor",
                                                  "dynamic": activations == "dynamic"}.items()
    tensors = checkpoint_tensors(out)
    q_proj = next(n for n in tensors if n.endswith(("q_proj.weight", "qkv_proj.weight")))
    assert tensors[q_proj].dtype == torch.int8
    assert (f"{q_proj.removesuffix('.weight')}.input_scale" in tensors) == (activations == "static")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no modelpress involved
    reference, inputs = _reference(src, out, activations == "dynamic")
    found = checkpoint_input_quant(loaded)
    assert found.keys() == inputs.keys() and len(found) > 0
    ids = torch.randint(3, loaded.config.vocab_size, (2, 24))
    with torch.no_grad():
        native = loaded(ids).logits  # compressed-tensors' own activation rounding
        with activation_fake_quant(loaded, found):
            ours_loaded = loaded(ids).logits
        with activation_fake_quant(reference, inputs):
            ours = reference(ids).logits
        weights_only = reference(ids).logits
    torch.testing.assert_close(ours_loaded, ours, rtol=0, atol=1e-5)  # weights and activations, exactly
    assert (ours - weights_only).abs().max() > 1e-4  # the activation rounding is really applied
    if activations == "static":  # same scale, same rounding: compressed-tensors agrees exactly
        torch.testing.assert_close(native, ours, rtol=0, atol=1e-5)
    else:  # compressed-tensors divides max|x| by 127.5, vLLM (and we) by 127: close, not equal
        assert (native - ours).abs().max() < 10 * (ours - weights_only).abs().max()
        assert not torch.allclose(native, weights_only, rtol=0, atol=1e-6)


def test_static_scales_are_the_calibration_absmax(tiny_models, tiny_tokenizer, tmp_path):
    """q/k/v of layer 0 read the first norm of the embeddings: their stored scale is max |x| / 127."""
    src, out = tiny_models["llama"], tmp_path / "q"
    record = compress(str(src), SmoothQuantConfig(activations="static", calibration=_calib()), str(out))
    tensors = checkpoint_tensors(out)
    smoothed, _ = _reference(src, out, dynamic=False)  # holds the folded (smoothed) norms
    seen = []
    hook = smoothed.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].abs().amax()))
    with torch.no_grad():
        for batch in torch.split(calibration_ids(loading.load_tokenizer(loading.resolve(src)), _calib()), 4):
            smoothed(batch)
    hook.remove()
    absmax = torch.stack(seen).max()
    for proj in ("q_proj", "k_proj", "v_proj"):
        module = f"model.layers.0.self_attn.{proj}"
        scale = tensors[f"{module}.input_scale"]
        assert scale.shape == (1,) and scale.dtype == torch.float16
        assert scale.float().item() == pytest.approx(absmax.item() / 127, rel=2e-3)  # float16 rounding
        assert record["layers"][module]["input_absmax"] == pytest.approx(absmax.item(), rel=1e-4)
    # every static scale covers its calibration range: nothing clips on the calibration data
    for module, layer in record["layers"].items():
        assert layer["input_scale"] * 127 == pytest.approx(layer["input_absmax"], rel=2e-3)


def test_plain_rtn_w8a8_dynamic(tiny_models, tmp_path):
    src, out = tiny_models["qwen2"], tmp_path / "q"
    compress(str(src), RTNConfig(bits=8, granularity="channel", group_size=None, activations="dynamic"), str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference, inputs = _reference(src, out, dynamic=True)
    ids = torch.randint(3, loaded.config.vocab_size, (1, 16))
    with torch.no_grad(), activation_fake_quant(loaded, checkpoint_input_quant(loaded)):
        a = loaded(ids).logits
    with torch.no_grad(), activation_fake_quant(reference, inputs):
        torch.testing.assert_close(a, reference(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"bits": 4, "group_size": 64, "granularity": "group"}, "int8 symmetric per-channel or per-tensor"),
    ({"bits": 8, "symmetric": False}, "int8 symmetric per-channel or per-tensor"),
])
def test_w8a8_needs_int8_symmetric_weights(tiny_models, tmp_path, fields, message):
    with pytest.raises(UserError, match=message):
        compress(str(tiny_models["llama"]), SmoothQuantConfig(**fields), str(tmp_path / "q"))
    with pytest.raises(UserError, match=message):
        compress(str(tiny_models["llama"]), RTNConfig(**fields, activations="dynamic"), str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


def test_smoothquant_with_gptq_weights_and_resume(tiny_models, tmp_path):
    """GPTQ-rounded smoothed weights; a run killed after layer 0 resumes to the same checkpoint."""
    src = tiny_models["llama"]
    config = SmoothQuantConfig(activations="static", weights="gptq", calibration=_calib())
    record = compress(str(src), config, str(tmp_path / "straight"))
    assert all("gptq_loss" in layer for layer in record["layers"].values())
    with pytest.raises(KeyboardInterrupt):
        compress_calibrated(str(src), config, str(tmp_path / "resumed"), make_sink=CrashingSink)
    compress(str(src), config, str(tmp_path / "resumed"), resume=True)
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
                          for d in ("straight", "resumed"))
    assert config_a == config_b
