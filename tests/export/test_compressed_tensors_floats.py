"""FP8 / NVFP4 / MXFP4 checkpoints load in plain transformers as exactly our fake quantization;
NF4 is written dequantized; GPTQ works with the float formats end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from modelpress.algorithms.rtn import rtn
from modelpress.cli import main
from modelpress.compress import GPTQConfig, RTNConfig, compress
from modelpress.formats.floats import parse_format

def _calib():
    return {"text": str(austen("emma.txt")), "samples": 8, "seq_len": 64, "batch_size": 4}

FP4 = ("nvfp4", "mxfp4")


def _fake_quant_reference(src, record, spec: str) -> AutoModelForCausalLM:
    """The float model with each quantized Linear replaced by our own dequantized weights; for the
    FP4 formats rounded to bfloat16, as compressed-tensors' FP4 decompressor returns them."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fmt = parse_format(spec, observer=record["config"]["observer"])
    with torch.no_grad():
        for module in record["layers"]:
            linear = model.get_submodule(module)
            W = rtn(linear.weight, fmt)[0].dequantize()
            linear.weight.copy_(W.to(torch.bfloat16) if spec in FP4 else W)
    return model


def _load(out, spec: str) -> AutoModelForCausalLM:
    # On CPU compressed-tensors decompresses FP4 weights to bfloat16 at every forward, which a
    # float32 model cannot multiply: ask it to decompress once, at load (dequantize=True)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if spec in FP4 else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)


@pytest.mark.parametrize("model_type, spec", [("llama", "fp8"), ("qwen3", "fp8-channel"), ("llama", "nvfp4"),
                                              ("gemma3_text", "nvfp4"), ("llama", "mxfp4")])
def test_plain_transformers_loads_our_fake_quantization(tiny_models, tmp_path, model_type, spec):
    src, out = tiny_models[model_type], tmp_path / "q"
    record = compress(str(src), RTNConfig(format=spec), str(out))
    loaded = _load(out, spec)
    reference = _fake_quant_reference(src, record, spec)
    ids = torch.randint(3, loaded.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = parse_format(spec)
    assert qc["format"] == {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized",
                            "mxfp4": "mxfp4-pack-quantized"}[spec.split("-")[0]]
    bits = record["quantized"]["bits_per_weight"]
    if fmt.granularity == "group":  # plus NVFP4's one float32 per tensor (4096+ weights here)
        assert fmt.bits_per_weight() <= bits < fmt.bits_per_weight() + 0.01
    else:  # one float32 scale per row of 64 or 128 inputs, or per tensor
        assert 8 < bits <= 8 + 32 / 64


def test_stored_tensors_have_the_engines_dtypes_and_shapes(tiny_llama, tmp_path):
    module = "model.layers.0.mlp.down_proj"  # (64, 128)
    expected = {
        "fp8": {"weight": (torch.float8_e4m3fn, (64, 128)), "weight_scale": (torch.float32, (1,))},
        "fp8-channel": {"weight": (torch.float8_e4m3fn, (64, 128)), "weight_scale": (torch.float32, (64, 1))},
        "nvfp4": {"weight_packed": (torch.uint8, (64, 64)), "weight_scale": (torch.float8_e4m3fn, (64, 8)),
                  "weight_global_scale": (torch.float32, (1,))},
        "mxfp4": {"weight_packed": (torch.uint8, (64, 64)), "weight_scale": (torch.uint8, (64, 4))},
    }
    for spec, names in expected.items():
        tensors = checkpoint_tensors(_compressed(tiny_llama, tmp_path / spec, spec))
        got = {k.removeprefix(module + "."): (v.dtype, tuple(v.shape)) for k, v in tensors.items()
               if k.startswith(module + ".")}
        assert got == names, spec
        if spec == "mxfp4":  # E8M0 exponents of weights ~0.02-0.1: well inside the biased range
            assert 100 < tensors[f"{module}.weight_scale"].min() <= tensors[f"{module}.weight_scale"].max() < 127


def _compressed(src, out, spec):
    compress(str(src), RTNConfig(format=spec), str(out))
    return out


def test_bfloat16_load_runs_the_compressed_nvfp4_model(tiny_llama, tmp_path):
    out = _compressed(tiny_llama, tmp_path / "q", "nvfp4")
    record = json.loads((out / "modelpress.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)  # weights stay packed
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").weight_packed.dtype == torch.uint8
    ids = torch.randint(3, loaded.config.vocab_size, (1, 16))
    with torch.no_grad():
        got = loaded(ids).logits.float()
        want = _fake_quant_reference(tiny_llama, record, "nvfp4").to(torch.bfloat16)(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_nf4_is_written_dequantized_and_recorded_at_its_nf4_size(tiny_llama, tmp_path):
    out = tmp_path / "q"
    record = compress(str(tiny_llama), RTNConfig(format="nf4"), str(out))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = checkpoint_tensors(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for module in record["layers"]:
        W = reference.get_submodule(module).weight.detach()
        assert torch.equal(tensors[f"{module}.weight"], rtn(W, parse_format("nf4", observer=record["config"]["observer"]))[0].dequantize())
    assert record["quantized"]["bits_per_weight"] == pytest.approx(4.25)
    assert all(layer["format"] == "nf4-g64" for layer in record["layers"].values())


def _logit_error(src, out, spec, ids) -> float:
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    q = _load(out, spec)
    with torch.no_grad():
        return (q(ids).logits - ref(ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("spec", ["nvfp4", "nf4", "fp8"])  # fp8: one scale per tensor, not row-stacked
def test_gptq_with_a_float_format_loads_and_beats_rtn(tiny_llama, tiny_tokenizer, tmp_path, spec):
    gptq_out, rtn_out = tmp_path / "gptq", tmp_path / "rtn"
    record = compress(str(tiny_llama), GPTQConfig(format=spec, calibration=_calib()), str(gptq_out))
    compress(str(tiny_llama), RTNConfig(format=spec), str(rtn_out))
    assert {layer["format"] for layer in record["layers"].values()} == {parse_format(spec).name}
    text = austen("mansfield_park.txt").read_text()[:4000]
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert _logit_error(tiny_llama, gptq_out, spec, ids) < _logit_error(tiny_llama, rtn_out, spec, ids)
    if spec == "nvfp4":  # q/k/v and gate/up were quantized stacked: one global scale each, as vLLM fuses them
        t = checkpoint_tensors(gptq_out)
        p = "model.layers.1."
        qkv = {t[f"{p}self_attn.{n}_proj.weight_global_scale"].item() for n in "qkv"}
        gate_up = {t[f"{p}mlp.{n}_proj.weight_global_scale"].item() for n in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1


def test_cli_format_option(tiny_llama, tmp_path, capsys):
    assert main(["compress", str(tiny_llama), "--format", "nvfp4", "-o", str(tmp_path / "o"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["record"]
    assert record["config"]["format"] == "nvfp4"
    assert main(["compress", str(tiny_llama), "--format", "nvfp4-g32", "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fixed block size" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
