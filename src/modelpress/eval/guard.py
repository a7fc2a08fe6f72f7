"""The quality guard: a written model whose perplexity exploded is refused, not shipped.

After a verb writes its output, the output (loaded by plain transformers, as a user would load
it) and the source are scored on a few windows of the calibration text. NaN, or more than
:data:`MAX_RATIO` times the source's perplexity, means the model is broken (a bad format for
this architecture, overflow, a corrupt source), whatever the per-layer errors said: the output
is renamed ``OUT.rejected`` (kept for inspection, never looking finished) and the run fails with
both numbers. A whole-model check on purpose: it is the one that sees what the engine will see.

The check loads each model whole, so it is skipped (with a warning) when the float model would
take more than half of this machine's memory; ``--no-quality-guard`` skips it always.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.data import WindowProtocol, builtin_text, read_calibration, token_windows
from modelpress.errors import UserError
from modelpress.models import loading
from modelpress.models.loading import meta_model
from modelpress.record import to_json

logger = logging.getLogger("modelpress")

MAX_RATIO = 10.0  # a compressed model this much worse than its source is broken, not lossy
PROTOCOL = WindowProtocol("guard", seq_len=128, n_windows=2)


@dataclass(frozen=True)
class GuardResult:
    """Plain data for the run record."""

    source_ppl: float
    output_ppl: float
    windows: int
    seq_len: int

    @property
    def ratio(self) -> float:
        return self.output_ppl / self.source_ppl


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _ppl(source: loading.ModelSource, ids: torch.Tensor) -> float:
    from modelpress.eval.perplexity import evaluate

    model = loading.load_model(source)
    try:
        return evaluate(model, ids).ppl
    finally:
        del model


def check_output(source: loading.ModelSource, out_dir: str, text: str, n_params: int) -> GuardResult | None:
    """Score ``out_dir`` against ``source`` on ``text``; refuse an exploded output.

    Args:
        source: the model that was compressed.
        out_dir: the finished output folder.
        text: text to score on (the calibration text: no held-out data is needed to see an explosion).
        n_params: parameters of the model, to skip the check where it cannot fit in memory.

    Returns:
        The two perplexities, or ``None`` when the check was skipped.

    Raises:
        UserError: the output's perplexity is NaN or over ``MAX_RATIO`` times the source's; the
            output has been renamed ``OUT.rejected``.
    """
    memory = _physical_memory()
    if memory is not None and 4 * n_params > memory / 2:  # float32, one model at a time
        logger.warning("quality guard skipped: the model needs more memory than this machine has to load whole")
        return None
    ids = token_windows(loading.load_tokenizer(source), text, PROTOCOL)
    result = GuardResult(_ppl(source, ids), _ppl(loading.resolve(out_dir), ids), len(ids), PROTOCOL.seq_len)
    logger.info("quality guard: ppl %.3f -> %.3f on %d x %d calibration tokens", result.source_ppl,
                result.output_ppl, result.windows, result.seq_len)
    if math.isfinite(result.output_ppl) and result.output_ppl <= MAX_RATIO * result.source_ppl:
        return result
    rejected = Path(out_dir).with_name(Path(out_dir).name + ".rejected")
    if rejected.exists():
        import shutil

        shutil.rmtree(rejected)
    Path(out_dir).rename(rejected)
    raise UserError(
        f"the compressed model is broken: perplexity {result.output_ppl:.4g} against the source's "
        f"{result.source_ppl:.4g} on {result.windows} x {result.seq_len} calibration tokens (limit "
        f"{MAX_RATIO:g}x); kept for inspection as {rejected}, not as {out_dir}. Try more bits, another "
        "format or method; --no-quality-guard writes it anyway"
    )


def guard_output(model: str, calibration, out_dir: str) -> dict | None:
    """Run :func:`check_output` on a finished output and add its numbers to the output's record.

    Args:
        model: the source model.
        calibration: the run's :class:`~modelpress.pipeline.recipe.CalibrationConfig` (its text is
            scored), or ``None`` for the built-in text.
        out_dir: the finished output folder (with its ``modelpress.json``).

    Returns:
        ``{"source_ppl", "output_ppl", "windows", "seq_len"}``, or ``None`` when skipped.
    """
    source = loading.resolve(model)
    text = builtin_text() if calibration is None or calibration.text is None else \
        read_calibration(calibration.text, calibration.text_field)
    n_params = sum(p.numel() for p in meta_model(loading.load_config(source)).parameters())
    result = check_output(source, out_dir, text, n_params)
    if result is None:
        return None
    summary = {"source_ppl": result.source_ppl, "output_ppl": result.output_ppl,
               "windows": result.windows, "seq_len": result.seq_len}
    path = Path(out_dir) / "modelpress.json"  # the record in the checkpoint gets the guard's numbers
    record = json.loads(path.read_text())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json({**record, "quality_guard": summary}, indent=2))
    tmp.replace(path)
    return summary
