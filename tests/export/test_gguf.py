"""GGUF export: llama.cpp reads our file back and computes what transformers computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.export.gguf import _permute_rope, export_gguf
from modelpress.formats.gguf_blocks import gguf_format


def _logits_llama_cpp(path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_f32_export_runs_in_llama_cpp_like_transformers(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    result = export_gguf(str(tiny_llama), str(out), "f32")
    assert out.is_file() and result["bytes"] == out.stat().st_size
    ids = [1, 17, 42, 99, 200, 31, 8, 250, 64, 5]
    ours = _logits_llama_cpp(out, ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)


def test_block_types_decode_to_our_weights(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(str(tiny_llama), str(out), "q8_0")
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    fmt = gguf_format("q8_0")
    for hf_name, g_name, heads in [("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", None),
                                   ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight",
                                    model.config.num_attention_heads)]:
        W = model.get_parameter(hf_name).detach()
        if heads:
            W = _permute_rope(W, heads)
        t = tensors[g_name]
        decoded = gguf_dequantize(np.array(t.data), t.tensor_type).reshape(W.shape)
        expected = fmt.dequantize(fmt.quantize(W), tuple(W.shape))
        assert np.array_equal(decoded, expected.numpy()), g_name
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_bad_requests_write_nothing(tiny_models, tmp_path, capsys):
    assert main(["export", str(tiny_models["llama"]), "--format", "gguf", "--type", "q9_9", "-o", str(tmp_path / "a.gguf")]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err
    assert main(["export", str(tiny_models["opt"]), "--format", "gguf", "-o", str(tmp_path / "b.gguf")]) == 2
    assert "does not support 'opt'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_f16_in_llama_cpp(smollm2, tmp_path):
    """The real model through llama.cpp: same next-token choices as transformers on real text."""
    path = smollm2
    out = tmp_path / "s.gguf"
    assert main(["export", str(path), "--format", "gguf", "--type", "f16", "-o", str(out)]) == 0
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)("It is a truth universally acknowledged, that a single man in "
                                              "possession of a good fortune, must be in want of a wife.")["input_ids"]
    ours = _logits_llama_cpp(out, ids)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert np.abs(ours - ref).max() < 0.5


def test_verify_loads_the_file_back_and_agrees(tiny_llama, eval_text, tmp_path, capsys):
    """--verify: llama.cpp's perplexity of the written file equals ours for the same weights (1%)."""
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_llama), "--format", "gguf", "--type", "q8_0", "-o", str(out),
                 "--verify", "--text", str(eval_text), "--windows", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("ppl-512 (2 windows): llama.cpp") and out.is_file()
    rel = float(line.rsplit("differ by ", 1)[1].split("%")[0])
    assert rel < 1.0
