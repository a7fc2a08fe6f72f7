"""The W8A8 options of ``compress`` and what ``eval`` does with a W8A8 checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import austen

from modelpress.cli import main
from modelpress.eval.compare import measure


def _fails(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err


def test_compress_smoothquant_then_eval_includes_activation_rounding(tiny_llama, tmp_path, eval_text, capsys):
    out = tmp_path / "sq"
    argv = ["compress", str(tiny_llama), "--method", "smoothquant", "--alpha", "0.6", "--activations", "static",
            "--calib", str(austen("emma.txt")), "--calib-samples", "4", "--calib-seq-len", "64",
            "-o", str(out), "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)["record"]
    assert record["config"]["alpha"] == 0.6 and record["config"]["activations"] == "static"
    assert record["config"]["bits"] == 8 and record["config"]["granularity"] == "channel"
    assert {layer["activations"] for layer in record["layers"].values()} == {"int8-static"}
    result = measure(str(out), str(eval_text), windows=1, baseline=str(tiny_llama))
    assert result["activations"] == "int8-static"
    assert result["kl"] > 0
    kv = measure(str(out), str(eval_text), windows=1, kv_cache="int8")
    assert kv["kv_cache"] == "int8" and kv["ppl"] != result["ppl"]


def test_rtn_w8a8_from_the_command_line(tiny_llama, tmp_path, capsys):
    argv = ["compress", str(tiny_llama), "--bits", "8", "--granularity", "channel", "--activations", "int8-dynamic",
            "-o", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "with int8-dynamic inputs" in capsys.readouterr().out
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True


@pytest.mark.parametrize("extra, message", [
    (["--activations", "static"], "static activation scales need calibration data"),
    (["--activations", "dynamic"], "int8 symmetric per-channel or per-tensor weights"),  # default int4-g128
    (["--method", "gptq", "--bits", "8", "--granularity", "channel", "--activations", "dynamic"],
     "--activations applies to --method rtn (dynamic) and smoothquant, not gptq"),
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha"),
    (["--method", "smoothquant", "--bits", "4"], "int8 symmetric per-channel or per-tensor weights"),
])
def test_w8a8_option_errors(tiny_llama, tmp_path, capsys, extra, message):
    _fails(capsys, ["compress", str(tiny_llama), *extra, "-o", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists()
