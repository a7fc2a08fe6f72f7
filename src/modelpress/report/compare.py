"""Recipes run side by side (``modelpress run A.yaml B.yaml -o OUT``): one row per recipe and one page.

Each recipe's own run record (``OUT/<recipe>/modelpress.json``) holds its steps; this module
lines up where each recipe ends (the table the CLI prints and the page shows), draws every
recipe's path from the original through its steps in size and perplexity and in size and KL,
and sets each recipe's last generations beside the original's. The seed's order questions
(prune then quantize, or the other way round?) are answered by this page.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import UserError
from modelpress.record import read_record
from modelpress.report.inside import generations_table
from modelpress.report.page import esc, figure, html_page, num, pct, pyplot, size_text, write_page

COLUMNS = ("recipe", "stages", "on disk", "bits/param", "ppl", "vs original", "KL", "top-1", "total time")


def comparison_rows(records: list[dict]) -> list[list[str]]:
    """One row of :data:`COLUMNS` per recipe: its last step's numbers and its stages' total time."""
    rows = []
    for r in records:
        last, original = r["steps"][-1], r["original"]
        seconds = [s["seconds"] for s in r["steps"] if s.get("seconds") is not None]
        rows.append([Path(r["recipe"]["path"]).name, " -> ".join(s["title"] for s in r["steps"]),
                     size_text(last.get("size_bytes")), num(last.get("bits_per_param"), ".2f"), f"{last['ppl']:.3f}",
                     pct(last["ppl"] / original["ppl"] - 1), num(last.get("kl"), ".4f"),
                     num(last.get("top1_agreement"), ".1%"), f"{sum(seconds):,.0f} s" if seconds else ""])
    return rows


def compared_records(folder: Path) -> list[dict]:
    """The run records of the recipes run side by side into ``folder`` (one subfolder each)."""
    records = [r for r in (read_record(sub) for sub in sorted(Path(folder).iterdir()) if sub.is_dir())
               if r.get("command") == "run"]
    if len(records) < 2:
        raise UserError(f"{folder} holds no finished recipe runs side by side; give the -o folder of "
                        "`modelpress run A.yaml B.yaml`, or one recipe's run folder")
    return records


def render_comparison(records: list[dict], folder: Path | None = None) -> str:
    """The page of recipes compared (``folder``: where their runs are, to link each one's page)."""
    original = records[0]["original"]
    names = [Path(r["recipe"]["path"]).stem for r in records]
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" if i < 2 else f"<td class='n'>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in comparison_rows(records))
    parts = [f"<h1>{len(records)} recipes on {esc(records[0]['recipe']['model'])}</h1>",
             f"<p class='note'>ppl-512 on {esc(Path(original['text']).name)} ({original['n_windows']} windows); "
             f"the original: ppl {original['ppl']:.3f}, {size_text(original.get('size_bytes'))}</p>",
             f"<table id='recipes'><tr>{head}</tr>{body}</table>"]
    pages = [n for n in names if folder is not None and (Path(folder) / n / "report.html").is_file()]
    if pages:
        parts.append("<p class='note'>Each recipe's own page: "
                     + ", ".join(f"<a href='{esc(n)}/report.html'>{esc(n)}</a>" for n in pages) + "</p>")
    parts += ["<h2>Each recipe's path: size and perplexity</h2>", figure(paths_chart(records, "ppl"), "paths-ppl")]
    if all(s.get("kl") is not None for r in records for s in r["steps"]):
        parts += ["<h2>Each recipe's path: size and KL to the original</h2>", figure(paths_chart(records, "kl"), "paths-kl")]
    generations = generations_table([("original", original), *((n, r["steps"][-1]) for n, r in zip(names, records))])
    if generations is not None:
        parts += ["<h2>Generations: the original and each recipe's result</h2>", generations]
    return html_page(f"modelpress: {', '.join(names)}", parts)


def paths_chart(records: list[dict], metric: str):
    """Every recipe from the original through its steps: size on disk against ``metric``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        points = ([r["original"]] if metric == "ppl" else []) + r["steps"]
        xs = [(m.get("size_bytes") or 0) / 1e6 for m in points]
        ys = [m[metric] for m in points]
        ax.plot(xs, ys, "-o", markersize=4, label=Path(r["recipe"]["path"]).stem)
        ax.annotate(r["steps"][-1]["title"], (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (ppl-512)" if metric == "ppl" else "KL to the original (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_comparison_report(folder: str | Path, out: str | Path) -> Path:
    """Write the page of the recipes run side by side into ``folder`` to ``out`` (atomically)."""
    return write_page(render_comparison(compared_records(Path(folder)), Path(folder)), out)
