"""SmoothQuant W8A8 on a real model: int8 weights and int8 inputs cost little perplexity."""

from __future__ import annotations

import pytest
from conftest import austen

from modelpress.eval.compare import measure
from modelpress.compress import CalibrationConfig, SmoothQuantConfig, compress

pytestmark = pytest.mark.slow
def _calib():
    return CalibrationConfig(text=str(austen("emma.txt")), samples=4, seq_len=256)



def test_smoothquant_w8a8_dynamic_is_within_5_percent_of_float(smollm2, eval_text, tmp_path):
    out = tmp_path / "sq"
    record = compress(str(smollm2), SmoothQuantConfig(activations="dynamic", calibration=_calib()), str(out))
    assert record["quantized"]["layers"] == 30 * 7
    result = measure(str(out), str(eval_text), windows=2, baseline=str(smollm2))  # plain transformers + our A8
    assert result["activations"] == "int8-dynamic"
    assert result["ppl"] != result["baseline_ppl"]
    assert result["ppl"] < 1.05 * result["baseline_ppl"], result
