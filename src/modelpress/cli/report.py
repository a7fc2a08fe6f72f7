"""Write one self-contained HTML page for a recipe run: the stage table, memory on the device,
size against perplexity, per-layer error and training curves, as inline SVG (opens with no network).

Example:
    modelpress run recipes/prune-then-quantize.yaml -o runs/ptq
    modelpress report runs/ptq -o runs/ptq/report.html
"""

from __future__ import annotations

import argparse

from pathlib import Path

from modelpress.report.fit import write_fit_report
from modelpress.report.html import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="the -o folder of a finished `modelpress run` or `modelpress fit`")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")


def main(args: argparse.Namespace) -> int:
    if (Path(args.run) / "fit.json").is_file():  # a `modelpress fit` output
        out = write_fit_report(Path(args.run), Path(args.output))
    else:
        out = write_report(args.run, args.output)
    print(f"wrote {out}")
    return 0
