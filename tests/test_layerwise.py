"""The layer-by-layer runner and calibrated compression on tiny models of every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CrashingSink, StatelessSink, austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.compress import GPTQConfig, RTNConfig, compress, compress_calibrated
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel, run_layer




def _gptq(**kw) -> GPTQConfig:
    fields = dict(bits=3, group_size=32, calibration={"text": str(austen("emma.txt")), "samples": 8, "seq_len": 64, "batch_size": 4})
    return GPTQConfig(**{**fields, **kw})



def test_runner_reproduces_the_full_model(tiny_models):
    """Layer by layer, loaded one at a time, the hidden states equal a normal forward's."""
    for model_type, path in tiny_models.items():
        lm = LayerwiseModel(loading.resolve(path))
        ids = [torch.randint(3, 300, (2, 40)) for _ in range(2)]
        capture = lm.capture(ids)
        hidden = capture.hidden
        for i in range(lm.n_layers):
            hidden = run_layer(lm.load_layer(i), hidden, capture.kwargs[i])
            lm.free_layer(i)
            assert all(p.device.type == "meta" for p in lm.layer_list[i].parameters())  # freed
        full = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            reference = full(ids[1], output_hidden_states=True).hidden_states[-1]
            base = full.get_submodule(lm.prefix.rsplit(".", 1)[0])
            norm = getattr(base, "norm", None) or getattr(base, "final_layer_norm")
        torch.testing.assert_close(norm(hidden[1]), reference, msg=model_type, rtol=1e-5, atol=1e-5)


def test_a_tail_forward_equals_the_full_forward_and_sees_a_change(tiny_models):
    """Every architecture: logits from layer i on (layers before it skipped, its input replayed)
    equal a full forward's; a change to layer i shows in them, one to layer i-1 does not."""
    from modelpress.models.arch import arch_for
    from modelpress.models.layers import TailForward

    for model_type, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.randint(3, 300, (2, 40))
        tail = TailForward(model, arch_for(model.config).layers, ids)
        with torch.no_grad():
            full = model(input_ids=ids).logits
        torch.testing.assert_close(tail.logits, full, msg=model_type, rtol=0, atol=0)
        n = len(tail.layer_list)
        for i in range(n):
            torch.testing.assert_close(tail.logits_from(i), full, msg=f"{model_type} from {i}", rtol=1e-5, atol=1e-5)
        last = [m for m in tail.layer_list[n - 1].modules() if isinstance(m, torch.nn.Linear)][-1]  # q may be normed
        first = [m for m in tail.layer_list[0].modules() if isinstance(m, torch.nn.Linear)][0]
        with torch.no_grad():
            last.weight.mul_(1.5)
            first.weight.mul_(1.5)  # before the replayed input: must not matter
        changed = tail.logits_from(n - 1)
        assert not torch.allclose(changed, full, atol=1e-4), model_type
        with torch.no_grad():
            first.weight.div_(1.5)
            torch.testing.assert_close(changed, model(input_ids=ids).logits, msg=model_type, rtol=1e-5, atol=1e-5)


def test_linears_reading_one_input_share_one_hessian(tiny_models):
    """q/k/v (and gate/up) read one tensor: one accumulator, equal to each Linear's own Hessian."""
    from modelpress.algorithms.hessian import HessianCollector

    for model_type, path in tiny_models.items():
        lm = LayerwiseModel(loading.resolve(path))
        capture = lm.capture([torch.randint(3, 300, (2, 24)) for _ in range(2)])
        layer = lm.load_layer(0)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                   and not (lm.arch.moe and n.startswith("mlp."))}  # MoE blocks: see test_moe.py
        with HessianCollector(linears, owner=layer) as shared:
            run_layer(layer, capture.hidden, capture.kwargs[0])
        shared_away = 0  # Linears that use another's accumulator
        for _, group in lm.arch.norm_to_linears:
            present = [n for n in group if n in linears]
            shared_away += len(present) - 1
            assert len({shared._alias.get(n, n) for n in present}) == 1, (model_type, present)
            with HessianCollector({present[-1]: linears[present[-1]]}, owner=layer) as alone:
                run_layer(layer, capture.hidden, capture.kwargs[0])
            torch.testing.assert_close(shared.hessian(present[-1])[0], alone.hessian(present[-1])[0], msg=model_type)
        assert len(shared.owners()) == len(linears) - shared_away, model_type


