"""GPTQ on the real small models: the paper's central claim, a real kill-and-resume, plain loading."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from conftest import austen, checkpoint_tensors, plain_transformers_ppl

from modelpress.compress import GPTQConfig, RTNConfig, compress

pytestmark = pytest.mark.slow
WINDOWS = 4  # RTN int3 on Gemma is far off; 4 windows separate the methods

CALIB_SAMPLES = 16  # calib-128x512 is for benchmarks; 16 windows show the effect in CI time


def _ppl(path, eval_text) -> float:
    return plain_transformers_ppl(path, eval_text, WINDOWS)


def test_gptq_int3_is_far_better_than_rtn_int3_on_gemma(gemma3, eval_text, tmp_path):
    calib = {"text": str(austen("emma.txt")), "samples": CALIB_SAMPLES, "seq_len": 512}
    record = compress(str(gemma3), GPTQConfig(bits=3, group_size=128, calibration=calib), str(tmp_path / "gptq"))
    # RTN int3 on Gemma is the broken baseline GPTQ is measured against: the guard would refuse it
    compress(str(gemma3), RTNConfig(bits=3, group_size=128), str(tmp_path / "rtn"), quality_guard=False)
    float_ppl = _ppl(gemma3, eval_text)
    gptq_ppl, rtn_ppl = _ppl(tmp_path / "gptq", eval_text), _ppl(tmp_path / "rtn", eval_text)
    # the excess perplexity over float at least halves
    assert gptq_ppl - float_ppl < 0.5 * (rtn_ppl - float_ppl), (float_ppl, gptq_ppl, rtn_ppl)
    assert record["calibration"]["windows"] == CALIB_SAMPLES



def test_killed_run_resumes_to_the_same_checkpoint(smollm2, tmp_path):
    args = ["compress", str(smollm2), "--method", "gptq", "--bits", "4", "--group-size", "64",
            "--calib", str(austen("emma.txt")), "--calib-samples", "4", "--calib-seq-len", "256"]
    straight = tmp_path / "straight"
    assert subprocess.run([sys.executable, "-m", "modelpress", *args, "-o", str(straight)],
                          capture_output=True).returncode == 0
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", *args, "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("layer ") and int(line.split()[1].split("/")[0]) >= 3:
            break
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: the state on disk is all there is
    proc.wait(timeout=60)
    assert not out.exists() and (tmp_path / "resumed.partial").is_dir()
    resumed = subprocess.run([sys.executable, "-m", "modelpress", *args, "-o", str(out), "--resume", "--json"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads(resumed.stdout)["record"]
    assert record["resumed_at_layer"] >= 3
    a, b = checkpoint_tensors(straight), checkpoint_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isclose(record["quantized"]["bits_per_weight"], 4.25)
