"""compressed-tensors checkpoints: real B-bit codes on disk, loaded by plain transformers exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checkpoint_tensors
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from transformers import AutoModelForCausalLM

from modelpress.compress import RTNConfig, compress
from modelpress.errors import UserError
from modelpress.export.checkpoint import CheckpointWriter
from modelpress.formats.integer import parse_int_format

CASES = [  # (architecture, format): every architecture once, every storage layout at least twice
    ("llama", "int4-g32"),
    ("mistral", "int3-g16-asym"),
    ("qwen2", "int8-channel"),
    ("qwen3", "int2-g32"),
    ("gemma", "int4-tensor"),
    ("gemma2", "int5-g64-asym"),
    ("gemma3_text", "int4-g16"),
    ("phi3", "int6-channel-asym"),
    ("opt", "int4-g32"),
]


def _config(spec: str, **kw) -> RTNConfig:
    fmt = parse_int_format(spec)
    return RTNConfig(bits=fmt.bits, granularity=fmt.granularity, group_size=fmt.group_size,
                     symmetric=fmt.symmetric, **kw)



def _fake_quant_reference(src, record) -> AutoModelForCausalLM:
    """The float model with each quantized Linear replaced by our own dequantized weights."""
    from modelpress.algorithms.rtn import rtn
    from modelpress.formats.integer import parse_int_format

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for module, layer in record["layers"].items():
            linear = model.get_submodule(module)
            fmt = parse_int_format(layer["format"], observer=record["config"]["observer"])
            linear.weight.copy_(rtn(linear.weight, fmt)[0].dequantize())
    return model


@pytest.mark.parametrize("model_type, spec", CASES)
def test_plain_transformers_loads_what_we_meant(tiny_models, tmp_path, model_type, spec):
    src, out = tiny_models[model_type], tmp_path / "q"
    record = compress(str(src), _config(spec), str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no modelpress involved
    reference = _fake_quant_reference(src, record)
    ids = torch.randint(3, loaded.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = loaded(ids).logits, reference(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert any("lm_head" in name for name in qc["ignore"])


@pytest.mark.parametrize("spec", ["int2-g32", "int3-g32", "int4-g32", "int8-channel", "int3-g16-asym"])
def test_stored_codes_are_b_bit_with_one_scale_per_group(tiny_llama, tmp_path, spec):
    fmt = parse_int_format(spec)
    out = tmp_path / "q"
    compress(str(tiny_llama), _config(spec), str(out))
    tensors = checkpoint_tensors(out)
    module = "model.layers.0.mlp.down_proj"  # (64, 128)
    rows, cols = 64, 128
    n_groups = cols // fmt.group_size if fmt.granularity == "group" else 1
    if fmt.symmetric:
        packed = tensors[f"{module}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (rows, -(-cols * fmt.bits // 32))  # dense bits
        q = unpack_from_int32(packed, fmt.bits, torch.Size([rows, cols]))
        assert f"{module}.weight_zero_point" not in tensors
    else:
        q = tensors[f"{module}.weight"]
        assert tensors[f"{module}.weight_zero_point"].shape == (rows, n_groups)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    if fmt.symmetric:  # the whole signed range: groups whose extreme is negative store -2^(b-1)
        assert q.min() == fmt.qmin and q.max() == fmt.qmax
    assert len(q.unique()) > 2 ** fmt.bits // 2  # codes use the grid, not a degenerate subset
    assert tensors[f"{module}.weight_scale"].shape == (rows, n_groups)
    assert tensors[f"{module}.weight_scale"].dtype == torch.float16
    assert "model.embed_tokens.weight" in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float32


def test_mixed_group_sizes_load_exactly(tiny_llama, tmp_path):
    """--group-fallback shrink gives two formats in one model: two config groups, one per format."""
    out = tmp_path / "q"
    record = compress(str(tiny_llama), _config("int4-g128", group_fallback="shrink"), str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert {layer["format"] for layer in record["layers"].values()} == {"int4-g128", "int4-g64"}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, loaded.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, _fake_quant_reference(tiny_llama, record)(ids).logits,
                                   rtol=0, atol=1e-5)


def test_interrupted_compress_leaves_no_folder(tiny_llama, tmp_path, monkeypatch):
    import modelpress.compress as compress_module

    calls = {"n": 0}
    real_rtn = compress_module.rtn

    def rtn_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_rtn(*args, **kwargs)

    monkeypatch.setattr(compress_module, "rtn", rtn_then_interrupt)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_llama), _config("int4-g32"), str(out))
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither OUT nor OUT.partial-*


def test_writer_refuses_an_existing_folder_and_shards_big_checkpoints(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        CheckpointWriter(tmp_path / "exists")
    with CheckpointWriter(tmp_path / "sharded", max_shard_bytes=4096) as w:
        for i in range(5):
            w.add_tensor(f"t{i}", torch.full((512,), float(i)))  # 2 KiB each: 3 shards
        w.finish(config={"model_type": "llama"})
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    tensors = checkpoint_tensors(tmp_path / "sharded")
    assert all(torch.equal(tensors[f"t{i}"], torch.full((512,), float(i))) for i in range(5))


def test_overrides_give_per_linear_formats_that_load_exactly(tiny_llama, tmp_path):
    """Mixed precision as ``fit`` writes it: an override per Linear (int8, int2, or kept in float),
    the rest in the default format; one config group per format, and transformers computes
    exactly with our weights."""
    out = tmp_path / "q"
    overrides = {r"model\.layers\.0\.self_attn\.[qkv]_proj": "int8", r"model\.layers\.1\.mlp\.down_proj": "int2-g32",
                 r"model\.layers\.1\.self_attn\.o_proj": "keep"}
    record = compress(str(tiny_llama), _config("int4-g32", overrides=overrides), str(out))
    formats = {m: layer["format"] for m, layer in record["layers"].items()}
    assert formats["model.layers.0.self_attn.k_proj"] == "int8-channel"
    assert formats["model.layers.1.mlp.down_proj"] == "int2-g32"
    assert formats["model.layers.0.mlp.down_proj"] == "int4-g32"
    assert "model.layers.1.self_attn.o_proj" not in formats
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 3
    assert "model.layers.1.self_attn.o_proj" in qc["ignore"]
    tensors = checkpoint_tensors(out)
    original = checkpoint_tensors(tiny_llama)
    assert torch.equal(tensors["model.layers.1.self_attn.o_proj.weight"], original["model.layers.1.self_attn.o_proj.weight"])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, loaded.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, _fake_quant_reference(tiny_llama, record)(ids).logits,
                                   rtol=0, atol=1e-5)


def test_an_override_typo_is_refused_before_any_work():
    with pytest.raises(ValueError, match="int9"):
        RTNConfig(overrides={"model.layers.0.mlp.down_proj": "int9-g32x"})
    with pytest.raises(ValueError, match="regular expression"):
        RTNConfig(overrides={"model.layers.(": "int8"})
