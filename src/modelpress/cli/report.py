"""Write one self-contained HTML page for a recipe run (the stage table, memory and roofline on the
device, per-layer error, weights before and after, generations, training curves), a fit (budget,
candidates, sensitivity) or one command's output (settings, summaries, per-layer error), as inline
SVG: it opens with no network.

Example:
    modelpress run recipes/prune-then-quantize.yaml -o runs/ptq
    modelpress report runs/ptq -o runs/ptq/report.html
"""

from __future__ import annotations

import argparse

from pathlib import Path

from modelpress.record import read_record
from modelpress.report.compare import write_comparison_report
from modelpress.report.fit import write_fit_report
from modelpress.report.html import write_report
from modelpress.report.verb import write_verb_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="the -o folder of a finished `modelpress run` (one recipe, or several side by "
                        "side) or `fit`, or of a compress, prune, distill or heal")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")


def main(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if (run / "fit.json").is_file():  # a `modelpress fit` output
        out = write_fit_report(run, Path(args.output))
    elif read_record(run).get("command") == "run":
        out = write_report(run, args.output)
    elif run.is_dir() and not read_record(run):  # `run A.yaml B.yaml -o OUT`: recipes side by side
        out = write_comparison_report(run, args.output)
    else:  # one command's output (compress, prune, distill, heal)
        out = write_verb_report(run, args.output)
    print(f"wrote {out}")
    return 0
