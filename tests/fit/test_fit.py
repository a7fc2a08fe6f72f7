"""fit: the budget arithmetic by hand, an impossible target refused, a tiny model fitted end to end."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.cli.plan import load_shape
from modelpress.errors import UserError
from modelpress.fit.search import budget_for, parse_bytes


def test_memory_sizes_parse_in_decimal_and_binary_units():
    assert parse_bytes("12GB") == 12e9
    assert parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("500mb") == 500e6
    assert parse_bytes("1.5TB") == 1.5e12
    for bad in ("12", "GB", "12 parsecs", "-3GB"):
        with pytest.raises(UserError, match="number and a unit"):
            parse_bytes(bad)


def test_budget_is_memory_less_reserve_kv_cache_and_activations(tiny_llama):
    shape = load_shape(str(tiny_llama))  # 2 layers, 2 kv heads of 16, hidden 64
    b = budget_for(shape, memory="10MB", context=1000, batch=2, kv_dtype="fp16")
    kv = 2 * 2 * (2 * 16) * 1000 * 2 * 2  # layers x (K and V) x kv dim x context x batch x bytes
    act = 16 * 64 * 2 * 2000  # 16 hidden-size fp16 buffers per token in flight
    assert (b.kv_cache, b.activations, b.reserve) == (kv, act, 1e6)
    assert b.weights == 10e6 - 1e6 - kv - act
    assert budget_for(shape, memory="10MB", context=1000, batch=2, kv_dtype="fp8").kv_cache == kv / 2
    assert budget_for(shape, memory="10MB", weights_only=True).weights == 10e6
    h100 = budget_for(shape, device="h100", context=4096, batch=1)
    assert h100.memory == 80e9 and h100.device == "H100 SXM 80GB"
    with pytest.raises(UserError, match="--target NAME .* or --memory"):
        budget_for(shape)


def test_an_impossible_target_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, capsys, monkeypatch):
    import modelpress.fit.search

    def no_work(*a, **k):
        raise AssertionError("the sensitivity pass ran: an impossible target must be refused before any work")

    monkeypatch.setattr(modelpress.fit.search, "measure_sensitivity", no_work)
    out = tmp_path / "fit"
    code = main(["fit", str(tiny_llama), "--memory", "20KB", "--weights-only", "-o", str(out),
                 "--calib", str(austen("emma.txt")), "--calib-samples", "4", "--calib-seq-len", "64",
                 "--sensitivity", "rtn"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "smallest model reachable" in err and "it would fit:" in err
    assert not out.exists() and not (tmp_path / "fit.partial").exists()


def test_an_impossible_target_that_an_fp8_cache_would_reach_says_so(tmp_path):
    """The KV cache takes most of the memory: the refusal names --kv-dtype fp8 when the bytes it
    frees would hold the smallest model, and does not when they would not."""
    from modelpress.fit.search import Budget, _nothing_fits

    budget = Budget("600MB", 600e6, 60e6, kv_cache=377.5e6, activations=151e6, weights=11.5e6, context=4096,
                    batch=4, kv_dtype="fp16")
    for smallest, offered in ((143.2e6, True), (250e6, False)):
        (tmp_path / "work").mkdir()
        with pytest.raises(UserError) as e:
            _nothing_fits(budget, ["int4-g64", "keep"], smallest, tmp_path / "work")
        assert ("--kv-dtype fp8" in str(e.value)) == offered
        assert ("200.2 MB" in str(e.value)) == offered  # 11.5 MB + half of the 377.5 MB cache
        assert not (tmp_path / "work").exists()
    with pytest.raises(UserError) as e:  # already fp8: nothing to offer
        _nothing_fits(Budget("x", 1e6, 0, 5e5, 0, 5e5, 10, 1, "fp8"), ["int4-g64"], 6e5, tmp_path / "w")
    assert "--kv-dtype" not in str(e.value)


@pytest.mark.slow
def test_fit_writes_the_least_loss_model_within_the_budget(tiny_llama, tmp_path, capsys):
    """Between int4 and int8 sizes: a mixed allocation and uniform int4 are measured; the winner
    fits by its bytes on disk, loads in plain transformers and is recorded with every candidate."""
    args = ["--calib", str(austen("emma.txt")), "--calib-samples", "8", "--calib-seq-len", "64",
            "--text", str(austen("pride_and_prejudice.txt")), "--windows", "2", "--formats", "int8,int4-g32,int2-g32"]
    out = tmp_path / "fit"
    weights = sum(t.numel() * t.element_size() for t in checkpoint_tensors(tiny_llama).values())
    budget = int(weights * 0.55)  # float32 tiny model: int8 Linears fit, not the float ones
    assert main(["fit", str(tiny_llama), "--memory", f"{budget}B", "--weights-only", "-o", str(out), *args, "--report",
                 "--speed"]) == 0
    record = json.loads((out / "fit.json").read_text())
    names = [c["name"] for c in record["candidates"]]
    assert "mixed" in names or len(names) >= 2
    assert all(c["bytes"] <= budget and c["kl"] is not None for c in record["candidates"])
    winner = next(c for c in record["candidates"] if c["name"] == record["winner"])
    assert winner["kl"] <= min(c["kl"] for c in record["candidates"]) * 1.01
    stored = checkpoint_tensors(out / "model")
    written = sum(t.numel() * t.element_size() for t in stored.values())
    assert written == record["check"]["written_tensor_bytes"] == winner["bytes"] <= budget
    head = record["formats"]["lm_head"]  # the untied head is allocated like the Linears, priced by its KL
    assert ("lm_head.weight" in stored) == (head == "keep")
    assert json.loads((out / "sensitivity.json").read_text())["linears"]["lm_head"]["kl_measured"]
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 16))).logits).all()
    assert (out / "recipe.yaml").is_file() and (out / "sensitivity.json").is_file()
    assert ".partial" not in (out / "recipe.yaml").read_text() + (out / "fit.json").read_text()
    assert all(".partial" not in f.read_text() for f in (out / "recipes").glob("*.yaml"))  # each runnable from OUT
    from modelpress.pipeline.yaml_recipe import load_recipe

    assert load_recipe(out / "recipe.yaml").stages[0].config.overrides or winner["kind"] == "uniform"
    printed = capsys.readouterr().out
    assert "winner" in printed and "ceiling" in printed
    page = (out / "report.html").read_text()
    assert all(f"data-chart='{c}'" in page for c in ("budget", "sensitivity", "allocation"))
    speed = record["speed"]  # --speed: the written winner decoding in transformers, beside this machine's ceiling
    assert speed["engine"] == "transformers" and speed["tokens"] == 64 and speed["decode_tok_s"] > 0
    assert speed["fraction"] == speed["decode_tok_s"] / speed["ceiling_tok_s"]
    assert f"<td class='n'>{speed['decode_tok_s']:.1f}</td>" in page and "data-chart='roofline'" in page

    # a second budget from the same measurement: no layer pass, no probes; the same allocation a
    # fresh fit at that budget would make, from the same numbers
    import modelpress.fit.search
    from modelpress.fit.allocate import allocate
    from modelpress.fit.sensitivity import Sensitivity

    def no_pass(*a, **k):
        raise AssertionError("the sensitivity was measured again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(modelpress.fit.search, "measure_sensitivity", no_pass)
        m.setattr(modelpress.fit.search, "probe_gains", no_pass)
        smaller = int(weights * 0.45)
        assert main(["fit", str(tiny_llama), "--memory", f"{smaller}B", "--weights-only", "-o", str(tmp_path / "fit2"),
                     *args, "--uniform", "1", "--sensitivity-from", str(out)]) == 0
    second = json.loads((tmp_path / "fit2" / "fit.json").read_text())
    assert second["sensitivity"]["reused_from"] == str(out)
    rows = {c["name"]: c for c in second["candidates"]}
    assert rows["mixed"]["mix"] == Counter(allocate(Sensitivity.load(out / "sensitivity.json"), smaller, "kl").values())
    assert "measured_in" not in rows["mixed"]  # a new allocation: built and measured
    before = {c["name"]: c for c in record["candidates"]}
    for name, row in rows.items():  # a candidate the first fit measured is taken from it, not run again
        if name in before and name != "mixed":
            assert row["measured_in"] == str(out) and row["kl"] == before[name]["kl"]
    assert any("measured_in" in r for r in rows.values()), "expected the uniform candidate of the first fit again"
    assert second["check"]["written_tensor_bytes"] <= smaller
    assert (tmp_path / "fit2" / "model" / "config.json").is_file()


def test_a_reused_sensitivity_must_match_the_fit_and_be_probed(tiny_llama, tmp_path):
    """--sensitivity-from: measured under other settings, unprobed or missing is one UserError naming
    what differs; a matching one is taken as it is."""
    from modelpress.fit.search import reuse_sensitivity
    from modelpress.fit.sensitivity import LinearSensitivity, Sensitivity, calibration_key
    from modelpress.pipeline.recipe import CalibrationConfig

    calib = CalibrationConfig(text=str(austen("emma.txt")), samples=8, seq_len=64)
    linear = LinearSensitivity(0, "a", 64, 4096, 1.0, {"int4": 0.1, "keep": 0.0}, {"int4": 2048, "keep": 16384})
    sens = Sensitivity(str(tiny_llama), "gptq", ["int4", "keep"], {"a": linear}, fixed_bytes=10,
                       probes={"a": {"int4": {"kl": 0.01, "error": 0.1}}}, calibration=calibration_key(calib))
    sens.save(tmp_path / "sensitivity.json")
    assert reuse_sensitivity(tmp_path, str(tiny_llama), ["int4", "keep"], "gptq", calib) == sens
    again = calib.model_copy(update={"batch_size": 2})  # the batch size changes no measured error
    assert reuse_sensitivity(tmp_path / "sensitivity.json", str(tiny_llama), ["int4", "keep"], "gptq", again) == sens
    for args, said in [((str(tmp_path), ["int4", "keep"], "gptq", calib), "model"),
                       ((str(tiny_llama), ["int8", "keep"], "gptq", calib), "candidates int4,keep"),
                       ((str(tiny_llama), ["int4", "keep"], "rtn", calib), "--sensitivity gptq"),
                       ((str(tiny_llama), ["int4", "keep"], "gptq", calib.model_copy(update={"samples": 16})),
                        "calibration 8 x 64 tokens")]:
        with pytest.raises(UserError, match=said):
            reuse_sensitivity(tmp_path, *args)
    sens.probes = {}
    sens.save(tmp_path / "sensitivity.json")
    with pytest.raises(UserError, match="before the KL probes"):
        reuse_sensitivity(tmp_path, str(tiny_llama), ["int4", "keep"], "gptq", calib)
    (tmp_path / "sensitivity.json").write_text("{")
    with pytest.raises(UserError, match="not a fit sensitivity file"):
        reuse_sensitivity(tmp_path, str(tiny_llama), ["int4", "keep"], "gptq", calib)
    with pytest.raises(UserError, match="no sensitivity.json"):
        reuse_sensitivity(tmp_path / "elsewhere", str(tiny_llama), ["int4", "keep"], "gptq", calib)


def test_the_fit_page_shows_budget_candidates_sensitivity_and_allocation(tmp_path):
    """The report of a fit, from plain data: every chart inline, nothing fetched from elsewhere."""
    import random
    from dataclasses import asdict

    from test_allocate import _random

    from modelpress.fit.allocate import allocate

    sens = _random(random.Random(3), 12)
    for group, names in sens.groups().items():
        sens.probes[group] = {"int2": {"kl": 0.1, "error": 3.0}}
        if all("int3" in sens.linears[n].nbytes for n in names):
            sens.probes[group]["int3"] = {"kl": 0.01 * len(names), "error": 1.0}
    choice = allocate(sens, (sens.bytes_of({n: "int2" for n in sens.linears}) + sens.bytes_of({n: "int8" for n in sens.linears})) / 2)
    budget = {"device": "RTX 4090 24GB", "memory": 24e9, "reserve": 2.4e9, "kv_cache": 1e9, "activations": 0.1e9,
              "weights": 20.5e9, "context": 4096, "batch": 1, "kv_dtype": "fp16", "weights_only": False}
    record = {"command": "fit", "model": "m", "engine": "vllm", "budget": budget, "winner": "mixed", "formats": choice,
              "candidates": [{"name": "mixed", "kind": "mixed", "bytes": 1e9, "mix": {"int4": 3}, "predicted_kl": 0.1,
                              "ppl": 30.0, "kl": 0.2, "top1_agreement": 0.8},
                             {"name": "int4", "kind": "uniform", "bytes": 1.1e9, "mix": {"int4": 3}, "predicted_kl": 0.2,
                              "ppl": 31.0, "kl": 0.25, "top1_agreement": 0.79}]}
    run = tmp_path / "fit"
    run.mkdir()
    (run / "fit.json").write_text(json.dumps(record))
    (run / "sensitivity.json").write_text(json.dumps(asdict(sens)))
    assert main(["report", str(run), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    for chart in ("budget", "sensitivity", "allocation"):
        assert f"data-chart='{chart}'" in page
    assert page.count("<svg") == 3 and "winner" in page and "RTX 4090 24GB" in page
    assert not re.search(r"(src|href)=['\"]https?:", page) and "<script" not in page  # opens offline


def test_a_large_fp16_kv_cache_adds_a_candidate_with_the_cache_in_fp8():
    """Halving a KV cache that takes a fifth of the budget frees bytes for the weights: a second
    mixed candidate, allocated under the larger budget and measured with the cache in fp8."""
    import random

    from test_allocate import _random

    from modelpress.fit.allocate import smallest_bytes
    from modelpress.fit.search import Budget, candidates, kv_candidate, recipe_data
    from modelpress.pipeline.recipe import GPTQConfig

    sens = _random(random.Random(4), 16)
    for group, names in sens.groups().items():
        sens.probes[group] = {"int2": {"kl": 0.1, "error": 1.0}}
    weights = smallest_bytes(sens) * 1.3
    budget = Budget("dev", 10 * weights, weights, 0.2 * weights, 0.0, weights, 4096, 1, "fp16")
    pool = candidates(sens, budget.weights)
    kv = kv_candidate(sens, budget, pool)
    assert kv is not None and kv.kv_dtype == "fp8" and kv.weights_budget == pytest.approx(1.1 * weights)
    assert weights < kv.nbytes <= kv.weights_budget and kv.predicted_kl < pool[0].predicted_kl
    layers = {s.layer for s in sens.linears.values()}  # and the k_scale / v_scale (float32) each layer carries
    assert kv.nbytes == sens.bytes_of(kv.formats) + 8 * len(layers)
    stages = recipe_data("m", kv, GPTQConfig(), {})["stages"]
    assert stages[-1] == {"kv-cache": {"dtype": "fp8"}} and "quantize" in stages[0]
    from dataclasses import replace

    assert kv_candidate(sens, replace(budget, kv_cache=0.01 * weights), pool) is None  # too small to matter
    assert kv_candidate(sens, replace(budget, weights_only=True), pool) is None
    assert kv_candidate(sens, replace(budget, kv_dtype="fp8"), pool) is None


def test_gguf_bytes_of_llama_cpp_mixes_are_the_files_bytes(tiny_llama, tmp_path):
    """For llama.cpp, a Linear's bytes in a block type plus the base type's other tensors add up
    to the tensor bytes of the GGUF file export writes, for each of llama.cpp's own mixes."""
    from modelpress.export.gguf import export_gguf
    from modelpress.fit import gguf as fit_gguf
    from modelpress.fit.sensitivity import measure_embeddings, measure_sensitivity
    from modelpress.pipeline.recipe import CalibrationConfig, GPTQConfig

    config = GPTQConfig(calibration=CalibrationConfig(text=str(austen("emma.txt")), samples=4, seq_len=48))
    sens = measure_sensitivity(str(tiny_llama), list(fit_gguf.CANDIDATES), config, "rtn", fused=False)
    measure_embeddings(sens, config, windows=1)  # the embedding and output head as choices too
    for ftype in ("q4_k_m", "q8_0", "q3_k_m"):
        sens.fixed_bytes = fit_gguf.fixed_bytes(str(tiny_llama), ftype, set(sens.linears))
        choice = fit_gguf.mix_choice(str(tiny_llama), ftype, sens.linears)
        export_gguf(str(tiny_llama), str(tmp_path / f"{ftype}.gguf"), ftype)
        assert sens.bytes_of(choice) == fit_gguf.tensor_bytes(tmp_path / f"{ftype}.gguf"), ftype


