"""What every report page shares: the stylesheet, matplotlib figures as inline SVG, the number formats.

A page opens with no network: charts are SVG written into the HTML (text drawn as outlines, so
no font is fetched), there is no script and no stylesheet or font from elsewhere. Pages are
written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.generations { width: 100%; } table.generations td:first-child { width: 30%; }
td.gen { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; }
.note { color: #666; font-size: 0.9em; } figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
"""


def html_page(title: str, body: list[str]) -> str:
    """A whole HTML document: ``title`` and the ``body`` parts in order."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_page(page: str, out: str | Path) -> Path:
    """Write ``page`` to ``out`` atomically (a temporary name, then one rename)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def pyplot():
    """matplotlib's pyplot on the headless backend, text drawn as outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # text as outlines: no font needed where it is opened
    plt.rcParams["svg.hashsalt"] = "modelpress"  # element ids from the content: the same record, the same page
    return plt


def figure(fig, name: str) -> str:
    """``fig`` as an inline SVG ``<figure data-chart=name>`` (the figure is closed)."""
    plt = pyplot()
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the page is HTML
    return f"<figure class='chart' data-chart='{name}'>{svg}</figure>"


def esc(text) -> str:
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
