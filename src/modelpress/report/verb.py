"""The page of one command's output (``compress``, ``prune``, ``distill``, ``heal`` with ``--report``,
or ``modelpress report OUT`` on their folder).

Read from the output's record (``OUT/modelpress.json``) and training log, plus the evaluation the
command ran (``--eval``), when there was one:

- what ran: the source, the config (every field set), versions and wall time;
- what it did: each summary the record keeps (quantized, pruned, structured, steps, held-out...);
- the evaluation against the original (perplexity, KL, top-1 agreement, sizes);
- the per-layer error of the layer pass (each Linear, by layer) and each Linear's sparsity;
- the training curve of a distillation.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import UserError
from modelpress.record import read_record
from modelpress.report.charts import layer_error_chart, sparsity_chart, train_log, training_chart
from modelpress.report.page import esc, figure, html_page, num, size_text, write_page

_EVAL_ROWS = (("ppl", "perplexity", ".3f"), ("baseline_ppl", "original's perplexity", ".3f"),
              ("kl", "KL to the original (nats/token)", ".4f"), ("top1_agreement", "top-1 agreement", ".1%"))


def write_verb_report(folder: str | Path, out: str | Path, evaluation: dict | None = None) -> Path:
    """Write the page of the command output in ``folder`` to ``out`` (atomically)."""
    folder = Path(folder)
    record = read_record(folder.parent if folder.suffix == ".gguf" else folder)
    if not record:
        raise UserError(f"{folder} has no modelpress record (modelpress.json): give the -o folder of a "
                        "modelpress command")
    return write_page(render_verb(record, folder, evaluation), out)


def command_of(record: dict) -> str:
    """The command that wrote ``record`` (older records name it only by what they hold)."""
    if record.get("command"):
        return record["command"]
    if "teacher" in record:
        return "distill"
    if "pruned" in record or "structured" in record:
        return "prune"
    return "compress"


def render_verb(record: dict, folder: Path, evaluation: dict | None = None) -> str:
    command = command_of(record)
    source = record.get("source")
    source = source.get("path") if isinstance(source, dict) else source
    parts = [f"<h1>modelpress {esc(command)}: {esc(source)} &rarr; {esc(folder)}</h1>",
             f"<p class='note'>modelpress {esc(record.get('versions', {}).get('modelpress', '?'))}"
             + ("" if record.get("wall_time_s") is None else f"; {record['wall_time_s']:,.1f} s") + "</p>"]
    if isinstance(record.get("config"), dict):
        parts += ["<h2>Settings</h2>", key_table(flatten(record["config"]), "settings")]
    for key, value in record.items():
        if key in ("config", "source", "versions", "layers") or not isinstance(value, dict):
            continue
        flat = flatten(value)
        if flat:
            parts += [f"<h2>{esc(key.replace('_', ' ').capitalize())}</h2>", key_table(flat, key)]
    if evaluation is not None:
        rows = {label: num(evaluation.get(k), fmt) for k, label, fmt in _EVAL_ROWS if evaluation.get(k) is not None}
        rows["size on disk"] = size_text(evaluation.get("size_bytes"))
        if evaluation.get("baseline_size_bytes"):
            rows["original's size on disk"] = size_text(evaluation["baseline_size_bytes"])
        parts += [f"<h2>Evaluation: {esc(evaluation.get('protocol', ''))} on {esc(Path(evaluation['text']).name)}</h2>",
                  key_table(rows, "evaluation")]
    layers = record.get("layers") or {}
    if any("output_rel_mse" in v or "rel_mse" in v for v in layers.values()):
        parts += ["<h2>Per-layer error</h2>", figure(layer_error_chart(layers), "layers")]
    if any("sparsity" in v for v in layers.values()):
        parts += ["<h2>Sparsity of each Linear (zeros counted in the file)</h2>",
                  figure(sparsity_chart(layers), "sparsity")]
    log = train_log(folder)
    if log:
        parts += ["<h2>Training</h2>", figure(training_chart(log), "training")]
    return html_page(f"modelpress {command}: {Path(folder).name}", parts)


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """A record's section as ``{"a.b": "value"}`` rows: scalars and short lists, ``None`` left out."""
    rows = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and len(value) <= 8 and all(not isinstance(v, (dict, list)) for v in value):
            rows[name] = ", ".join(map(str, value))
        elif value is not None and not isinstance(value, list):
            rows[name] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return rows


def key_table(rows: dict[str, str], name: str) -> str:
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows.items())
    return f"<table id='{esc(name)}'>{body}</table>"
