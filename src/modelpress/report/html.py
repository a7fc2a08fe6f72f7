"""One self-contained HTML page for a recipe run (``modelpress report RUN -o report.html``).

The page opens with no network: every chart is an SVG drawn by matplotlib and written inline,
there is no script and no stylesheet or font from elsewhere. Every number on it is read from the
run's record (``RUN/modelpress.json``, written by :mod:`modelpress.pipeline.run`) and the records
and training logs of its stages, so the page shows exactly what the run measured:

- the stage table (the seed's: each step's size, perplexity, accuracy impact and the cumulative one);
- the memory of each step on the recipe's device: weights, KV cache and activations stacked
  against the device's memory (the planner's arithmetic);
- size against perplexity, one point per step;
- the per-layer error of every layer pass (relative output error of each Linear, by layer);
- the training curves (loss and held-out perplexity) of every training stage.

Not yet on the page: weight histograms, the roofline chart, generations before and after.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from modelpress.errors import UserError
from modelpress.record import read_record

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: 0.9em; } figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
"""


def write_report(run: str | Path, out: str | Path) -> Path:
    """Write the report of the recipe run in ``run`` to the HTML file ``out`` (atomically); a
    ``fit`` output's page is :func:`modelpress.report.fit.write_fit_report`'s."""
    run = Path(run)
    record = read_record(run)
    if not record or record.get("command") != "run":
        raise UserError(f"{run} is not a finished recipe run (no run record in {run / 'modelpress.json'}); "
                        "give the -o folder of `modelpress run` once it has finished")
    page = render(record)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def render(record: dict) -> str:
    """The HTML page of a run record (plain data in, one string out)."""
    recipe, original, steps = record["recipe"], record["original"], record["steps"]
    parts = [f"<h1>{_e(Path(recipe['path']).name)}: {_e(recipe['model'])}</h1>",
             f"<p class='note'>ppl-512 on {_e(Path(original['text']).name)} ({original['n_windows']} windows); "
             f"output {_e(record['output'])}; modelpress {_e(record.get('versions', {}).get('modelpress', '?'))}</p>",
             "<h2>Steps</h2>", stage_table(record),
             "<h2>Size and perplexity</h2>", _figure(size_vs_ppl(original, steps), "size-ppl")]
    memory = memory_chart(record)
    if memory is not None:
        parts += ["<h2>Memory on the device</h2>", _figure(memory, "memory")]
    for step in steps:
        layers = _stage_record(step).get("layers")
        if layers:
            parts += [f"<h2>Per-layer error: {_e(step['title'])}</h2>", _figure(layer_error_chart(layers), "layers")]
        log = _train_log(step)
        if log:
            parts += [f"<h2>Training: {_e(step['title'])}</h2>", _figure(training_chart(log), "training")]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>modelpress report: "
            f"{_e(Path(recipe['path']).name)}</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def step_rows(record: dict) -> list[tuple[str, str, dict, float | None, float | None]]:
    """The seed's table as data, one row per step with the original first: ``(step, technique,
    its numbers, this step's accuracy impact, the cumulative one)``, impact being the relative
    change in perplexity. The CLI's table and this page both show these rows."""
    original = record["original"]
    rows = [("0", f"original ({original.get('format') or '?'})", original, None, None)]
    previous = original["ppl"]
    for s in record["steps"]:
        rows.append(("+".join(map(str, s["stages"])), s["title"], s, s["ppl"] / previous - 1,
                     s["ppl"] / original["ppl"] - 1))
        previous = s["ppl"]
    return rows


def measured_cells(m: dict, impact: float | None, cumulative: float | None) -> list[str]:
    """A step's measured numbers as the tables show them: params, on disk, bits/param, ppl, this
    step, cumulative, KL, top-1."""
    return [f"{m['params'] / 1e6:,.1f}M", size_text(m.get("size_bytes")), num(m.get("bits_per_param"), ".2f"),
            f"{m['ppl']:.3f}", pct(impact), pct(cumulative), num(m.get("kl"), ".4f"), num(m.get("top1_agreement"), ".1%")]


def timing_cells(m: dict) -> list[str]:
    """A stage's wall time and peak RSS (empty for the original and for steps that ran no process)."""
    return ["" if m.get("seconds") is None else f"{m['seconds']:,.0f} s",
            "" if m.get("peak_rss_mb") is None else f"{m['peak_rss_mb']:,.0f} MB"]


