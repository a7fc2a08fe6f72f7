"""Healing a real model: SmolLM2-135M with two layers dropped, a short logit distillation from
its original, and the result still loads in plain transformers and in llama.cpp."""

from __future__ import annotations

import json

import pytest

from conftest import austen

pytestmark = pytest.mark.slow


def test_heal_of_a_structurally_pruned_real_model_lowers_its_held_out_perplexity(smollm2, eval_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelpress.cli import main

    pruned, healed = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", str(smollm2), "--method", "structured", "--drop-layers", "2", "--calib",
                 str(austen("emma.txt")), "--calib-samples", "8", "--calib-seq-len", "256", "-o", str(pruned),
                 "--no-quality-guard"]) == 0
    assert main(["heal", str(pruned), "--teacher", str(smollm2), "--data", str(austen("mansfield_park.txt")),
                 "--steps", "12", "--seq-len", "256", "--batch-size", "2", "--lr", "1e-4", "--eval-text",
                 str(austen("persuasion.txt")), "--eval-windows", "4", "--eval-every", "4", "-o", str(healed)]) == 0
    record = json.loads((healed / "modelpress.json").read_text())
    held_out = record["held_out"]
    # held-out text the training never saw: the soft targets close part of the gap within 12 steps
    assert held_out["best_ppl"] < 0.95 * held_out["start_ppl"], held_out
    assert record["steps"]["done"] == 12 and record["teacher"] == str(smollm2)
    config = json.loads((healed / "config.json").read_text())
    assert config["num_hidden_layers"] == 28  # the student's own shape
    AutoModelForCausalLM.from_pretrained(healed)
    assert main(["export", str(healed), "--to", "gguf", "--format", "f16", "-o", str(tmp_path / "h.gguf"),
                 "--verify", "--text", str(eval_text), "--windows", "2"]) == 0  # llama.cpp within 1% of ours
