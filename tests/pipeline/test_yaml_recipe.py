"""YAML recipes: typos and impossible orders are refused before any work, naming the stage."""

import pytest
import yaml

from modelpress.errors import UserError
from modelpress.pipeline.yaml_recipe import load_recipe, parse_recipe

GOOD = {
    "model": "some/model",
    "calibration": {"text": "calib.txt", "samples": 8, "seq_len": 64},
    "stages": [
        {"prune": {"method": "wanda", "sparsity": 0.5}},
        {"heal": {"steps": 10}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}},
    ],
    "evaluate": {"text": "eval.txt", "windows": 4},
}


def recipe(*stages, **top):
    return {**GOOD, "stages": list(stages), **top}


def refused(data) -> str:
    with pytest.raises(UserError) as e:
        parse_recipe(data)
    return str(e.value)


def test_a_good_recipe_is_typed_and_shares_its_calibration():
    r = parse_recipe(GOOD)
    assert [s.kind for s in r.stages] == ["prune", "heal", "quantize"]
    assert [s.name for s in r.stages] == ["01-prune-wanda", "02-heal", "03-quantize-gptq"]
    assert r.stages[0].config.calibration.samples == 8  # the recipe's calibration reaches every calibrated stage
    assert r.stages[2].config.calibration.text == "calib.txt"
    assert r.stages[1].config.data == ["calib.txt"]  # training text defaults to the calibration text
    assert r.stages[2].title == "quantize gptq int4-g32"


def test_a_stage_can_override_one_calibration_field():
    r = parse_recipe(recipe({"quantize": {"method": "gptq", "calibration": {"samples": 2}}}))
    assert (r.stages[0].config.calibration.samples, r.stages[0].config.calibration.seq_len) == (2, 64)


@pytest.mark.parametrize("stage, expected", [
    ({"quantize": {"method": "gptq", "bitz": 4}}, "stage 1 (quantize): bitz: unknown field, did you mean 'bits'? (the fields are: "),
    ({"quantize": {"method": "gptq", "bits": "four"}}, "stage 1 (quantize): bits:"),
    ({"quantize": {"method": "gptqq"}}, "stage 1 (quantize): method: unknown 'gptqq' (one of awq, gptq, rtn, smoothquant)"),
    ({"prune": {"sparsity": 0.5}}, "stage 1 (prune): method: give one"),
    ({"prune": {"method": "wanda"}}, "stage 1 (prune): pruning needs --sparsity"),
    ({"heal": {"steps": 10, "lrr": 0.1}}, "stage 1 (heal): lrr: unknown field"),
    ({"heal": {"steps": 10, "tokens": 100}}, "stage 1 (heal): give the budget as exactly one of steps or tokens"),
    ({"qat": {"steps": 10}}, "stage 1 (qat): qat: a qat stage trains through a format"),
    ({"distill": {"steps": 10}}, "stage 1 (distill): teacher: a distill stage names its teacher"),
    ({"export": {"to": "gguf", "dtype": "float32"}}, "stage 1 (export): dtype applies to to: hf"),
    ({"kv_cache": {"dtype": "int8"}}, "stage 1: unknown stage kind 'kv_cache'"),
    ({"export": {"to": "compressed-tensors"}}, "stage 1 (export): to: a quantize stage already writes compressed-tensors"),
    ({"prune": {"method": "wanda"}, "heal": {}}, "stage 1: a stage is one kind and its settings"),
])
def test_a_typo_names_the_stage_and_the_field(stage, expected):
    assert expected in refused(recipe(stage))


@pytest.mark.parametrize("stages, expected", [
    ([{"export": {"to": "gguf", "type": "q8_0"}}, {"heal": {"steps": 1}}],
     "stage 2 (heal) comes after the export at stage 1"),
    ([{"quantize": {"method": "rtn"}}, {"quantize": {"method": "gptq"}}], "already quantized at stage 1"),
    ([{"quantize": {"method": "rtn"}}, {"prune": {"method": "sparsegpt", "sparsity": 0.5}}],
     "stage 2 (prune): after quantizing, prune with magnitude or wanda"),
    ([{"quantize": {"method": "rtn", "format": "fp8"}}, {"prune": {"method": "wanda", "sparsity": 0.5}}],
     "fp8 is not one: prune before quantizing"),
    ([{"quantize": {"method": "rtn"}}, {"heal": {"steps": 5}}, {"prune": {"method": "wanda", "sparsity": 0.5}}],
     "the prune stage must come right after a quantize stage (stage 1 is quantize)"),
    ([{"quantize": {"method": "gptq"}}, {"export": {"to": "gguf", "type": "q4_0"}}],
     "a GGUF export quantizes into llama.cpp's block types itself"),
    ([{"qat": {"steps": 5, "qat": "int4-g32"}}, {"quantize": {"method": "rtn"}}], "already quantized at stage 1"),
    ([{"quantize": {"method": "rtn"}}, {"heal": {"steps": 5, "qat": "int4-g32"}}], "drop qat"),
])
def test_an_order_that_cannot_work_is_refused_with_the_reason(stages, expected):
    assert expected in refused(recipe(*stages))


