"""`prune --method structured`: channels, heads and layers really removed, on tiny models of every
architecture; what is removed is exactly what zeroing its contribution would do; bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ARCHS, austen, checkpoint_tensors, llama_cpp_logits, make_tiny_model
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.errors import UserError
from modelpress.export.gguf import GGUF_ARCHITECTURES, export_gguf
from modelpress.models.arch import ARCHITECTURES
from modelpress.pipeline.recipe import StructuredConfig
from modelpress.prune import prune

MODES = {"mlp": {"mlp_keep": 0.5, "channel_multiple": 1}, "heads": {"heads_keep": 0.5}, "layers": {"drop_layers": 1}}
IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 11, 64, 5, 80, 120]])


def _calib() -> dict:
    return {"text": str(austen("emma.txt")), "samples": 4, "seq_len": 64, "batch_size": 2}


def _structured(**kw) -> StructuredConfig:
    return StructuredConfig(calibration=_calib(), **kw)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _zero_removed(model, model_type: str, plan: dict) -> None:
    """In the unpruned ``model``: zero what the plan removed (the inputs of the MLP's and the
    attention's output projections for removed channels and q heads), which must leave the very
    function the pruned model computes."""
    spec = ARCHITECTURES[model_type].structure
    layers = model.get_submodule(ARCHITECTURES[model_type].layers)
    for i, layer in enumerate(layers):
        if plan["channels"] is not None:
            W = layer.get_submodule(spec.mlp_out).weight.data
            removed = [c for c in range(W.shape[1]) if c not in set(plan["channels"][str(i)])]
            W[:, removed] = 0
        if plan["q_heads"] is not None:
            W = layer.get_submodule(spec.attn_out).weight.data
            d = model.config.head_dim
            for h in range(W.shape[1] // d):
                if h not in set(plan["q_heads"][str(i)]):
                    W[:, h * d:(h + 1) * d] = 0


@pytest.mark.parametrize("model_type", list(TINY_ARCHS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_architecture_and_mode_loads_and_matches_zeroing(tiny_models, tmp_path, model_type, mode):
    spec = ARCHITECTURES[model_type].structure
    path, out = tiny_models[model_type], tmp_path / "o"
    config = _structured(**MODES[mode])
    if (mode == "mlp" and spec.mlp_out is None) or (mode == "heads" and spec.attn_out is None):
        with pytest.raises(UserError, match="not supported yet|cannot change"):
            prune(str(path), config, str(out), quality_guard=False)
        assert not out.exists()
        return
    record = prune(str(path), config, str(out), quality_guard=False)
    st = record["structured"]
    assert st["params"]["after"] < st["params"]["before"]
    written = checkpoint_tensors(out)
    assert sum(t.numel() for t in written.values()) == st["params"]["after"]  # counted in the file
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, edited config
    cfg = json.loads((out / "config.json").read_text())
    source = AutoModelForCausalLM.from_pretrained(path).eval()
    if mode == "layers":
        assert cfg["num_hidden_layers"] == source.config.num_hidden_layers - 1
        assert len(record["plan"]["dropped"]) == 1
        for key in ("layer_types",):
            if key in cfg:
                assert len(cfg[key]) == cfg["num_hidden_layers"]
        assert torch.isfinite(_logits(pruned)).all()
        return
    if mode == "mlp":
        assert cfg[spec.intermediate_size] == getattr(source.config, spec.intermediate_size) // 2
    else:
        assert cfg["num_attention_heads"] == source.config.num_attention_heads // 2
        assert cfg["head_dim"] == source.config.head_dim
    _zero_removed(source, model_type, record["plan"])
    torch.testing.assert_close(_logits(pruned), _logits(source), rtol=1e-4, atol=1e-4)


def _edited(tiny_tokenizer, tmp_path, edit, **config_fields):
    """A tiny llama whose weights ``edit(model)`` changed, saved as a checkpoint."""
    path = make_tiny_model(tmp_path / "src", "llama", tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(path)
    return path


def test_channels_whose_output_is_zero_are_the_ones_removed(tiny_tokenizer, tmp_path):
    dead = list(range(0, 128, 2))  # half of the 128 channels: up_proj rows zero -> act(gate) * 0 = 0

    def kill(model):
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead] = 0

    path = _edited(tiny_tokenizer, tmp_path, kill)
    record = prune(str(path), _structured(mlp_keep=0.5, channel_multiple=1), str(tmp_path / "o"), quality_guard=False)
    assert record["plan"]["channels"]["0"] == [c for c in range(128) if c not in dead]
    ref, got = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    torch.testing.assert_close(_logits(got), _logits(ref), rtol=1e-5, atol=1e-5)


def test_a_kv_group_whose_heads_output_zero_is_the_one_removed(tiny_tokenizer, tmp_path):
    def kill(model):  # 4 q heads, 2 kv heads of 16: v rows of kv head 1 zero -> q heads 2, 3 output 0
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[16:32] = 0

    path = _edited(tiny_tokenizer, tmp_path, kill)
    record = prune(str(path), _structured(heads_keep=0.5, head_mode="whole-groups"), str(tmp_path / "o"),
                   quality_guard=False)
    assert record["plan"]["q_heads"]["1"] == [0, 1] and record["plan"]["kv_heads"]["1"] == [0]
    ref, got = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert got.config.num_key_value_heads == 1
    torch.testing.assert_close(_logits(got), _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["block-influence", "angular"])
def test_a_layer_that_changes_nothing_is_the_one_dropped(tiny_tokenizer, tmp_path, metric):
    def identity(model):  # layer 1 adds nothing to the residual stream: no attention or MLP output
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()

    path = _edited(tiny_tokenizer, tmp_path, identity)
    record = prune(str(path), _structured(drop_layers=1, layer_metric=metric), str(tmp_path / "o"), quality_guard=False)
    assert record["plan"]["dropped"] == [1]
    ref, got = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    torch.testing.assert_close(_logits(got), _logits(ref), rtol=1e-5, atol=1e-5)


def test_within_group_head_pruning_keeps_the_kv_heads(tiny_models, tmp_path):
    record = prune(str(tiny_models["llama"]), _structured(heads_keep=0.5), str(tmp_path / "o"), quality_guard=False)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 2)
    assert record["structured"]["heads"]["mode"] == "within-groups"
    for heads in record["plan"]["q_heads"].values():  # one q head from each group of two
        assert sorted(h // 2 for h in heads) == [0, 1]
    tensors = checkpoint_tensors(tmp_path / "o")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * 16


def test_tied_embeddings_stay_tied_and_plan_sees_the_smaller_model(tiny_models, tmp_path, capsys):
    out = tmp_path / "o"
    prune(str(tiny_models["gemma3_text"]), _structured(mlp_keep=0.5, channel_multiple=1, drop_layers=1), str(out),
          quality_guard=False)
    assert "lm_head.weight" not in checkpoint_tensors(out)
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings
    sizes = {}
    for name, folder in {"source": tiny_models["gemma3_text"], "pruned": out}.items():
        assert main(["plan", str(folder), "--json"]) == 0
        sizes[name] = json.loads(capsys.readouterr().out)
    assert sizes["pruned"]["model"]["params"] < sizes["source"]["model"]["params"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "wanda", "--sparsity", "0.5", "--mlp-keep", "0.5"], "--mlp-keep does not apply to --method wanda"),
    (["--method", "structured", "--sparsity", "0.5"], "--sparsity does not apply to --method structured"),
    (["--method", "structured"], "needs --mlp-keep"),
    (["--method", "structured", "--mlp-keep", "0"], "greater than 0"),
    (["--method", "structured", "--heads-keep", "1.5"], "less than or equal to 1"),
    (["--method", "structured", "--heads-keep", "0.2"], "keeps no q head of each group of 2"),
    (["--method", "structured", "--heads-keep", "0.2", "--head-mode", "whole-groups"], "keeps none of the 2 kv groups"),
    (["--method", "structured", "--drop-layers", "2"], "removes every one of the model's 2"),
    (["--method", "structured", "--drop-layers", "1", "--resume"], "does not resume"),
    (["--method", "wanda"], "needs --sparsity"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    assert main(["prune", str(tiny_llama), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_the_cli_reports_what_was_removed(tiny_llama, tmp_path, capsys):
    assert main(["prune", str(tiny_llama), "--method", "structured", "--mlp-keep", "0.5", "--channel-multiple", "1",
                 "--drop-layers", "1", "--calib", str(austen("emma.txt")), "--calib-samples", "2",
                 "--calib-seq-len", "32", "-o", str(tmp_path / "o"), "--no-quality-guard"]) == 0
    out = capsys.readouterr().out
    assert "MLP 128 -> 64 channels" in out and "layers 2 -> 1" in out and "what it buys: smaller tensors" in out


@pytest.mark.parametrize("arch", sorted(GGUF_ARCHITECTURES))
def test_a_structured_output_runs_in_llama_cpp_like_transformers(tiny_models, tmp_path, arch):
    """Fewer channels, heads (explicit head_dim, RoPE permutation by the new head counts) and
    layers (Gemma's per-layer sliding pattern renumbered): llama.cpp computes what transformers does.
    llama.cpp's qwen2 needs heads x head_dim = hidden size: its heads stay (the refusal is tested below)."""
    import numpy as np

    out = tmp_path / "o"
    heads = None if GGUF_ARCHITECTURES[arch].q_is_square else 0.5
    prune(str(tiny_models[arch]), _structured(mlp_keep=0.5, channel_multiple=1, heads_keep=heads, drop_layers=1),
          str(out), quality_guard=False)
    export_gguf(str(out), str(tmp_path / "m.gguf"), "f32")
    ids = torch.randint(3, 384, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(llama_cpp_logits(tmp_path / "m.gguf", ids), ref, atol=2e-3, rtol=1e-3)


def test_gguf_export_refuses_a_qwen2_with_fewer_heads(tiny_models, tmp_path, capsys):
    """llama.cpp's qwen2 loader builds attn_q as hidden x hidden: say so instead of writing a file it refuses."""
    from modelpress.cli import main

    prune(str(tiny_models["qwen2"]), _structured(heads_keep=0.5), str(tmp_path / "o"), quality_guard=False)
    assert main(["export", str(tmp_path / "o"), "--to", "gguf", "--format", "f16", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "heads x head size = hidden size" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_a_structured_output_compresses_with_gptq(tiny_models, tmp_path):
    from modelpress.compress import GPTQConfig, compress

    prune(str(tiny_models["qwen2"]), _structured(heads_keep=0.5, mlp_keep=0.5, channel_multiple=1), str(tmp_path / "s"),
          quality_guard=False)
    compress(str(tmp_path / "s"), GPTQConfig(bits=4, group_size=32, calibration=_calib()), str(tmp_path / "q"),
             quality_guard=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert model.config.num_attention_heads == 2 and torch.isfinite(_logits(model)).all()


def test_a_head_count_transformers_would_refuse_is_refused_first_with_the_counts_it_accepts(tiny_tokenizer, tmp_path,
                                                                                           capsys):
    """Gemma 3's config wants hidden_size divisible by the head count even with an explicit head_dim:
    4 q heads sharing 1 kv head, hidden 64, keep 0.75 -> 3 heads, which it refuses."""
    from conftest import TINY
    from transformers import AutoConfig

    fields = {**TINY, **TINY_ARCHS["gemma3_text"], "num_key_value_heads": 1, "vocab_size": len(tiny_tokenizer),
              "bos_token_id": 1, "eos_token_id": 2}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **fields))
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "o"
    assert main(["prune", str(tmp_path / "src"), "--method", "structured", "--heads-keep", "0.75", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformers would not load the pruned config" in err and "--heads-keep 0.25, 0.5, 1" in err, err
    assert "\n" not in err and not out.exists()
