"""Perplexity and baseline comparison on tiny models, checked against a direct computation."""

import math

import torch
import torch.nn.functional as F

from modelpress.data import PPL_512, WindowProtocol, token_windows
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading


def _model(path):
    return loading.load_model(loading.resolve(path))


def test_perplexity_matches_direct_cross_entropy(tiny_llama, tiny_tokenizer, eval_text):
    model = _model(tiny_llama)
    ids = token_windows(tiny_tokenizer, eval_text.read_text(), WindowProtocol("t", 64, 3))
    result = evaluate(model, ids)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # HF's own mean NLL over predicted tokens
    assert result.n_tokens == 3 * 64  # BOS + 64 tokens: 64 predicted per window
    assert math.isclose(result.nll, loss, rel_tol=1e-5)
    assert math.isclose(result.ppl, math.exp(loss), rel_tol=1e-5)


def test_comparison_with_itself_is_exact_and_with_another_model_is_not(tiny_models, tiny_tokenizer, eval_text):
    ids = token_windows(tiny_tokenizer, eval_text.read_text(), WindowProtocol("t", 32, 2))
    model = _model(tiny_models["llama"])
    same = evaluate(model, ids, baseline=model)
    assert abs(same.kl) < 1e-6 and same.top1_agreement == 1.0 and same.baseline_ppl == same.ppl
    other = _model(tiny_models["mistral"])  # same shapes, different random weights
    diff = evaluate(model, ids, baseline=other)
    assert diff.kl > 1e-3 and diff.top1_agreement < 1.0
    with torch.no_grad():
        p = F.log_softmax(other(ids[:1]).logits[0, :-1], -1)
        q = F.log_softmax(model(ids[:1]).logits[0, :-1], -1)
    kl_first = (p.exp() * (p - q)).sum(-1).mean().item()  # KL(baseline || model), window 1 only
    assert 0.5 * kl_first < diff.kl < 2 * kl_first


def test_ppl_512_windows_follow_the_protocol(tiny_tokenizer, eval_text):
    text = eval_text.read_text()
    ids = token_windows(tiny_tokenizer, text, PPL_512)
    flat = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.shape == (40, 513)
    assert (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert ids[1, 1:].tolist() == flat[512:1024]
