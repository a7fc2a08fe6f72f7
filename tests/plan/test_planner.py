"""The planner reproduces the seed arithmetic and counts real configs exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modelpress.cli import main
from modelpress.cli.plan import load_shape
from modelpress.errors import UserError
from modelpress.models.shape import shape_from_config
from modelpress.plan.formats import plan_format
from modelpress.plan.hardware import find_hardware
from modelpress.plan.memory import ModelShape, fit, kv_cache_bytes, parse_size, weight_bytes
from modelpress.plan.roofline import decode_roofline

SEED_GB = {"fp32": 280, "fp16": 140, "int8": 70, "int4": 35}
SEED_GIB = {"fp32": 260.8, "fp16": 130.4, "int8": 65.2, "int4": 32.6}


def _plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_arithmetic_70b_on_h100(capsys):
    plan = _plan_json(capsys, "70B", "--hardware", "H100")
    rows = {r["name"]: r for r in plan["formats"]}
    for name, gb in SEED_GB.items():
        assert rows[name]["weight_bytes"] == pytest.approx(gb * 1e9)
        assert round(rows[name]["weight_gib"], 1) == SEED_GIB[name]
    assert rows["int4"]["decode_tokens_per_s"] == pytest.approx(95.7, abs=0.05)
    assert rows["fp16"]["decode_tokens_per_s"] == pytest.approx(23.9, abs=0.05)
    assert rows["int4-g128"]["bits_per_weight"] == 4.125
    assert plan["hardware"]["bandwidth_bytes_per_s"] == 3.35e12
    fits = {h["short"]: h["fits"] for h in plan["hardware_fit"]}
    assert fits["h100"]["int4"] and not fits["h100"]["fp16"]  # 35 GB fits 80 GB, 140 GB does not
    assert rows["fp16"]["devices_needed"]["H100 SXM 80GB"] == 2


def test_7b_fp16_batch1_is_memory_bound_on_a100():
    a100 = find_hardware("A100")
    assert (a100.peak_flops("fp16"), a100.bandwidth) == (312e12, 2.039e12)
    r = decode_roofline(ModelShape.from_param_count(7e9), plan_format("fp16"), a100)
    assert r.intensity == pytest.approx(1.0)
    assert r.bound == "memory" and r.ridge == pytest.approx(153, abs=1)
    # a large enough batch crosses the ridge: intensity grows with batch while weights are read once
    big = decode_roofline(ModelShape.from_param_count(7e9), plan_format("fp16"), a100, batch=r.batch_to_compute_bound)
    assert big.bound == "compute"


def test_group_scale_overhead():
    assert plan_format("int4-g128").bits == 4.125  # 4 + 16/128
    assert plan_format("int4-g64-asym").bits == 4 + (16 + 8) / 64
    assert plan_format("q4_k").bits == 4.5 and plan_format("q8_0").bits == 8.5
    per_channel = plan_format("int8")
    assert per_channel.bits_for(4096) == 8 + 16 / 4096


def test_parse_size_and_errors():
    assert parse_size("70B") == 70e9 and parse_size("135m") == 135e6 and parse_size("1.5b") == 1.5e9
    assert parse_size("config.json") is None
    with pytest.raises(UserError, match="not in the catalogue"):
        find_hardware("TPU v9")
    with pytest.raises(UserError, match="unknown format"):
        plan_format("banana4")


def test_fit_needs_more_devices_when_too_big():
    assert fit(35e9, 80e9).fits
    assert fit(140e9, 80e9).devices == 2  # 72 GB usable per device after the 10% reserve
    assert fit(73e9, 80e9).devices == 2


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2", "opt"])
def test_shape_counts_parameters_exactly(tiny_models, model_type):
    config = AutoConfig.from_pretrained(tiny_models[model_type])
    shape = shape_from_config(config, model_type)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[model_type])
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert shape.total_params == sum(unique.values())
    head = model.get_output_embeddings()
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    assert sum(shape.linear_params.values()) == linears
    fp16 = weight_bytes(shape, plan_format("fp16"))
    assert fp16 == 2 * shape.total_params


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_kv_cache_matches_transformers_cache(tiny_models, model_type):
    """Bytes from the formula equal the bytes of the cache transformers fills, windows included."""
    path = tiny_models[model_type]
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    context = 2 * (getattr(config, "sliding_window", None) or 64) + 5  # longer than the window: sliding layers stop growing
    ids = torch.randint(3, config.vocab_size, (2, context))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    actual = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
    shape = shape_from_config(config, "tiny")
    # transformers keeps window - 1 past tokens in a sliding layer, engines keep the window: 1% apart
    assert kv_cache_bytes(shape, context, batch=2, kv_dtype="fp16") == pytest.approx(actual, rel=0.02)
    assert any(w for _, _, w in shape.attention) == (model_type == "gemma3_text")


def test_moe_counts_active_parameters():
    config = AutoConfig.for_model(
        "mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=256,
    )
    shape = shape_from_config(config, "tiny-moe")
    expert = 2 * 8 * 3 * 64 * 128  # layers x experts x (gate, up, down) x d x ff
    assert shape.total_params - shape.params_per_token == expert - expert * 2 // 8


def test_plan_reads_a_config_file(tiny_models, capsys):
    plan = _plan_json(capsys, str(tiny_models["llama"] / "config.json"), "--formats", "fp16,int4-g32",
                      "--context", "128", "--batch", "3")
    assert plan["kv_cache_bytes"] > 0 and plan["batch"] == 3
    assert [r["name"] for r in plan["formats"]] == ["fp16", "int4-g32"]
    assert load_shape(str(tiny_models["llama"])).total_params == plan["model"]["params"]


@pytest.mark.parametrize("argv, message", [
    (["plan", "70B", "--hardware", "nonesuch"], "not in the catalogue"),
    (["plan", "no/such/path"], "not found"),
    (["plan", "70B", "--formats", "int9"], "bits must be"),
    (["plan"], "name a model"),
])
def test_plan_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_human_table_renders(capsys):
    assert main(["plan", "70B", "--hardware", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "95.7" not in out  # the 4090's 1 TB/s gives ~28.8 tok/s for 35 GB, not the H100's number
    assert "28.8" in out and "int4-g128" in out
