"""Decode speed beside this machine's measured ceiling: the bytes a step reads, counted right."""

from __future__ import annotations

import json

import pytest
from conftest import checkpoint_tensors

from modelpress.cli import main
from modelpress.eval.speed import decode_speed, gguf_bytes_per_token, with_ceiling
from modelpress.plan.hardware import find_hardware
from modelpress.plan.local import LOCAL_NAME


def test_local_hardware_is_measured_and_plausible():
    hw = find_hardware("local")
    assert hw.name == LOCAL_NAME and find_hardware("LOCAL") == hw  # measured once per process
    assert 1e9 < hw.bandwidth < 5e12  # between a slow laptop and an HBM accelerator
    assert 1e9 < hw.peak_flops() < 1e15
    assert hw.memory > 1e9


def test_transformers_speed_counts_every_weight_but_the_untied_embedding(tiny_llama):
    speed = with_ceiling(decode_speed(str(tiny_llama), n_tokens=8))
    tensors = checkpoint_tensors(tiny_llama)  # float32, untied head
    weights = sum(t.numel() * 4 for t in tensors.values()) - tensors["model.embed_tokens.weight"].numel() * 4
    assert speed["engine"] == "transformers" and speed["bytes_per_token"] == weights
    assert speed["decode_tok_s"] > 0 and speed["ceiling_tok_s"] == pytest.approx(speed["bandwidth"] / weights)
    assert speed["fraction"] == pytest.approx(speed["decode_tok_s"] / speed["ceiling_tok_s"])


def test_llama_cpp_speed_of_a_gguf_file(tiny_llama, eval_text, tmp_path, capsys):
    from gguf import GGUFReader

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_llama), "--to", "gguf", "--format", "q8_0", "-o", str(out)]) == 0
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(out)).tensors}
    assert gguf_bytes_per_token(out) == sum(sizes.values()) - sizes["token_embd.weight"]
    capsys.readouterr()
    assert main(["eval", str(out), "--speed", "--text", str(eval_text), "--windows", "1", "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)["speed"]
    assert speed["engine"] == "llama.cpp" and speed["decode_tok_s"] > 0 and 0 < speed["fraction"]
