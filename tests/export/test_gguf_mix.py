"""llama.cpp's file types: our GGUF equals what llama.cpp's own quantizer writes from the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM

from modelpress.errors import UserError
from modelpress.eval.llamacpp import llama_cpp_quantize
from modelpress.export.gguf import export_gguf
from modelpress.export.gguf_mix import file_type, tensor_types


@pytest.fixture(scope="module")
def mix_model(tmp_path_factory, tiny_tokenizer):
    """A Llama whose rows are whole 256-blocks (k-quants apply) except ffn_down's (288: fallbacks),
    with 8 layers so the per-layer rules of the mixes pick different layers."""
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=288, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                               vocab_size=len(tiny_tokenizer), max_position_embeddings=256,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mix") / "model"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def f32_gguf(mix_model):
    out = mix_model.parent / "f32.gguf"
    export_gguf(str(mix_model), str(out), "f32")
    return out


@pytest.mark.parametrize("ftype", ["q4_k_m", "q3_k_m", "q4_0", "q5_k_m", "q2_k", "q4_k_s", "q6_k", "q8_0"])
def test_same_types_and_bytes_as_llama_quantize(mix_model, f32_gguf, tmp_path, ftype):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_cpp_quantize(f32_gguf, ref, ftype)
    export_gguf(str(mix_model), str(ours), ftype)
    theirs = {t.name: t for t in GGUFReader(ref).tensors}
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    assert sorted(theirs) == sorted(mine)
    for name, t in theirs.items():
        assert mine[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.array(mine[name].data), np.array(t.data)), name
    assert ref.stat().st_size == ours.stat().st_size
    assert len({t.tensor_type for t in theirs.values()}) > 2 or ftype in ("q8_0", "q4_0")  # a real mix


def test_mix_rules():
    names = [(f"blk.{i}.{k}.weight", (256, 512)) for i in range(16) for k in ("attn_v", "ffn_down", "attn_output")]
    q3 = tensor_types(names, "q3_k_m", n_layer=16, n_gqa=1)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["q5_k", "q5_k", "q4_k"]
    assert q3["blk.0.ffn_down.weight"] == "q5_k" and q3["blk.1.ffn_down.weight"] == "q4_k"
    assert q3["blk.3.attn_output.weight"] == "q4_k"
    q4 = tensor_types(names, "q4_k_m", n_layer=16, n_gqa=1)
    more = [i for i in range(16) if q4[f"blk.{i}.ffn_down.weight"] == "q6_k"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]  # first and last eighth, every third between
    odd = tensor_types([("blk.0.attn_q.weight", (64, 100))], "q4_k_m", n_layer=1, n_gqa=1)
    assert odd["blk.0.attn_q.weight"] == "f16"  # neither a 256- nor a 32-block fits
    pure = tensor_types(names, "q4_k_m", n_layer=16, n_gqa=1, pure=True)
    assert set(pure.values()) == {"q4_k"}
    assert file_type("Q4_K") == "q4_k_m"
    with pytest.raises(UserError, match="unknown GGUF type"):
        file_type("q4_k_x")


def test_calibrated_gguf_same_size_lower_error(mix_model, eval_text, tmp_path, capsys):
    """GPTQ onto the grids of Q3_K_M: llama.cpp's types and size, closer logits to the float model."""
    from transformers import AutoTokenizer

    from modelpress.cli import main
    from modelpress.eval.llamacpp import gguf_weights_model

    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "cal.gguf"
    export_gguf(str(mix_model), str(plain), "q3_k_m")
    assert main(["export", str(mix_model), "--to", "gguf", "--format", "q3_k_m", "--calibrate", "gptq",
                 "--calib-samples", "8", "--calib-seq-len", "128", "-o", str(calibrated)]) == 0
    assert "GPTQ on 56 Linears of 8 layers" in capsys.readouterr().out
    assert plain.stat().st_size == calibrated.stat().st_size
    types = {t.name: t.tensor_type for t in GGUFReader(plain).tensors}
    assert {t.name: t.tensor_type for t in GGUFReader(calibrated).tensors} == types
    ids = AutoTokenizer.from_pretrained(mix_model)(eval_text.read_text(encoding="utf-8")[20000:26000],
                                                   return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(mix_model, dtype=torch.float32).eval()(ids).logits
        err = {f: (gguf_weights_model(str(mix_model), f)(ids).logits - ref).pow(2).mean().item()
               for f in (plain, calibrated)}
    assert err[calibrated] < 0.8 * err[plain]


def test_calibrated_rows_never_worse_than_llama_cpp_on_the_calibration_objective():
    """A weight already on its grid (RTN exact) keeps llama.cpp's bytes; elsewhere GPTQ's win."""
    from modelpress.pipeline.stages import better_rows
    from modelpress.formats.gguf_blocks import gguf_format

    fmt = gguf_format("q4_k")
    torch.manual_seed(0)
    X = torch.randn(512, 2048) * torch.linspace(0.1, 3, 512)[:, None]
    H = 2 * X @ X.T / 2048
    W = torch.randn(8, 512)
    W[:4] = fmt.dequantize(fmt.quantize(W[:4]), (4, 512))  # rows on the grid
    from modelpress.algorithms.gguf_gptq import gguf_gptq

    rtn, gptq = fmt.quantize(W), gguf_gptq(W, H, fmt).data
    chosen = better_rows(W, H, fmt, rtn, gptq)
    assert torch.equal(chosen[:4], rtn[:4])
    err = lambda d: (((fmt.dequantize(d, (8, 512)) - W) @ H) * (fmt.dequantize(d, (8, 512)) - W)).sum(1)  # noqa: E731
    assert (err(chosen) <= err(rtn) + 1e-6).all() and err(chosen)[4:].sum() < err(rtn)[4:].sum()


@pytest.mark.parametrize("ftype", ["q4_k_m", "q3_k_s", "q5_k_m", "q4_0", "q6_k"])
def test_plan_sizes_a_gguf_file_type_to_the_byte(mix_model, tmp_path, capsys, ftype):
    """`plan` lays the file out with the exporter's per-tensor types: its weight bytes are the
    tensor data `export` writes (the file adds only its header and metadata)."""
    import json

    from modelpress.cli import main

    assert main(["plan", str(mix_model), "--formats", f"{ftype},int4-g128", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["formats"]}
    out = tmp_path / f"{ftype}.gguf"
    export_gguf(str(mix_model), str(out), ftype)
    written = sum(int(t.n_bytes) for t in GGUFReader(out).tensors)
    assert rows[ftype]["weight_bytes_exact"] and rows[ftype]["weight_bytes"] == written
    assert not rows["int4-g128"]["weight_bytes_exact"]


def test_plan_of_a_bare_size_keeps_the_averaged_mix(capsys):
    import json

    from modelpress.cli import main

    assert main(["plan", "7B", "--formats", "q4_k_m", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["formats"][0]
    assert not row["weight_bytes_exact"] and row["linear_bits_per_weight"] == 4.85


def test_overrides_set_per_tensor_types(mix_model, tmp_path):
    """Module-name overrides over llama.cpp's mix: matched weights get their type, every other
    tensor keeps the mix's type and bytes, the file loads in llama.cpp; a bad override is refused
    before anything is written."""
    import llama_cpp

    base, mixed = tmp_path / "base.gguf", tmp_path / "mixed.gguf"
    export_gguf(str(mix_model), str(base), "q4_k_m")
    overrides = {r"model\.layers\.0\.self_attn\.q_proj": "q8_0", r"model\.layers\.\d+\.mlp\.down_proj": "q5_0",
                 r"model\.layers\.[0-3]\..*": "q6_k"}  # first match wins: down_proj stays q5_0 in layers 0-3
    export_gguf(str(mix_model), str(mixed), "q4_k_m", overrides=overrides)
    before = {t.name: t for t in GGUFReader(base).tensors}
    after = {t.name: t for t in GGUFReader(mixed).tensors}
    expect = {}
    for name, t in before.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name == "blk.0.attn_q.weight":
            expect[name] = "Q8_0"
        elif name.endswith("ffn_down.weight"):
            expect[name] = "Q5_0"
        elif layer is not None and layer < 4 and t.tensor_type.name not in ("F32",):
            expect[name] = "Q6_K"
        else:
            expect[name] = t.tensor_type.name
            assert np.array_equal(np.array(after[name].data), np.array(t.data)), name
    assert {n: t.tensor_type.name for n, t in after.items()} == expect
    llm = llama_cpp.Llama(model_path=str(mixed), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(b"Emma Woodhouse, handsome, clever")
    llm.eval(tokens)
    logits = np.array(llm.scores[len(tokens) - 1])
    assert np.isfinite(logits).all() and logits.std() > 0
    for bad, match in [({r".*down_proj": "q4_k"}, "not whole q4_k blocks"), ({r".*q_proj": "q9_k"}, "unknown type"),
                       ({r".*qproj": "q8_0"}, "match no weight"), ({r"(": "q8_0"}, "not a regular expression")]:
        with pytest.raises(UserError, match=match):
            export_gguf(str(mix_model), str(tmp_path / "bad.gguf"), "q4_k_m", overrides=bad)
        assert not (tmp_path / "bad.gguf").exists()
