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
- the training curves (loss and held-out perplexity) of every training stage;
- the roofline of every step's format on the recipe's device, histograms of a few weights before
  and after each step, and each step's greedy continuations of the recipe's prompts
  (:mod:`modelpress.report.inside`).
"""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import UserError
from modelpress.record import read_record
from modelpress.report.charts import layer_error_chart, train_log, training_chart
from modelpress.report.inside import generations_table, histogram_chart, roofline_chart
from modelpress.report.page import esc, figure, html_page, num, pct, pyplot, size_text, write_page


def write_report(run: str | Path, out: str | Path) -> Path:
    """Write the report of the recipe run in ``run`` to the HTML file ``out`` (atomically); a
    ``fit`` output's page is :func:`modelpress.report.fit.write_fit_report`'s."""
    run = Path(run)
    record = read_record(run)
    if not record or record.get("command") != "run":
        raise UserError(f"{run} is not a finished recipe run (no run record in {run / 'modelpress.json'}); "
                        "give the -o folder of `modelpress run` once it has finished")
    return write_page(render(record), out)


def render(record: dict) -> str:
    """The HTML page of a run record (plain data in, one string out)."""
    recipe, original, steps = record["recipe"], record["original"], record["steps"]
    parts = [f"<h1>{esc(Path(recipe['path']).name)}: {esc(recipe['model'])}</h1>",
             f"<p class='note'>ppl-512 on {esc(Path(original['text']).name)} ({original['n_windows']} windows); "
             f"output {esc(record['output'])}; modelpress {esc(record.get('versions', {}).get('modelpress', '?'))}</p>",
             "<h2>Steps</h2>", stage_table(record),
             "<h2>Size and perplexity</h2>", figure(size_vs_ppl(labeled(record)), "size-ppl")]
    points = labeled(record)
    target = device_and_shape(record)
    if target is None:
        parts.append("<p class='note'>Name a device in the recipe's <code>evaluate</code> (<code>device: h100</code>) "
                     "to see each step's memory and roofline on it.</p>")
    else:
        ev = recipe["evaluate"]
        context, batch = ev.get("context", 4096), ev.get("batch", 1)
        parts += ["<h2>Memory on the device</h2>", figure(memory_chart(points, *target, context, batch), "memory")]
        roofline = roofline_chart(points, *target, context)
        if roofline is not None:
            parts += ["<h2>Roofline: one decode step, batch 1 to 1024</h2>", figure(roofline, "roofline")]
    for step in steps:
        layers = _stage_record(step).get("layers")
        if layers:
            parts += [f"<h2>Per-layer error: {esc(step['title'])}</h2>", figure(layer_error_chart(layers), "layers")]
        log = train_log(_output_folder(step))
        if log:
            parts += [f"<h2>Training: {esc(step['title'])}</h2>", figure(training_chart(log), "training")]
    histograms = histogram_chart(points)
    if histograms is not None:
        parts += ["<h2>Weights before and after</h2>",
                  "<p class='note'>Values of a few Linears as the evaluator saw them (dequantized), counts on a log "
                  "scale.</p>", figure(histograms, "histograms")]
    generations = generations_table(points)
    if generations is not None:
        parts += [f"<h2>Generations (greedy, {record['recipe']['evaluate'].get('new_tokens', 32)} tokens)</h2>",
                  generations]
    return html_page(f"modelpress report: {Path(recipe['path']).name}", parts)


def labeled(record: dict) -> list[tuple[str, dict]]:
    """The original and every step with the label the charts give them (``"1+2 prune + quantize"``)."""
    return [("0 original", record["original"]),
            *((f"{'+'.join(map(str, s['stages']))} {s['title']}", s) for s in record["steps"])]


def device_and_shape(record: dict):
    """``(hardware, model shape)`` of the recipe's device and model, or ``None`` when the recipe
    names no device or the planner cannot read the model's config."""
    from modelpress.plan.hardware import find_hardware

    device = record["recipe"]["evaluate"].get("device")
    shape = model_shape(record["recipe"]["model"]) if device else None
    return None if shape is None else (find_hardware(device), shape)


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
        cells = [step, esc(title), *measured_cells(m, impact, cumulative), *timing_cells(m)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" if i == 1 else f"<td class='n'>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    th = "".join(f"<th>{h}</th>" for h in head)
    return f"<table id='steps'><tr>{th}</tr>{''.join(rows)}</table>"


def size_vs_ppl(points: list[tuple[str, dict]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [(m.get("size_bytes") or 0) / 1e6 for _, m in points]
    ys = [m["ppl"] for _, m in points]
    ax.plot(xs, ys, "-o", color="#3b6ea8")
    for (label, _), x, y in zip(points, xs, ys):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (ppl-512)")
    ax.grid(alpha=0.3)
    return fig


def model_shape(model: str):
    """The planner's :class:`~modelpress.plan.memory.ModelShape` of ``model`` (its config), or
    ``None`` when there is none the planner reads: a page then leaves out its model charts."""
    from modelpress.cli.plan import load_model

    try:
        shape, _ = load_model(model)
    except UserError:
        return None
    return shape


def memory_chart(points: list[tuple[str, dict]], device, shape, context: int, batch: int):
    """Weights, KV cache and activations of each step, stacked, against the device's memory."""
    from modelpress.plan.memory import RUNTIME_RESERVE, activation_bytes, kv_cache_bytes

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(points) + 1.2))
    labels, weights, kvs, kv_dtype = [], [], [], "fp16"
    for label, m in points:
        labels.append(label)
        weights.append(m.get("planner_bytes") or 0)
        kv_dtype = (m.get("kv_cache") or kv_dtype).split(" ")[0]
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


def _output_folder(step: dict) -> Path:
    output = Path(step["output"])
    return output.parent if output.suffix == ".gguf" else output


def _stage_record(step: dict) -> dict:
    return read_record(_output_folder(step)) or {}