def stage_table(record: dict) -> str:
    """The seed's table: step, technique, size, ppl, this step's and the cumulative accuracy impact."""
    head = ("step", "technique", "params", "on disk", "bits/param", "ppl", "this step", "cumulative", "KL", "top-1",
            "time", "peak RSS")
    rows = []
    for step, title, m, impact, cumulative in step_rows(record):
        cells = [step, _e(title), *measured_cells(m, impact, cumulative), *timing_cells(m)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" if i == 1 else f"<td class='n'>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    th = "".join(f"<th>{h}</th>" for h in head)
    return f"<table id='steps'><tr>{th}</tr>{''.join(rows)}</table>"


def size_vs_ppl(original: dict, steps: list[dict]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [("0 original", original), *((f"{'+'.join(map(str, s['stages']))} {s['title']}", s) for s in steps)]
    xs = [m.get("size_bytes") or 0 for _, m in points]
    ys = [m["ppl"] for _, m in points]
    ax.plot([x / 1e6 for x in xs], ys, "-o", color="#3b6ea8")
    for (label, _), x, y in zip(points, xs, ys):
        ax.annotate(label, (x / 1e6, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (ppl-512)")
    ax.grid(alpha=0.3)
    return fig


def memory_chart(record: dict):
    """Weights, KV cache and activations of each step, stacked, against the device's memory; ``None``
    when the recipe names no device or the model has no config the planner can read."""
    from modelpress.cli.plan import load_model
    from modelpress.plan.hardware import find_hardware
    from modelpress.plan.memory import RUNTIME_RESERVE, activation_bytes, kv_cache_bytes

    ev = record["recipe"]["evaluate"]
    if not ev.get("device"):
        return None
    try:
        shape, _ = load_model(record["recipe"]["model"])
    except UserError:
        return None
    device = find_hardware(ev["device"])
    context, batch = ev.get("context", 4096), ev.get("batch", 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * (len(record["steps"]) + 1) + 1.2))
    labels, weights, kvs = ["0 original"], [record["original"].get("planner_bytes") or 0], []
    kv_dtype = "fp16"
    for s in record["steps"]:
        labels.append(f"{'+'.join(map(str, s['stages']))} {s['title']}")
        weights.append(s.get("planner_bytes") or 0)
    for s in [record["original"], *record["steps"]]:
        kv_dtype = s.get("kv_cache") or kv_dtype
        kvs.append(kv_cache_bytes(shape, context, batch, kv_dtype) or 0)
    act = activation_bytes(shape, context, batch)
    ys = list(range(len(labels)))[::-1]
    gb = [w / 1e9 for w in weights]
    ax.barh(ys, gb, color="#3b6ea8", label="weights")
    ax.barh(ys, [k / 1e9 for k in kvs], left=gb, color="#e3a33b", label=f"KV cache ({context} x {batch})")
    ax.barh(ys, [act / 1e9] * len(ys), left=[g + k / 1e9 for g, k in zip(gb, kvs)], color="#9a9a9a",
            label="activations")
    ax.axvline(device.memory * (1 - RUNTIME_RESERVE) / 1e9, color="#b22", linestyle="--",
               label=f"{device.name}, {RUNTIME_RESERVE:.0%} kept free")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GB")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def layer_error_chart(layers: dict[str, dict]):
    """Each Linear's relative output error (or weight error when no calibration reached it) by layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for name, info in layers.items():
        err = info.get("output_rel_mse", info.get("rel_mse"))
        index = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if err is None or index is None:
            continue
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append((index, err))
    for kind, points in sorted(by_kind.items()):
        points.sort()
        ax.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], "-o", markersize=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    return fig


def training_chart(log: list[dict]):
    plt = _pyplot()
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


def _stage_record(step: dict) -> dict:
    output = Path(step["output"])
    return read_record(output.parent if output.suffix == ".gguf" else output) or {}


def _train_log(step: dict) -> list[dict]:
    output = Path(step["output"])
    path = (output.parent if output.suffix == ".gguf" else output) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # text as outlines: no font needed where it is opened
    return plt


def _figure(fig, name: str) -> str:
    plt = _pyplot()
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the page is HTML
    return f"<figure class='chart' data-chart='{name}'>{svg}</figure>"


def _e(text) -> str:
    return html.escape(str(text))


def size_text(n) -> str:
    """Bytes as MB below a gigabyte, else GB; empty when unknown."""
    if n is None:
        return ""
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def pct(x) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)
