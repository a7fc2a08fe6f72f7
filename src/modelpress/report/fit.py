"""The page of a ``fit`` run: the budget, every candidate measured, and where the bytes went.

Read from ``OUT/fit.json`` and ``OUT/sensitivity.json`` (plain data written by
:mod:`modelpress.fit.search`); drawn with the same inline-SVG helpers as a recipe run's page:

- the budget: device memory split into reserve, KV cache, activations and the weights' share,
  with each candidate's bytes against it;
- the candidates: bytes, predicted and measured KL, perplexity, top-1 agreement;
- the sensitivity map: the KL each group causes rounded alone to its (3-bit) probe format, by
  layer and kind: which Linears hurt most when rounded;
- the allocation map: the winner's bits per weight of every group, by layer and kind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from modelpress.report.html import model_shape
from modelpress.report.inside import measured_roofline_chart
from modelpress.report.page import esc, figure, html_page, num, pyplot, size_text, write_page


def render_fit(record: dict, sens: dict | None) -> str:
    """The HTML page of a fit record (and its sensitivity, when kept)."""
    b = record["budget"]
    parts = [f"<h1>fit: {esc(record['model'])} on {esc(b['device'])}</h1>",
             f"<p class='note'>engine {esc(record['engine'])}; weights may take {size_text(b['weights'])}"
             + ("" if b["weights_only"] else f" at context {b['context']:,} x batch {b['batch']} "
                f"(KV cache {size_text(b['kv_cache'])} in {esc(b['kv_dtype'])})")
             + f"; winner <b>{esc(record['winner'])}</b></p>",
             "<h2>Candidates</h2>", candidate_table(record),
             "<h2>Memory</h2>", figure(budget_chart(record), "budget")]
    if record.get("speed"):
        sp = record["speed"]
        parts += ["<h2>Decode speed on this machine</h2>",
                  f"<table id='speed'><tr><th>engine</th><th>measured tok/s</th><th>ceiling tok/s</th><th>fraction</th>"
                  f"</tr><tr><td>{esc(sp['engine'])}</td><td class='n'>{sp['decode_tok_s']:.1f}</td>"
                  f"<td class='n'>{sp['ceiling_tok_s']:.1f}</td><td class='n'>{sp['fraction']:.0%}</td></tr></table>",
                  f"<p class='note'>batch 1, {sp['tokens']} tokens; the ceiling is this machine's measured read "
                  f"bandwidth ({sp['bandwidth'] / 1e9:.1f} GB/s) over the {size_text(sp['bytes_per_token'])} one "
                  "step reads.</p>"]
        flops = _flops_per_token(record["model"])
        if flops is not None and sp.get("peak_flops"):
            parts.append(figure(measured_roofline_chart(sp, flops, record["winner"]), "roofline"))
    if sens:
        parts += ["<h2>Sensitivity: predicted KL of each group in its probe format</h2>",
                  "<p class='note'>Each group (Linears an engine fuses) rounded alone, the model's KL measured: "
                  "darker costs more.</p>", figure(sensitivity_map(sens), "sensitivity")]
        if record.get("formats"):
            parts += ["<h2>Allocation: the winner's bits per weight</h2>",
                      figure(allocation_map(sens, record["formats"]), "allocation")]
        if any(s.get("kl_measured") for s in sens["linears"].values()):
            parts += ["<h2>Embedding and output head</h2>",
                      "<p class='note'>The model's KL with the tensor alone in each type, measured.</p>",
                      tensor_table(sens, record.get("formats") or {})]
    return html_page(f"modelpress fit: {Path(record['model']).name}", parts)


def _flops_per_token(model: str) -> float | None:
    """FLOP of one decode step per token (``2 x`` active params), from the model's config."""
    from modelpress.plan.roofline import flops_per_token

    shape = model_shape(model)
    return None if shape is None else flops_per_token(shape)


def candidate_table(record: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("candidate", "formats", "bytes", "predicted KL", "ppl", "KL", "top-1", ""))
    rows = []
    for c in record["candidates"]:
        mix = ", ".join(f"{n} {esc(f)}" for f, n in c["mix"].items())
        cells = [esc(c["name"]), mix, size_text(c["bytes"]), num(c.get("predicted_kl"), ".4f"), num(c.get("ppl"), ".3f"),
                 num(c.get("kl"), ".4f"), num(c.get("top1_agreement"), ".1%"),
                 "winner" if c["name"] == record["winner"] else ""]
        rows.append("<tr>" + "".join(f"<td class='n'>{x}</td>" if i in (2, 3, 4, 5, 6) else f"<td>{x}</td>"
                                     for i, x in enumerate(cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def tensor_table(sens: dict, formats: dict[str, str]) -> str:
    """The tensors priced by their own measured KL (embedding, output head): each type's KL and
    size, the winner's type in bold."""
    rows = []
    for name, s in sens["linears"].items():
        if s.get("kl_measured"):
            cells = [f"<b>{esc(t)}</b>" if formats.get(name) == t else esc(t) for t in s["nbytes"]]
            rows += [f"<tr><td>{esc(name)}</td><td>{c}</td><td class='n'>{size_text(s['nbytes'][t])}</td>"
                     f"<td class='n'>{num(s['errors'][t], '.5f')}</td></tr>" for c, t in zip(cells, s["nbytes"])]
    head = "".join(f"<th>{h}</th>" for h in ("tensor", "type", "bytes", "KL"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def budget_chart(record: dict):
    """Device memory as reserve + KV cache + activations + the weights' budget; each candidate's bytes."""
    plt = pyplot()
    b = record["budget"]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(record["candidates"])))
    left = 0.0
    for label, value, color in (("weights budget", b["weights"], "#cfe0f3"), ("KV cache", b["kv_cache"], "#e3a33b"),
                                ("activations", b["activations"], "#9bbb59"), ("reserve", b["reserve"], "#bbbbbb")):
        if value > 0:
            ax.barh(0, value / 1e9, left=left / 1e9, color=color, label=label)
            left += value
    for i, c in enumerate(record["candidates"], start=1):
        ax.barh(i, c["bytes"] / 1e9, color="#3b6ea8" if c["name"] == record["winner"] else "#8aa9cc")
    ax.set_yticks(range(len(record["candidates"]) + 1), [b["device"], *(c["name"] for c in record["candidates"])])
    ax.invert_yaxis()
    ax.set_xlabel("GB")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    return fig


def _grid(sens: dict, value) -> tuple[list[str], int, list[list[float]]]:
    """Groups by (kind, layer): kinds are the group leaders' last name part (q_proj for q/k/v)."""
    groups: dict[str, list[str]] = {}
    for name, s in sens["linears"].items():
        if not s.get("kl_measured"):  # the embedding and output head are not decoder layers' (:func:`tensor_table`)
            groups.setdefault(s["group"], []).append(name)
    kinds = sorted({g.rsplit(".", 1)[-1] for g in groups})
    n_layers = 1 + max(sens["linears"][names[0]]["layer"] for names in groups.values())
    grid = [[math.nan] * n_layers for _ in kinds]
    for g, names in groups.items():
        layer = sens["linears"][names[0]]["layer"]
        grid[kinds.index(g.rsplit(".", 1)[-1])][layer] = value(g, names)
    return kinds, n_layers, grid


def sensitivity_map(sens: dict):
    def predicted(group, names):
        probes = sens.get("probes", {}).get(group, {})
        if not probes:
            return math.nan
        spec = max(probes, key=lambda f: sum(sens["linears"][n]["nbytes"][f] for n in names))  # the 3-bit one
        return math.log10(max(probes[spec]["kl"], 1e-9))

    return _layer_map(sens, predicted, "Reds", "log10 KL (nats/token)")


def allocation_map(sens: dict, formats: dict[str, str]):
    def bits(group, names):
        n = sum(sens["linears"][m]["numel"] for m in names)
        return 8 * sum(sens["linears"][m]["nbytes"][formats[m]] for m in names) / n

    return _layer_map(sens, bits, "viridis", "bits per weight")


def _layer_map(sens: dict, value, cmap: str, label: str):
    """A heat map of ``value(group, names)`` by decoder layer (columns) and group kind (rows)."""
    plt = pyplot()
    kinds, n_layers, grid = _grid(sens, value)
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * n_layers + 2), 0.5 * len(kinds) + 1.2))
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    fused = not {"k_proj", "up_proj"} & set(kinds)  # vLLM's groups are named by their first Linear
    ax.set_yticks(range(len(kinds)), [_kind_label(k, fused) for k in kinds])
    ax.set_xlabel("decoder layer")
    fig.colorbar(im, ax=ax, label=label)
    return fig


def _kind_label(kind: str, fused: bool) -> str:
    if kind == "*":
        return "experts"
    return {"q_proj": "q/k/v", "gate_proj": "gate/up"}.get(kind, kind) if fused else kind


def write_fit_report(run: Path, out: Path) -> Path:
    record = json.loads((run / "fit.json").read_text())
    sens_file = run / "sensitivity.json"
    sens = json.loads(sens_file.read_text()) if sens_file.is_file() else None
    return write_page(render_fit(record, sens), out)
