"""AWQ on a real model: activation-aware scales and clipping recover most of what rounding loses."""

from __future__ import annotations

import pytest
from conftest import austen, plain_transformers_ppl

from modelpress.compress import AWQConfig, RTNConfig, compress

pytestmark = pytest.mark.slow
WINDOWS = 8
def _calib():
    return {"text": str(austen("emma.txt")), "samples": 8, "seq_len": 512}


def test_awq_int3_recovers_most_of_rtn_int3_loss(smollm2, eval_text, tmp_path):
    # int3 with groups of 64: far off the Q4_1 (groups of 32) grid SmolLM2's float weights came from.
    # A 10-point grid (the default is 20) and 8 windows keep it in CI time; the claim holds on them.
    fmt = {"bits": 3, "group_size": 64, "symmetric": False}
    record = compress(str(smollm2), AWQConfig(**fmt, n_grid=10, calibration=_calib()), str(tmp_path / "awq"))
    compress(str(smollm2), RTNConfig(**fmt), str(tmp_path / "rtn"))

    def ppl(path):  # plain transformers loads the compressed-tensors checkpoint
        return plain_transformers_ppl(path, eval_text, WINDOWS)

    float_ppl, awq_ppl, rtn_ppl = ppl(smollm2), ppl(tmp_path / "awq"), ppl(tmp_path / "rtn")
    # the excess perplexity over float at least halves
    assert awq_ppl - float_ppl < 0.5 * (rtn_ppl - float_ppl), (float_ppl, awq_ppl, rtn_ppl)
    gains = [info["awq_loss_gain"] for name, info in record["layers"].items() if name.endswith("q_proj")]
    assert len(gains) == 30 and sum(g > 0 for g in gains) > len(gains) / 2  # scaling helped most layers
