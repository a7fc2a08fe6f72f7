"""KV-cache quantization in evaluation: what is stored is rounded, on every architecture, a little."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modelpress.cli import main
from modelpress.data import WindowProtocol, token_windows
from modelpress.errors import UserError
from modelpress.eval.kv_cache import FakeQuantKVCache, cache_kwargs, fake_quant_fp8, fake_quant_int8, fp8_head_scale
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading


def test_int8_rounds_each_head_and_token_to_half_a_step():
    x = torch.randn(2, 4, 50, 16) * torch.logspace(-2, 2, 50)[:, None]  # tokens of very different sizes
    err = (fake_quant_int8(x) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127  # per (batch, head, token)
    assert (err <= step / 2 + 1e-7 * x.abs().amax(-1, keepdim=True)).all()
    assert len(torch.unique(torch.round(fake_quant_int8(x) / step))) <= 255


def test_fp8_has_three_mantissa_bits_and_saturates():
    x = torch.randn(1, 2, 64, 16)
    scale = fp8_head_scale(x)
    assert scale.shape == (1, 2, 1, 1)
    y = fake_quant_fp8(x, scale)
    normal = x.abs() / scale >= 2.0 ** -6  # E4M3's smallest normal
    assert ((y - x).abs() <= x.abs() * 2.0 ** -4 + 1e-12)[normal].all()  # relative rounding <= 2^-4
    assert y.unique().numel() < x.unique().numel()
    assert torch.equal(fake_quant_fp8(x * 10, scale).abs().amax((-2, -1), keepdim=True), 448 * scale)  # saturated


@pytest.mark.parametrize("kind, quantize", [("int8", fake_quant_int8), ("fp8", None)])
def test_cache_stores_the_rounded_post_rope_keys(tiny_models, kind, quantize):
    """Layer 0's stored keys/values are exactly the plain cache's ones, rounded."""
    model = loading.load_model(loading.resolve(tiny_models["llama"]))
    ids = torch.randint(3, 300, (1, 30))
    plain, fq = DynamicCache(config=model.config), FakeQuantKVCache(kind, model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain))
        model(ids, **cache_kwargs(model, fq))
    for attr in ("keys", "values"):
        x = getattr(plain.layers[0], attr)
        expected = quantize(x) if quantize else fake_quant_fp8(x, fp8_head_scale(x))
        assert torch.equal(getattr(fq.layers[0], attr), expected)
        assert not torch.equal(expected, x)
    assert len(fq.layers) == model.config.num_hidden_layers


def _rel_logit_error(model, ids, kind) -> float:
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = model(ids, **cache_kwargs(model, FakeQuantKVCache(kind, model.config))).logits
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                        "phi3", "opt"])
def test_kv_quantization_changes_every_architecture_a_little(tiny_models, tiny_tokenizer, eval_text, model_type):
    model = loading.load_model(loading.resolve(tiny_models[model_type]))
    ids = token_windows(tiny_tokenizer, eval_text.read_text(), WindowProtocol("t", 96, 2))  # > gemma's window 64
    base = evaluate(model, ids).ppl
    results = {kind: evaluate(model, ids, kv_cache=kind) for kind in ("int8", "fp8")}
    for kind, r in results.items():
        assert r.kv_cache == kind
        assert r.ppl != base  # the cache really is used and rounded
        assert abs(r.ppl / base - 1) < 0.01, (kind, r.ppl, base)
    # int8 with a scale per token and head is finer than fp8's 3 mantissa bits
    assert _rel_logit_error(model, ids[:1], "int8") < _rel_logit_error(model, ids[:1], "fp8")


def test_unknown_kv_cache_format_is_rejected(tiny_llama, eval_text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny_llama), "--text", str(eval_text), "--kv-cache", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    model = loading.load_model(loading.resolve(tiny_llama))
    with pytest.raises(UserError, match="unknown KV-cache format 'int4'; choose one of int8, fp8"):
        evaluate(model, torch.randint(3, 300, (1, 8)), kv_cache="int4")
