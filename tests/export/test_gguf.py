"""GGUF export: llama.cpp reads our file back and computes what transformers computes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.export.gguf import GGUF_ARCHITECTURES, _permute_rope, export_gguf
from modelpress.formats.gguf_blocks import gguf_format


@pytest.mark.parametrize("arch", sorted(GGUF_ARCHITECTURES))
def test_f32_export_runs_in_llama_cpp_like_transformers(tiny_models, arch, tmp_path):
    """Every architecture of the table: llama.cpp's logits from our file equal transformers', on
    more tokens than the tiny Gemma's sliding window (64), so windowed layers are checked too."""
    out = tmp_path / "m.gguf"
    result = export_gguf(str(tiny_models[arch]), str(out), "f32")
    assert out.is_file() and result["bytes"] == out.stat().st_size
    ids = torch.randint(3, 384, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = llama_cpp_logits(out, ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
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
    assert main(["export", str(tiny_models["llama"]), "--to", "gguf", "--format", "q9_9", "-o", str(tmp_path / "a.gguf")]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err
    assert main(["export", str(tiny_models["opt"]), "--to", "gguf", "-o", str(tmp_path / "b.gguf")]) == 2
    assert "does not support 'opt'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_round_trip(name, request, eval_text, tmp_path, capsys):
    """A real model as Q4_K_M through llama.cpp: the tensor types llama.cpp's own quantizer gives
    it (Gemma's published Q4_K_M file is the reference), the same tokens as transformers for real
    text, generated text, and ppl-512 within 1% of ours on the file's weights (--verify)."""
    import llama_cpp
    from transformers import AutoTokenizer

    path = request.getfixturevalue(name)
    out = tmp_path / "m.gguf"
    assert main(["export", str(path), "--to", "gguf", "--format", "q4_k_m", "-o", str(out),
                 "--verify", "--text", str(eval_text), "--windows", "2"]) == 0
    assert "differ by" in capsys.readouterr().out
    if name == "gemma3":
        reference = {t.name: t.tensor_type for t in GGUFReader(path.parent / "gemma-3-270m-q4_k_m.gguf").tensors}
        assert {t.name: t.tensor_type for t in GGUFReader(out).tensors} == reference
    text = eval_text.read_text(encoding="utf-8")[5000:9000]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False, n_threads=2)
    try:
        hf_ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=hf_ids[0] == llm.token_bos(), special=False) == hf_ids
        generated = llm("It is a truth universally acknowledged, that", max_tokens=16, temperature=0)
        assert len(generated["choices"][0]["text"].split()) >= 5
    finally:
        llm.close()


def test_verify_loads_the_file_back_and_agrees(tiny_llama, eval_text, tmp_path, capsys):
    """--verify: llama.cpp's perplexity of the written file equals ours for the same weights (1%)."""
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_llama), "--to", "gguf", "--format", "q8_0", "-o", str(out),
                 "--verify", "--text", str(eval_text), "--windows", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("ppl-512 (2 windows): llama.cpp") and out.is_file()
    rel = float(line.rsplit("differ by ", 1)[1].split("%")[0])
    assert rel < 1.0


def test_nan_weight_or_odd_rows(tiny_llama, tmp_path, capsys, caplog):
    """NaN weights: a clear error and no file. Rows that fit no block: F16, as llama.cpp does, said in a warning."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][0, 3] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["export", str(bad), "--to", "gguf", "--format", "q8_0", "-o", str(tmp_path / "a.gguf")]) == 2
    assert "model.layers.1.mlp.down_proj.weight contains NaN" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob("a.gguf.partial*"))
    with caplog.at_level("WARNING", logger="modelpress"):
        export_gguf(str(tiny_llama), str(tmp_path / "b.gguf"), "q4_k_m")  # rows of 64 and 128: no 256-blocks
    assert "fall back as llama.cpp does (q4_k->q5_0" in caplog.text


def test_export_spellings_before_to_still_work_and_say_what_to_write(tiny_llama, tmp_path, capsys, caplog):
    """`--format gguf --type T` (container, then type) gives the same file as `--to gguf --format T`."""
    old, new = tmp_path / "old.gguf", tmp_path / "new.gguf"
    assert main(["export", str(tiny_llama), "--format", "gguf", "--type", "q8_0", "-o", str(old)]) == 0
    said = caplog.text
    assert "--format gguf is deprecated" in said and "write --to gguf" in said and "write --format q8_0" in said
    caplog.clear()
    assert main(["export", str(tiny_llama), "--to", "gguf", "--format", "q8_0", "-o", str(new)]) == 0
    assert "deprecated" not in caplog.text
    assert old.read_bytes() == new.read_bytes()
    assert main(["export", str(tiny_llama), "--format", "q8_0", "-o", str(tmp_path / "implied.gguf")]) == 0
    assert (tmp_path / "implied.gguf").read_bytes() == new.read_bytes()  # a GGUF type implies --to gguf
    assert main(["export", str(tiny_llama), "--to", "hf", "--format", "q8_0", "-o", str(tmp_path / "x")]) == 2
    assert "--dtype" in capsys.readouterr().err and not (tmp_path / "x").exists()