def _logit_error(path, out, ids) -> float:
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return (q(ids).logits - ref(ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3", "phi3", "opt"])
def test_gptq_checkpoint_loads_and_beats_rtn(tiny_models, tiny_tokenizer, tmp_path, model_type):
    path = tiny_models[model_type]
    record = compress(str(path), _gptq(), str(tmp_path / "gptq"))
    compress(str(path), RTNConfig(bits=3, group_size=32), str(tmp_path / "rtn"))
    assert record["quantized"]["layers"] == len(record["layers"]) > 0
    assert all(layer["tokens"] == 8 * 65 for layer in record["layers"].values())  # 8 windows, 64 + BOS
    text = austen("mansfield_park.txt").read_text()[:4000]
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert _logit_error(path, tmp_path / "gptq", ids) < _logit_error(path, tmp_path / "rtn", ids)


def test_layer_loop_leaves_no_frozen_objects(tiny_models, tmp_path):
    """The per-layer collections freeze their survivors for speed; the run must hand them back, so a
    program that calls compress keeps its cyclic garbage collectable."""
    import gc

    compress(str(tiny_models["llama"]), _gptq(), str(tmp_path / "q"))
    assert gc.get_freeze_count() == 0


def test_resume_after_interrupt_equals_an_uninterrupted_run(tiny_models, tmp_path):
    path = tiny_models["qwen2"]
    config = _gptq(bits=4)
    compress(str(path), config, str(tmp_path / "straight"))

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # after layer 0 was saved, while layer 1 is being written
        compress_calibrated(str(path), config, str(out), make_sink=CrashingSink)
    assert not out.exists() and (tmp_path / "resumed.partial").is_dir()
    with pytest.raises(Exception, match="add --resume"):
        compress(str(path), config, str(out))
    record = compress(str(path), config, str(out), resume=True)
    assert record["resumed_at_layer"] == 1
    assert not (tmp_path / "resumed.partial").exists()
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tiny_models, tmp_path):
    path = tiny_models["llama"]
    with pytest.raises(KeyboardInterrupt):
        compress_calibrated(str(path), _gptq(bits=4), str(tmp_path / "o"), make_sink=StatelessSink)
    # crashed before any layer was saved: nothing to resume, a fresh run starts
    record = compress(str(path), _gptq(bits=4), str(tmp_path / "o"), resume=True)
    assert "resumed_at_layer" not in record


def test_tied_head_is_stored_once_and_output_config_is_clean(tiny_models, tmp_path):
    path = tiny_models["gemma3_text"]  # tie_word_embeddings
    compress(str(path), _gptq(bits=4), str(tmp_path / "o"))
    names = checkpoint_tensors(tmp_path / "o").keys()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt", "phi3"])
def test_awq_scale_folding_is_exact_before_rounding(tiny_models, model_type):
    """Folding s into the norm (gemma: 1 + w) or the producing Linear (up_proj, OPT's fc1) and the
    consumers' columns leaves the layer's output unchanged."""
    from modelpress.pipeline.scale_stages import fold_scale

    lm = LayerwiseModel(loading.resolve(tiny_models[model_type]))
    capture = lm.capture([torch.randint(3, 300, (2, 30))])
    layer = lm.load_layer(0)
    before = run_layer(layer, capture.hidden, capture.kwargs[0])[0]
    for producer, linears, offset in lm.arch.scale_pairs(layer):
        first = layer.get_submodule(linears[0])
        s = torch.rand(first.in_features) * 3 + 0.2
        fold_scale(layer.get_submodule(producer), [layer.get_submodule(n) for n in linears], s, offset)
    after = run_layer(layer, capture.hidden, capture.kwargs[0])[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_v_to_o_scaling_only_where_each_v_channel_feeds_one_o_column(tiny_models):
    """Multi-head attention (OPT) folds a scale through v_proj into o_proj; grouped-query (the tiny
    llama: 2 kv heads for 4 query heads) cannot, so the pair is skipped there."""
    pairs = {}
    for model_type in ("llama", "opt"):
        lm = LayerwiseModel(loading.resolve(tiny_models[model_type]))
        pairs[model_type] = {p for p, _, _ in lm.arch.scale_pairs(lm.load_layer(0))}
    assert "self_attn.v_proj" in pairs["opt"] and "fc1" in pairs["opt"]
    assert "self_attn.v_proj" not in pairs["llama"] and "mlp.up_proj" in pairs["llama"]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2", "opt"])
def test_awq_checkpoint_loads_and_beats_rtn(tiny_models, tiny_tokenizer, tmp_path, model_type):
    from modelpress.compress import AWQConfig

    path = tiny_models[model_type]
    calib = {"text": str(austen("emma.txt")), "samples": 8, "seq_len": 64, "batch_size": 4}
    record = compress(str(path), AWQConfig(bits=3, group_size=32, calibration=calib), str(tmp_path / "awq"))
    compress(str(path), RTNConfig(bits=3, group_size=32), str(tmp_path / "rtn"))
    assert any("awq_alpha" in layer for layer in record["layers"].values())
    text = austen("mansfield_park.txt").read_text()[:4000]
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert _logit_error(path, tmp_path / "awq", ids) < _logit_error(path, tmp_path / "rtn", ids)
