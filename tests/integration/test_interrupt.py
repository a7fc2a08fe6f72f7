"""A real signal to a real compress process: nothing that looks complete is left behind."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_compress_leaves_no_output(smollm2, tmp_path, sig):
    out = tmp_path / "out"
    # MSE scale search makes the run long enough (tens of seconds) to be caught in the middle.
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelpress", "compress", str(smollm2), "--bits", "4", "--group-size", "64",
         "--observer", "mse", "-o", str(out)],
        stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs with SIGINT ignored, children inherit
        # that, and Python then installs no KeyboardInterrupt handler: give the child the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stderr:  # wait until it is really working on tensors
        lines.append(line)
        if line.startswith("tensor "):
            break
    partial = list(tmp_path.glob("out.partial-*"))
    assert len(partial) == 1, lines  # it was mid-write
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []
