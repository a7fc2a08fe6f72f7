"""The report's look inside each step: the roofline, weight histograms and generations.

- **Roofline**: one decode step of each step's format at batch 1, 2, 4 ... 1024 on the recipe's
  device, as FLOP/s attainable against arithmetic intensity (the planner's
  :func:`~modelpress.plan.roofline.decode_roofline`), under the device's roofs: bandwidth times
  intensity, capped by peak FLOP/s of each compute dtype. A point left of the ridge is
  memory-bound, where fewer bytes per weight buy speed.
- **Weight histograms**: the values of a few Linears (the original's pick, see
  :func:`~modelpress.eval.samples.probe_linears`) in the original and after each step,
  dequantized as the evaluator saw them, with the share of exact zeros.
- **Generations**: each prompt's greedy continuation by the original and by every step.
"""

from __future__ import annotations

import unicodedata

from modelpress.errors import UserError
from modelpress.report.page import esc, pyplot

BATCHES = tuple(2 ** i for i in range(11))  # 1 .. 1024


def roofline_chart(points: list[tuple[str, dict]], hw, shape, context: int):
    """FLOP/s attainable against FLOP per byte, each step's format at :data:`BATCHES` on ``hw``;
    ``None`` when no step has a format the planner prices."""
    from modelpress.plan.formats import plan_format
    from modelpress.plan.roofline import decode_roofline

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kv_dtype, computes, xs_all = "fp16", set(), []
    for label, m in points:
        kv_dtype = (m.get("kv_cache") or kv_dtype).split(" ")[0]
        try:
            fmt = plan_format(m.get("format") or "")
        except UserError:  # a format the planner does not price
            continue
        steps = [decode_roofline(shape, fmt, hw, context=context, batch=b, kv_dtype=kv_dtype) for b in BATCHES]
        xs = [r.intensity for r in steps]
        ys = [min(hw.peak_flops(fmt.compute), x * hw.bandwidth) for x in xs]
        line, = ax.plot(xs, ys, "-o", markersize=3, label=f"{label} ({fmt.name})")
        ax.annotate(f"B={BATCHES[-1]}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color=line.get_color())
        computes.add(fmt.compute)
        xs_all += xs
    if not xs_all:
        plt.close(fig)
        return None
    lo, hi = min(xs_all) / 2, max(max(xs_all), max(hw.ridge_point(c) for c in computes)) * 4
    for c in sorted(computes):
        _roof(ax, lo, hi, hw.bandwidth, hw.peak_flops(c), f"{c} peak")
    _roofline_axes(ax, f"{hw.name}: {hw.bandwidth / 1e12:.2f} TB/s, context {context:,}")
    return fig


def _roof(ax, lo: float, hi: float, bandwidth: float, peak: float, name: str) -> None:
    """A roof from intensity ``lo`` to ``hi``: bandwidth x intensity up to the ridge, then ``peak``."""
    ridge = peak / bandwidth
    ax.plot([lo, ridge, hi], [lo * bandwidth, peak, peak], color="#444", linewidth=1.5, alpha=0.7)
    ax.annotate(f"{name}; ridge {ridge:,.1f} FLOP/B", (ridge, peak), textcoords="offset points", xytext=(4, 4),
                fontsize=7)


def _roofline_axes(ax, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte read) of one decode step")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")


def histogram_chart(points: list[tuple[str, dict]]):
    """One panel per weight the original's measurement kept: its histogram and each step's (log
    counts); ``None`` when the run kept none."""
    names = list(points[0][1].get("weight_histograms") or {})
    if not names:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for i, (label, m) in enumerate(points):
            h = (m.get("weight_histograms") or {}).get(name)
            if h is not None:
                ax.stairs([max(c, 0.5) for c in h["counts"]], h["edges"], linewidth=1.4 if i == 0 else 0.9,
                          label=f"{label}: {h['zeros']:.1%} zeros")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("weights", fontsize=8)
        ax.legend(fontsize=6)
    axes[-1, 0].set_xlabel("value")
    return fig


def generations_table(points: list[tuple[str, dict]]) -> str | None:
    """Each prompt, then the original's continuation and every step's; ``None`` when none were kept."""
    first = points[0][1].get("generations")
    if not first:
        return None
    blocks = []
    for k, g in enumerate(first):
        rows = []
        for i, (label, m) in enumerate(points):
            gens = m.get("generations") or []
            if k < len(gens):
                same = " <span class='note'>(the original's, token for token)</span>" if (
                    i > 0 and gens[k]["tokens"] == g["tokens"]) else ""
                rows.append(f"<tr><td>{esc(label)}</td><td class='gen'>{shown(gens[k]['continuation'])}{same}</td></tr>")
        blocks.append(f"<p><b>{esc(g['prompt'])}</b>&hellip;</p><table class='generations'>{''.join(rows)}</table>")
    return "\n".join(blocks)


def shown(text: str) -> str:
    """Generated text as the page shows it: escaped, control characters other than newline and tab
    written as ``\\xNN`` (a broken model emits them; the record keeps the text as it came)."""
    return esc("".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text))


def measured_roofline_chart(speed: dict, flops_per_token: float, label: str):
    """This machine's roofline (measured read bandwidth and matmul FLOP/s) with one decode step at
    batch 1 twice: at the memory-bound ceiling and as measured (FLOP/s achieved = tokens/s times
    FLOP per token), so the gap between the engine and the physical limit is a distance."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bw, peak = speed["bandwidth"], speed["peak_flops"]
    x = flops_per_token / speed["bytes_per_token"]
    ridge = peak / bw
    lo, hi = min(x, ridge) / 4, max(x, ridge) * 4
    _roof(ax, lo, hi, bw, peak, "matmul peak")
    ax.plot([x], [x * bw], "o", color="#3b6ea8", label=f"{label}: ceiling {speed['ceiling_tok_s']:.1f} tok/s")
    ax.plot([x], [speed["decode_tok_s"] * flops_per_token], "s", color="#e3a33b",
            label=f"{label}: measured {speed['decode_tok_s']:.1f} tok/s in {speed['engine']} "
                  f"({speed['fraction']:.0%})")
    _roofline_axes(ax, f"this machine: {bw / 1e9:.1f} GB/s read, {peak / 1e9:.0f} GFLOP/s matmul (measured)")
    return fig
