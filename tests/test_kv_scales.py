"""An FP8 KV cache carried in the checkpoint: calibrated per-layer scales, the ``kv_cache_scheme``
vLLM reads, a checkpoint transformers still loads, and an evaluation that uses those scales."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM, DynamicCache

from modelpress.compress import RTNConfig, compress
from modelpress.data import read_text
from modelpress.errors import UserError
from modelpress.eval.compare import measure
from modelpress.eval.kv_cache import FP8_MAX, FakeQuantKVCache, cache_kwargs
from modelpress.kv_scales import SCHEME, carry_kv_cache, checkpoint_kv_scales
from modelpress.models import loading


def _ids(path, n=4, length=48) -> torch.Tensor:
    tokenizer = loading.load_tokenizer(loading.resolve(path))
    ids = tokenizer(read_text(austen("emma.txt"))[:20000], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * length]).reshape(n, length)


def _reference_amax(path, ids) -> list[tuple[float, float]]:
    """max |k| and |v| per layer, read from an ordinary cache after each window's forward."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    amax = None
    with torch.no_grad():
        for window in ids:
            cache = DynamicCache(config=model.config)
            model(input_ids=window[None], **cache_kwargs(model, cache))
            now = [(layer.keys.abs().max().item(), layer.values.abs().max().item()) for layer in cache.layers]
            amax = now if amax is None else [(max(a, c), max(b, d)) for (a, b), (c, d) in zip(amax, now)]
    return amax


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3"])
def test_scales_are_each_layers_key_and_value_range_over_448(tiny_models, tmp_path, model_type):
    path = tiny_models[model_type]
    ids = _ids(path)
    record = carry_kv_cache(str(path), str(tmp_path / "kv"), ids, batch_size=2)
    scales = checkpoint_kv_scales(loading.resolve(tmp_path / "kv"))
    ref = _reference_amax(path, ids)
    assert len(scales) == len(ref) == len(record["layers"])
    for i, (k, v) in enumerate(ref):
        assert scales[i] == pytest.approx((k / FP8_MAX, v / FP8_MAX), rel=1e-6)
    config = json.loads((tmp_path / "kv" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] == SCHEME
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    from modelpress.fit.search import header_bytes
    from modelpress.kv_scales import SCALE_BYTES_PER_LAYER

    added = sum(header_bytes(loading.resolve(tmp_path / "kv")).values()) - sum(header_bytes(loading.resolve(path)).values())
    assert added == SCALE_BYTES_PER_LAYER * len(ref)  # what fit adds to a candidate with the cache in fp8


def test_the_checkpoint_keeps_every_weight_and_loads_in_transformers(tiny_llama, tmp_path):
    out = tmp_path / "kv"
    carry_kv_cache(str(tiny_llama), str(out), _ids(tiny_llama), batch_size=2)
    before, after = checkpoint_tensors(tiny_llama), checkpoint_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(set(after) - set(before)) == sorted(f"model.layers.{i}.self_attn.{kv}_scale"
                                                      for i in range(2) for kv in "kv")
    assert not (out / "model.safetensors").exists()  # transformers would read it alone, without the index
    loaded = loading.load_model(loading.resolve(out))  # refuses any tensor transformers could not place
    ids = _ids(tiny_llama, n=1)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-5)  # weights unchanged


def test_evaluation_uses_the_carried_scales(tiny_llama, tmp_path):
    """``measure`` of a checkpoint with a kv_cache_scheme quantizes its cache with the checkpoint's
    own scales: it equals a forward with those static scales, and shrinking them (clipping)
    moves the outputs far from the float model's."""
    out = tmp_path / "kv"
    carry_kv_cache(str(tiny_llama), str(out), _ids(tiny_llama), batch_size=2)
    text = str(austen("persuasion.txt"))
    got = measure(str(out), text, 2, baseline=str(tiny_llama))
    assert got["kv_cache"] == "fp8 (the checkpoint's scales)" and got["kl"] > 0
    scales = checkpoint_kv_scales(loading.resolve(out))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    from modelpress.eval.compare import eval_windows
    from modelpress.eval.perplexity import evaluate

    ids, _ = eval_windows(loading.resolve(tiny_llama), text, 2)
    assert evaluate(model, ids, kv_cache="fp8", kv_scales=scales).ppl == pytest.approx(got["ppl"], rel=1e-6)
    clipped = evaluate(model, ids, baseline=model, kv_cache="fp8",
                       kv_scales={i: (k / 64, v / 64) for i, (k, v) in scales.items()})
    assert clipped.kl > 10 * got["kl"]  # scales 64x too small clip the cache: far from the float model
    with pytest.raises(UserError, match="carries its own FP8 KV-cache scales"):
        measure(str(out), text, 2, kv_cache="int8")


def test_a_static_scale_cache_rounds_each_state_to_e4m3_times_its_scale():
    cache = FakeQuantKVCache("fp8", scales={0: (0.01, 0.02)})
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    qk, qv = cache.update(k, v, 0)
    assert torch.equal(qk, (k / 0.01).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * torch.tensor(0.01))
    assert torch.equal(qv, (v / 0.02).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * torch.tensor(0.02))
    with pytest.raises(UserError, match="no scales for layer 1"):
        cache.update(k, v, 1)


def test_a_quantized_checkpoint_keeps_its_config_groups(tiny_llama, tmp_path):
    q = tmp_path / "q"
    compress(str(tiny_llama), RTNConfig(bits=4, group_size=32), str(q), quality_guard=False)
    carry_kv_cache(str(q), str(tmp_path / "kv"), _ids(tiny_llama), batch_size=2)
    before = json.loads((q / "config.json").read_text())["quantization_config"]
    after = json.loads((tmp_path / "kv" / "config.json").read_text())["quantization_config"]
    assert after == {**before, "kv_cache_scheme": SCHEME}
    loading.load_model(loading.resolve(tmp_path / "kv"))


def test_bad_inputs_are_refused_and_leave_nothing(tiny_llama, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        carry_kv_cache(str(tiny_llama), str(tmp_path / "exists"), _ids(tiny_llama))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError):
        carry_kv_cache(str(gguf), str(tmp_path / "out"), _ids(tiny_llama))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "m.gguf"]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_float_checkpoint_is_calibrated_layer_by_layer(tiny_models, tmp_path, monkeypatch, model_type):
    """The layer runner's observer sees the same keys and values as a whole model's cache, and the
    model is never loaded whole (gemma3: sliding-window layers beside global ones)."""
    from modelpress.kv_scales import kv_amax, streamed_kv_amax

    path = tiny_models[model_type]
    ids = _ids(path)
    whole = kv_amax(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), list(torch.split(ids, 2)))

    def refused(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(loading, "load_model", refused)
    paths, streamed = streamed_kv_amax(loading.resolve(path), ids, batch_size=2)
    assert [x for kv in streamed for x in kv] == pytest.approx([x for kv in whole for x in kv], rel=1e-5)
    assert len(paths) == len(whole)
    carry_kv_cache(str(path), str(tmp_path / "kv"), ids, batch_size=2)  # the whole verb streams too
