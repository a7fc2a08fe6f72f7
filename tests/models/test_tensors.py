"""Quantization targets (exclusions, group-size fallbacks) and tensor streaming."""

import pytest
import torch

from modelpress.compress import RTNConfig
from modelpress.errors import UserError
from modelpress.models import loading
from modelpress.models.loading import meta_model
from modelpress.models.tensors import plan_targets, tensor_stream


@pytest.fixture
def meta(tiny_llama):  # hidden 64, intermediate 128
    return meta_model(loading.load_config(loading.resolve(tiny_llama)))


def test_group_size_that_does_not_divide_is_an_error_naming_layers(meta):
    with pytest.raises(UserError, match=r"does not divide the input dimension \(64\).*q_proj.*--group-fallback"):
        plan_targets(meta, RTNConfig(group_size=128))


def test_keep_fallback_leaves_misfits_unquantized(meta):
    t = plan_targets(meta, RTNConfig(group_size=128, group_fallback="keep"))
    assert set(t.formats) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert len(t.kept) == 12 and all("does not divide 64" in r for r in t.kept.values())


def test_shrink_fallback_uses_the_largest_common_divisor(meta):
    t = plan_targets(meta, RTNConfig(group_size=128, group_fallback="shrink"))
    assert t.formats["model.layers.0.self_attn.q_proj"].group_size == 64
    assert t.formats["model.layers.0.mlp.down_proj"].group_size == 128
    assert not t.kept


def test_only_decoder_linears_are_targets_and_exclude_is_a_regex(meta):
    t = plan_targets(meta, RTNConfig(group_size=32, exclude=["lm_head", r"\.mlp\."]))
    assert len(t.formats) == 8 and all("self_attn" in n for n in t.formats)
    assert "lm_head" not in t.formats and "lm_head" not in t.kept  # not a decoder-layer Linear
    with pytest.raises(UserError, match="no Linear layer is left"):
        plan_targets(meta, RTNConfig(group_size=32, exclude=["."]))


def test_recipe_typos_are_errors():
    with pytest.raises(ValueError, match="group_szie"):
        RTNConfig(group_szie=64)
    with pytest.raises(ValueError, match="regular expression"):
        RTNConfig(exclude=["("])


def test_stream_yields_each_checkpoint_tensor_once(tiny_models):
    for name in ("llama", "gemma3_text"):  # untied and tied embeddings
        source = loading.resolve(tiny_models[name])
        meta = meta_model(loading.load_config(source))
        stream, n = tensor_stream(source, meta)
        tensors = dict(stream)
        assert len(tensors) == n
        ref = loading.load_model(source).state_dict()
        for k, v in tensors.items():
            assert torch.equal(v, ref[k])


def test_nan_in_a_tensor_is_a_user_error_naming_it(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_llama / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = loading.resolve(tmp_path)
    stream, _ = tensor_stream(source, meta_model(loading.load_config(source)))
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        list(stream)


def test_overrides_that_split_a_fused_layer_are_warned_about(tiny_llama, tmp_path, caplog):
    """q/k/v (and gate/up) in different formats: transformers loads it, vLLM (one scheme per fused
    layer) refuses it, so compress says so and names the parts; one format for all of them is silent."""
    from modelpress.compress import RTNConfig, compress

    split = {r"model\.layers\.0\.self_attn\.q_proj": "int8", r"model\.layers\.1\.mlp\.up_proj": "keep"}
    with caplog.at_level("WARNING", logger="modelpress"):
        compress(str(tiny_llama), RTNConfig(bits=4, group_size=32, overrides=split), str(tmp_path / "split"),
                 quality_guard=False)
    fused = [r.getMessage() for r in caplog.records if "one fused layer in vLLM" in r.getMessage()]
    assert len(fused) == 2
    assert fused[0].startswith("model.layers.0.self_attn: q_proj int8-channel, k_proj int4-g32, v_proj int4-g32")
    caplog.clear()
    whole = {r"model\.layers\.0\.self_attn\.[qkv]_proj": "int8", r"model\.layers\.1\.mlp\.(gate|up)_proj": "keep"}
    with caplog.at_level("WARNING", logger="modelpress"):
        compress(str(tiny_llama), RTNConfig(bits=4, group_size=32, overrides=whole), str(tmp_path / "whole"),
                 quality_guard=False)
    assert not [r for r in caplog.records if "fused" in r.getMessage()]


@pytest.mark.parametrize("dtype,bad", [(torch.float32, float("nan")), (torch.float32, float("inf")),
                                       (torch.bfloat16, float("-inf")), (torch.float8_e4m3fn, float("nan"))])
def test_the_finiteness_check_reads_every_chunk(monkeypatch, dtype, bad):
    """Checked a chunk at a time (to bound its temporaries), a bad value in the last, partial
    chunk is still found."""
    from modelpress.models import loading

    monkeypatch.setattr(loading, "_FINITE_CHUNK", 64)
    t = torch.zeros(10, 33)
    assert loading.all_finite(t.to(dtype))
    t[-1, -1] = bad
    assert not loading.all_finite(t.to(dtype))
