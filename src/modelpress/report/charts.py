"""Charts that more than one page draws: per-layer error and sparsity, training curves."""

from __future__ import annotations

import json
from pathlib import Path

from modelpress.models.arch import layer_index
from modelpress.report.page import pyplot


def layer_error_chart(layers: dict[str, dict]):
    """Each Linear's relative output error (or weight error when no calibration reached it) by layer."""
    return _by_layer(layers, lambda info: info.get("output_rel_mse", info.get("rel_mse")), "relative output error",
                     log=True)


def sparsity_chart(layers: dict[str, dict]):
    """Each Linear's measured share of zeros, by layer."""
    return _by_layer(layers, lambda info: None if "sparsity" not in info else 100 * info["sparsity"], "zeros (%)")


def _by_layer(layers: dict[str, dict], value, ylabel: str, log: bool = False):
    """One line per kind of Linear (``q_proj``...): ``value(info)`` of each decoder layer's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5 if log else 3))
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for name, info in layers.items():
        v, index = value(info), layer_index(name)
        if v is not None and index is not None:
            by_kind.setdefault(name.rsplit(".", 1)[-1], []).append((index, max(v, 1e-12) if log else v))
    for kind, points in sorted(by_kind.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", markersize=3, label=kind)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    return fig


def training_chart(log: list[dict]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    evals = [(e["step"], e["eval_ppl"]) for e in log if "eval_ppl" in e]
    if train:
        ax.plot(*zip(*train), color="#3b6ea8", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "-o", color="#e3a33b", label="held-out ppl")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(fontsize=8, loc="upper center")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def train_log(folder: Path) -> list[dict]:
    """The training log (``train_log.jsonl``) a distillation kept in ``folder``; empty when none."""
    path = Path(folder) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
