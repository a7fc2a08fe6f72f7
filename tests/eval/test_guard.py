"""The quality guard refuses an output whose perplexity exploded, and passes a sound one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import austen
from safetensors.torch import load_file, save_file

from modelpress.compress import RTNConfig, compress
from modelpress.errors import UserError
from modelpress.eval.guard import MAX_RATIO, check_output
from modelpress.models import loading


def test_a_sound_output_passes_and_its_numbers_are_recorded(tiny_llama, tmp_path):
    out = tmp_path / "int8"
    record = compress(str(tiny_llama), RTNConfig(bits=8, granularity="channel", group_size=None), str(out))
    guard = record["quality_guard"]
    assert guard["output_ppl"] == pytest.approx(guard["source_ppl"], rel=0.02)
    assert json.loads((out / "modelpress.json").read_text())["quality_guard"] == guard


def test_an_exploded_output_is_refused_and_renamed(tiny_llama, tmp_path):
    broken = tmp_path / "out"
    shutil.copytree(tiny_llama, broken)
    state = load_file(broken / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] * 1000  # confidently wrong next-token guesses
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    text = austen("emma.txt").read_text()[:20000]
    with pytest.raises(UserError, match=f"limit {MAX_RATIO:g}x"):
        check_output(loading.resolve(tiny_llama), str(broken), text, n_params=1000)
    assert not broken.exists() and (tmp_path / "out.rejected" / "config.json").exists()


def test_no_quality_guard_skips_it(tiny_llama, tmp_path):
    record = compress(str(tiny_llama), RTNConfig(group_size=32), str(tmp_path / "q"), quality_guard=False)
    assert "quality_guard" not in record
    assert torch.isfinite(torch.tensor(record["quantized"]["mean_sqnr_db"]))
