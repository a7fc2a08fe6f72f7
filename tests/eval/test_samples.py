"""Generations and weight histograms: what the report shows a person before and after each step."""

import torch

from modelpress.compress import RTNConfig, compress_rtn
from modelpress.data import builtin_text
from modelpress.eval.compare import measure
from modelpress.eval.samples import greedy_generations, histogram, probe_linears
from modelpress.export.compressed_tensors import read_quantized
from modelpress.models import loading


def test_greedy_generation_is_the_argmax_of_every_step(tiny_llama, tiny_tokenizer):
    model = loading.load_model(loading.resolve(str(tiny_llama)))
    gen, = greedy_generations(model, tiny_tokenizer, ["The cat sat"], new_tokens=12)
    ids = tiny_tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.inference_mode():
        for _ in range(12):  # no cache: each token from a full forward of what came before
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert gen["tokens"] == ids[0, -12:].tolist()
    assert gen["continuation"] == tiny_tokenizer.decode(gen["tokens"], skip_special_tokens=True)


def test_a_quantized_kv_cache_is_the_one_generation_runs_with(tiny_llama, tiny_tokenizer, monkeypatch):
    from modelpress.eval import samples
    from modelpress.eval.kv_cache import FakeQuantKVCache

    stored = []

    class Counting(FakeQuantKVCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            stored.append((self.kind, key_states.shape[-2]))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(samples, "FakeQuantKVCache", Counting)
    model = loading.load_model(loading.resolve(str(tiny_llama)))
    gen, = greedy_generations(model, tiny_tokenizer, ["Once upon a time"], new_tokens=8, kv_cache="int8")
    layers = model.config.num_hidden_layers
    assert len(stored) == layers * 8 and {k for k, _ in stored} == {"int8"}  # the prompt, then one token a step
    assert [n for _, n in stored[layers:]] == [1] * (layers * 7)
    assert len(gen["tokens"]) == 8


def test_the_probed_linears_span_the_depth(tiny_models):
    model = loading.load_model(loading.resolve(str(tiny_models["llama"])))
    names = probe_linears(model)
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert set(names) <= set(dict(model.named_parameters()))


def test_a_compressed_checkpoint_is_histogrammed_from_its_dequantized_codes(tiny_llama, tmp_path):
    out = tmp_path / "int4"
    compress_rtn(str(tiny_llama), RTNConfig(bits=4, group_size=32), str(out))
    text = tmp_path / "t.txt"
    text.write_text(builtin_text())
    result = measure(str(out), str(text), 1, histograms=True)
    qc = loading.compressed_tensors_config(loading.resolve(str(out)))
    stored = read_quantized(out, qc)
    for name, h in result["weight_histograms"].items():
        W = stored[name.removesuffix(".weight")].dequantize()
        assert h == histogram(W)  # the codes times their scales, not the packed int32 words
        assert 16 >= len({round(float(v), 6) for v in W[0, :32]})  # at most 16 levels in a group of 32
