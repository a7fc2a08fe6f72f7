"""Prune a model: magnitude, Wanda or SparseGPT, unstructured or N:M; a dense checkpoint with exact zeros.

Example:
    modelpress prune smollm2-135m --method wanda --pattern 2:4 --calib emma.txt -o smollm2-2of4
    modelpress prune smollm2-135m --method sparsegpt --sparsity 0.5 --calib emma.txt -o smollm2-50
"""

from __future__ import annotations

import argparse

from modelpress.cli import options
from modelpress.errors import UserError
from modelpress.pipeline.recipe import METHODS, methods
from modelpress.prune import prune
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_output(parser)
    parser.add_argument("--method", choices=methods("prune"), default="wanda",
                        help="magnitude (no data), wanda (|W| x ||X||, default), sparsegpt (OBS update)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, metavar="F", help="fraction of each Linear's weights to zero, in [0, 1)")
    how.add_argument("--pattern", metavar="N:M", help="N zeros in every M consecutive weights of a row (2:4, 4:8)")
    parser.add_argument("--per-row", action="store_true", help="magnitude: compare within each output row")
    parser.add_argument("--exclude", action="append", metavar="REGEX",
                        help="leave Linears whose name matches dense (repeatable; default: lm_head)")
    g = options.add_calibration(parser, "calibration (wanda, sparsegpt; protocol calib-128x512)")
    options.add_damp(g)
    g.add_argument("--block-size", type=options.positive_int, default=128,
                   help="sparsegpt: columns per adaptive mask block (default 128, the paper's)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--no-quality-guard", dest="quality_guard", action="store_false",
                        help="skip the check that the output's perplexity did not explode")
    options.add_json(parser)


def build_config(args: argparse.Namespace):
    config_class = METHODS[args.method].config
    given = {"sparsity": args.sparsity, "pattern": args.pattern, "per_row": args.per_row, "damp": args.damp,
             "block_size": args.block_size, "calibration": options.calibration_fields(args)}
    if args.exclude is not None:
        given["exclude"] = args.exclude
    fields = {k: v for k, v in given.items() if k in config_class.model_fields}
    if args.per_row and "per_row" not in fields:
        raise UserError(f"--per-row applies to --method magnitude; {args.method} compares within rows already "
                        "or chooses its masks from the Hessian")
    return options.make_config(config_class, fields)


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    options.check_new_output(args.output)
    options.check_calibration_source(args)
    record = prune(args.model, config, args.output, resume=args.resume, quality_guard=args.quality_guard)
    if args.json:
        print(to_json(record, indent=2))
        return 0
    p = record["pruned"]
    print(f"wrote {args.output}: {p['layers']} Linears pruned to {p['pattern']} "
          f"({100 * p['sparsity']:.1f}% of their weights are zero, counted in the file) in {record['wall_time_s']:.1f}s")
    print(f"what it buys: {p['what_it_buys']}")
    return 0
