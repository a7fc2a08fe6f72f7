"""``eval --engine vllm`` without a usable vLLM, and the worker's pure parts (no vLLM needed).

The runs in vLLM itself are in tests/integration/test_vllm.py (slow, vLLM's own venv).
"""

from __future__ import annotations

import pytest

from modelpress.cli import main
from modelpress.eval.vllm import ENV_VAR, nll, scheme_summary


def test_missing_vllm_python_is_one_line(tiny_llama, tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 200)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-python"))
    assert main(["eval", str(tiny_llama), "--engine", "vllm", "--text", str(text), "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "MODELPRESS_VLLM_PYTHON" in err and "setup_vllm.sh" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--kv-cache", "int8"], ["--speed"]])
def test_options_vllm_does_not_take_are_refused(tiny_llama, tmp_path, extra, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 200)
    assert main(["eval", str(tiny_llama), "--engine", "vllm", "--text", str(text), *extra]) == 2
    assert "--engine vllm takes neither" in capsys.readouterr().err


def test_nll_and_scheme_summary_of_a_worker_result():
    result = {"prompt_logprobs": [[-1.0, -2.0], [-0.5]],
              "schemes": {"a.qkv_proj": ["CompressedTensorsWNA16", "CPUWNA16LinearKernel"],
                          "a.o_proj": ["CompressedTensorsWNA16", "CPUWNA16LinearKernel"],
                          "b.qkv_proj": ["UnquantizedLinearMethod", None]}}
    assert nll(result) == (3.5, 3)
    assert scheme_summary(result["schemes"]) == {"CompressedTensorsWNA16 / CPUWNA16LinearKernel": 2,
                                                 "UnquantizedLinearMethod": 1}
