"""The compressed-tensors configs we write are the schemes vLLM dispatches on, as compressed-tensors defines them.

vLLM picks a kernel from a config group's ``weights`` / ``input_activations`` arguments and its
``format``. For each scheme modelpress produces, the arguments must equal compressed-tensors' own
preset of that name, the format must be the one compressed-tensors infers for that scheme on a
Linear, and compressed-tensors' ``ModelCompressor`` must read the checkpoint's config back.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from transformers import AutoConfig, AutoModelForCausalLM

from modelpress.cli import main

FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
CASES = {  # vLLM / compressed-tensors preset -> modelpress compress arguments
    "W4A16": ["--bits", "4", "--group-size", "128"],
    "W4A16_ASYM": ["--bits", "4", "--group-size", "128", "--asymmetric"],
    "W8A16": ["--bits", "8", "--group-size", "128"],
    "W8A8": ["--bits", "8", "--granularity", "channel", "--activations", "int8-dynamic"],
    "NVFP4A16": ["--format", "nvfp4"],
    "MXFP4A16": ["--format", "mxfp4"],
}
# Asymmetric int4 stays ``int-quantized`` (int8 codes + zero points): compressed-tensors' own
# ``pack-quantized`` output with packed zero points does not load in transformers 5.24 with
# compressed-tensors 0.20 (zero-point shape mismatch), and loading in plain transformers is our contract.
STORED_AS = {"W4A16_ASYM": "int-quantized"}


@pytest.fixture(scope="module")
def model_256(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose Linear inputs (256, 512) take the presets' group size of 128."""
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=len(tiny_tokenizer), max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vllm") / "model"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _args(args: QuantizationArgs | None) -> dict | None:
    if args is None:
        return None
    return {f: getattr(args, f) for f in FIELDS} | ({"scale_dtype": args.scale_dtype} if args.scale_dtype else {})


@pytest.mark.parametrize("preset", sorted(CASES))
def test_config_is_the_preset_scheme(model_256, tmp_path, preset):
    out = tmp_path / "q"
    assert main(["compress", str(model_256), "--method", "rtn", *CASES[preset], "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    ours = QuantizationScheme.model_validate(group)
    reference = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    assert _args(ours.weights) == _args(reference.weights)
    assert _args(ours.input_activations) == _args(reference.input_activations)
    inferred = infer_module_format(torch.nn.Linear, reference).value
    assert group["format"] == config["format"] == STORED_AS.get(preset, inferred)
    read_back = ModelCompressor(quantization_config=QuantizationConfig.model_validate(config))
    assert read_back.quantization_config.format == config["format"]


def test_fp8_weights_are_the_fp8_presets_weights(model_256, tmp_path):
    """FP8 (per tensor) and FP8-channel weights: the weight arguments of the FP8 and FP8_DYNAMIC presets."""
    for spec, preset in [("fp8", "FP8"), ("fp8-channel", "FP8_DYNAMIC")]:
        out = tmp_path / spec
        assert main(["compress", str(model_256), "--method", "rtn", "--format", spec, "-o", str(out)]) == 0
        (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
        ours = QuantizationScheme.model_validate(group)
        assert _args(ours.weights) == _args(QuantizationArgs.model_validate(PRESET_SCHEMES[preset]["weights"]))
        assert group["format"] == "float-quantized"
