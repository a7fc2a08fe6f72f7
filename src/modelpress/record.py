"""The run record: what was done, with which versions, how long it took, and what it cost.

Plain JSON data, written next to the checkpoint as ``modelpress.json``; it feeds reports and
lets two runs be diffed.
"""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata

import modelpress

_PACKAGES = ("torch", "transformers", "compressed-tensors", "safetensors")


def to_json(data, **kwargs) -> str:
    """``data`` as strict JSON, the one writer for every JSON the tool prints or saves.

    Raises:
        ValueError: ``data`` holds NaN or an infinity, which strict JSON parsers refuse; the code
            that produced it must say what such a value means (e.g. ``None`` for an exact SQNR).
    """
    return json.dumps(data, allow_nan=False, **kwargs)


def read_record(folder) -> dict:
    """The run record (``modelpress.json``) of a checkpoint folder modelpress wrote; ``{}`` when
    there is none or it is unreadable (a checkpoint from elsewhere)."""
    from pathlib import Path

    try:
        record = json.loads((Path(folder) / "modelpress.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def mean_finite(values) -> float | None:
    """Mean of the finite numbers among ``values`` (``None`` entries, exact layers, are skipped)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def versions() -> dict[str, str]:
    out = {"modelpress": modelpress.__version__, "python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def record_header(source, config, elapsed_s: float) -> dict:
    """What every run record starts with: the source, the config, the versions and the wall time."""
    return {
        "modelpress_record": 1,
        "source": {"kind": source.kind, "path": source.path},
        "config": config.model_dump(),
        "versions": versions(),
        "wall_time_s": round(elapsed_s, 3),
    }


def calibration_summary(ids, calibration) -> dict:
    """The record's ``calibration`` entry: the token windows a run calibrated on, and their text."""
    return {"windows": len(ids), "tokens_per_window": ids.shape[1], "text": calibration.text or "built-in"}


def build_record(source, config, targets, layers: dict[str, dict], elapsed_s: float) -> dict:
    """Assemble the record of a compress run.

    Args:
        source: the :class:`~modelpress.models.loading.ModelSource` compressed.
        config: the method config (a pydantic model).
        targets: the :class:`~modelpress.models.tensors.Targets` plan.
        layers: module name -> per-layer numbers (format, error, ``numel``, ``nbytes``).
        elapsed_s: wall time of the run so far.
    """
    numel = sum(v["numel"] for v in layers.values())
    nbytes = sum(v["nbytes"] for v in layers.values())
    return {
        **record_header(source, config, elapsed_s),
        "quantized": {
            "layers": len(layers),
            "params": numel,
            "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / numel if numel else None,
            "mean_sqnr_db": mean_finite(v["sqnr_db"] for v in layers.values()),  # exact layers have None
        },
        "kept_unquantized": targets.kept,
        "layers": layers,
    }
