"""Pruning and quantizing in one layer pass, in either order (``compress(..., prune=...)``)."""

import json

import pytest

from modelpress.compress import compress
from modelpress.data import builtin_text
from modelpress.errors import UserError
from modelpress.export.compressed_tensors import read_quantized
from modelpress.pipeline.recipe import CalibrationConfig, GPTQConfig, RTNConfig, SparseGPTConfig, WandaConfig


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> CalibrationConfig:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(builtin_text())
    return CalibrationConfig(text=str(path), samples=8, seq_len=64)


def stored(folder):
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return read_quantized(folder, config)


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
@pytest.mark.parametrize("prune_after", [False, True])
def test_every_pruned_weight_is_a_zero_code_in_either_order(tiny_llama, calibration, tmp_path, quantizer, prune_after):
    config = GPTQConfig(bits=4, group_size=32, calibration=calibration) if quantizer == "gptq" else \
        RTNConfig(bits=4, group_size=32)
    record = compress(str(tiny_llama), config, str(tmp_path / "out"), quality_guard=False,
                      prune=WandaConfig(pattern="2:4", calibration=calibration), prune_after=prune_after)
    assert record["pruned"]["when"] == ("after quantizing" if prune_after else "before quantizing")
    for name, qt in stored(tmp_path / "out").items():
        zero = (qt.q == 0).reshape(qt.q.shape[0], -1, 4)
        assert (zero.sum(-1) >= 2).all(), name  # 2 of every 4 stored codes are the zero code (more may round to it)
        assert qt.fmt.bits == 4


def test_prune_before_quantize_keeps_the_zeros_it_chose(tiny_llama, calibration, tmp_path):
    record = compress(str(tiny_llama), GPTQConfig(bits=4, group_size=32, calibration=calibration),
                      str(tmp_path / "out"), quality_guard=False,
                      prune=SparseGPTConfig(sparsity=0.5, calibration=calibration))
    assert record["config"]["keep_zeros"] is True
    assert record["pruned"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, qt in stored(tmp_path / "out").items():
        assert (qt.q == 0).float().mean() >= 0.5, name


def test_sparsegpt_after_quantizing_is_refused(tiny_llama, calibration, tmp_path):
    with pytest.raises(UserError, match="off the quantization grid"):
        compress(str(tiny_llama), RTNConfig(bits=4, group_size=32), str(tmp_path / "out"),
                 prune=SparseGPTConfig(sparsity=0.5, calibration=calibration), prune_after=True)
    with pytest.raises(UserError, match="the same Linears"):
        compress(str(tiny_llama), RTNConfig(bits=4, group_size=32), str(tmp_path / "out2"),
                 prune=WandaConfig(sparsity=0.5, calibration=calibration, exclude=["lm_head", "down_proj"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