@pytest.mark.slow
def test_fit_for_llama_cpp_writes_a_gguf_with_a_type_per_tensor(tiny_llama, tmp_path):
    """--engine llama.cpp between q5_0 and q8_0 sizes: a GGUF whose Linears carry the winner's
    types (more than one), within the budget by its tensor bytes, that llama.cpp loads and runs."""
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader

    from modelpress.export.gguf import GGUFLayout
    from modelpress.fit import gguf as fit_gguf
    from modelpress.models import loading

    layout = GGUFLayout(loading.load_config(loading.resolve(str(tiny_llama))), "q4_k_m")
    linears = {e.name: e for e in layout.entries if ".layers." in e.name and len(e.shape) == 2}
    numel = sum(math.prod(e.shape) for e in linears.values())
    fixed = sum(e.nbytes for e in layout.entries if e.name not in linears)
    budget = int(fixed + numel * (5.5 + 8.5) / 2 / 8)
    out = tmp_path / "fit"
    assert main(["fit", str(tiny_llama), "--memory", f"{budget}B", "--weights-only", "--engine", "llama.cpp",
                 "--formats", "q8_0,q5_0,q4_0", "-o", str(out), "--calib", str(austen("emma.txt")),
                 "--calib-samples", "8", "--calib-seq-len", "64", "--text", str(austen("pride_and_prejudice.txt")),
                 "--windows", "2"]) == 0
    record = json.loads((out / "fit.json").read_text())
    winner = next(c for c in record["candidates"] if c["name"] == record["winner"])
    gguf_file = out / "model.gguf"
    assert fit_gguf.tensor_bytes(gguf_file) == record["check"]["written_tensor_bytes"] == winner["bytes"] <= budget
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(gguf_file).tensors}
    floats = fit_gguf.float_types(str(tiny_llama))
    gguf_names = {e.name.removesuffix(".weight"): e.gguf_name for e in layout.entries}
    # every decoder Linear, the embedding and the (untied) output head carry the record's type
    assert {"model.embed_tokens", "lm_head"} <= set(record["formats"])
    for m, t in record["formats"].items():
        assert types[gguf_names[m]] == (floats[m] if t == "keep" else t), m
    assert len({types[gguf_names[m]] for m in record["formats"]}) > 1 or winner["kind"] == "uniform"
    if winner["kind"] == "mixed":
        assert "mixed" in [c["name"] for c in record["candidates"]]
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(b"Emma Woodhouse, handsome, clever")
    llm.eval(tokens)
    logits = np.array(llm.scores[len(tokens) - 1])
    assert np.isfinite(logits).all() and logits.std() > 0