def test_layer_stages_side_by_side_share_one_pass():
    from modelpress.pipeline.yaml_recipe import passes

    def units(*stages, **top):
        return [[s.index for s in unit] for unit in passes(parse_recipe(recipe(*stages, **top)))]

    prune, quantize, heal = GOOD["stages"][0], GOOD["stages"][2], GOOD["stages"][1]
    structured = {"prune": {"method": "structured", "mlp_keep": 0.5}}
    assert units(prune, quantize) == [[1, 2]]
    assert units(prune, quantize, one_pass=False) == [[1], [2]]
    assert units(quantize, prune, one_pass=False) == [[1, 2]]  # pruning codes happens in the quantizer's pass
    assert units(prune, heal, quantize) == [[1], [2], [3]]
    assert units(structured, quantize) == [[1], [2]]  # structured pruning changes shapes: a pass of its own
    assert units(prune, prune, quantize) == [[1], [2, 3]]


def test_top_level_typos_and_missing_parts():
    assert "unknown top-level field 'stagse'" in refused({"model": "m", "stagse": []})
    assert "model: give the model" in refused({"stages": [{"quantize": {"method": "rtn"}}]})
    assert "stages: give a list" in refused({"model": "m", "stages": []})
    assert "evaluate: windowz: unknown field" in refused({**GOOD, "evaluate": {"windowz": 3}})


def test_a_file_that_is_not_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nstages:\n  - quantize: {method: rtn\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d"):
        load_recipe(path)
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(GOOD))
    assert load_recipe(path).model == "some/model"


def test_a_kv_cache_stage_is_typed_and_set_once():
    r = parse_recipe(recipe({"quantize": {"method": "rtn"}}, {"kv-cache": {"dtype": "int8"}}))
    assert r.stages[1].title == "kv cache int8" and r.stages[1].name == "02-kv-cache"
    assert "stage 1 (kv-cache): dtype: Input should be 'int8' or 'fp8'" in refused(recipe({"kv-cache": {"dtype": "int4"}}))
    assert "already set at stage 1" in refused(recipe({"kv-cache": {"dtype": "int8"}}, {"kv-cache": {"dtype": "fp8"}}))


def test_the_seeds_70b_example_is_planned_without_weights():
    from pathlib import Path

    from modelpress.pipeline.run import plan_recipe

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    int8 = plan_recipe(load_recipe(recipes / "seed-70b-int8.yaml"))
    int4 = plan_recipe(load_recipe(recipes / "seed-70b.yaml"))
    params = int8["params"]
    assert 70e9 < params < 71e9
    original, int8_step = int8["steps"]
    assert original["weight_bytes"] == 2 * params and not original["fits"]  # 141 GB of bf16: not on one A100 80GB
    embeddings = 2 * 128256 * 8192 * 2  # token embeddings and lm_head stay 16-bit, as compress leaves them
    assert int8_step["weight_bytes"] == pytest.approx((params * 2 - embeddings) / 2 + embeddings, rel=1e-3)
    _, gptq, kv = int4["steps"]
    assert gptq["format"] == "int4-g128" and gptq["fits"]
    assert gptq["weight_bytes"] == pytest.approx((params * 2 - embeddings) * 4.125 / 16 + embeddings, rel=1e-3)
    assert kv["kv_dtype"] == "int8" and kv["kv_cache_bytes"] == pytest.approx(gptq["kv_cache_bytes"] / 2)
    assert kv["weight_bytes"] == gptq["weight_bytes"] and kv["decode_tok_s"] > gptq["decode_tok_s"]
    assert "need the model's weights" in int4["not_measured"]


def test_a_plan_keeps_the_format_through_a_float_stage():
    from pathlib import Path

    from modelpress.pipeline.run import plan_recipe

    config = Path(__file__).resolve().parents[2] / "recipes" / "seed-70b" / "config.json"
    plan = plan_recipe(parse_recipe({"model": str(config), "calibration": {"text": "calib.txt"},
                                     "stages": [{"heal": {"steps": 10}}, {"quantize": {"method": "gptq", "bits": 4}}]}))
    assert [r["format"] for r in plan["steps"]] == ["bf16", "bf16", "int4-g128"]
    assert plan["steps"][1]["weight_bytes"] == plan["steps"][0]["weight_bytes"]


def test_run_model_replaces_the_recipes_model(capsys):
    """`run --model`: the same recipe on another model (here a bare size, planned)."""
    import json
    from pathlib import Path

    from modelpress.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "seed-70b.yaml"
    assert main(["run", str(recipe), "--model", "8B", "--plan-only", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 7.5e9 < plan["params"] < 8.5e9
    assert load_recipe(recipe, model="8B").model == "8B" and load_recipe(recipe).model != "8B"


def test_a_stage_a_later_heal_fixes_runs_without_the_quality_guard(tmp_path, monkeypatch):
    """Structured pruning before a heal is expected to hurt (Gemma-3 without 4 of 18 layers: 11x the
    calibration perplexity); the guard stops the recipe only where nothing later trains the model."""
    from modelpress.pipeline import run
    from modelpress.pipeline.yaml_recipe import passes

    recipe = parse_recipe({"model": "m", "calibration": {"text": "c.txt"},
                           "stages": [{"prune": {"method": "structured", "drop_layers": 1}},
                                      {"heal": {"tokens": 1000, "data": ["d.txt"]}},
                                      {"quantize": {"method": "gptq", "bits": 8, "granularity": "channel",
                                                    "group_size": None}}]})
    jobs = []
    monkeypatch.setattr(run, "_child", lambda out, name, job, what: (jobs.append(job) or {}, 1.0, 1.0))
    for unit in passes(recipe):
        run._run_stage(tmp_path, unit, unit[0].name, "src", tmp_path / unit[0].name, recipe, "x")
    guard = {job["stages"][0]["kind"]: job["quality_guard"] for job in jobs}
    assert guard["prune"] is False and guard["quantize"] is True  # the quantize after the heal is guarded
