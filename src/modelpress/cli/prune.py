"""Prune a model: magnitude, Wanda or SparseGPT, unstructured or N:M (a dense checkpoint with exact
zeros), or structured (MLP channels, heads, layers removed: a smaller checkpoint).

Example:
    modelpress prune smollm2-135m --method wanda --pattern 2:4 --calib emma.txt -o smollm2-2of4
    modelpress prune smollm2-135m --method sparsegpt --sparsity 0.5 --calib emma.txt -o smollm2-50
    modelpress prune smollm2-135m --method structured --mlp-keep 0.75 --drop-layers 4 --calib emma.txt -o smollm2-small
"""

from __future__ import annotations

import argparse

from modelpress.cli import options
from modelpress.errors import UserError
from modelpress.pipeline.recipe import METHODS, StructuredConfig, methods
from modelpress.prune import prune
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_output(parser)
    parser.add_argument("--method", choices=methods("prune"), default="wanda",
                        help="magnitude (no data), wanda (|W| x ||X||, default), sparsegpt (OBS update), "
                             "structured (remove channels, heads, layers)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--sparsity", type=float, metavar="F", help="fraction of each Linear's weights to zero, in [0, 1)")
    how.add_argument("--pattern", metavar="N:M", help="N zeros in every M consecutive weights of a row (2:4, 4:8)")
    parser.add_argument("--per-row", action="store_true", help="magnitude: compare within each output row")
    parser.add_argument("--exclude", action="append", metavar="REGEX",
                        help="leave Linears whose name matches dense (repeatable; default: lm_head)")
    st = parser.add_argument_group("structured (--method structured; any combination)")
    st.add_argument("--mlp-keep", type=float, metavar="F", help="fraction of MLP channels kept in every layer")
    st.add_argument("--heads-keep", type=float, metavar="F", help="fraction of attention heads kept in every layer")
    st.add_argument("--drop-layers", type=int, metavar="N", help="decoder layers removed")
    st.add_argument("--layer-metric", choices=["block-influence", "angular"],
                    help="which layers go: lowest block influence (ShortGPT, default) or the contiguous block "
                         "closest in angle (Gromov et al.)")
    st.add_argument("--head-mode", choices=["auto", "within-groups", "whole-groups"],
                    help="grouped-query attention: the same number of q heads from every kv group (keeps the KV "
                         "cache), or whole groups (shrinks it); auto: whole groups only when each has one q head")
    st.add_argument("--channel-multiple", type=options.positive_int, metavar="N",
                    help="round the kept MLP width to a multiple of N (default 32)")
    g = options.add_calibration(parser, "calibration (wanda, sparsegpt, structured; protocol calib-128x512)")
    options.add_damp(g)
    g.add_argument("--block-size", type=options.positive_int, default=128,
                   help="sparsegpt: columns per adaptive mask block (default 128, the paper's)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--no-quality-guard", dest="quality_guard", action="store_false",
                        help="skip the check that the output's perplexity did not explode")
    options.add_report(parser, "settings, what was pruned, each Linear's sparsity and error")
    options.add_json(parser)


# options that only some methods read: given to a method whose config lacks the field, they are refused
_METHOD_OPTIONS = {"sparsity": "--sparsity", "pattern": "--pattern", "exclude": "--exclude",
                   "mlp_keep": "--mlp-keep", "heads_keep": "--heads-keep", "drop_layers": "--drop-layers",
                   "layer_metric": "--layer-metric", "head_mode": "--head-mode", "channel_multiple": "--channel-multiple"}


def build_config(args: argparse.Namespace):
    config_class = METHODS[args.method].config
    given = {"per_row": args.per_row, "damp": args.damp, "block_size": args.block_size,
             "calibration": options.calibration_fields(args)}
    for field, flag in _METHOD_OPTIONS.items():
        value = getattr(args, field)
        if value is None:
            continue
        if field not in config_class.model_fields:
            raise UserError(f"{flag} does not apply to --method {args.method}; {_what_applies(args.method, flag)}")
        given[field] = value
    fields = {k: v for k, v in given.items() if k in config_class.model_fields}
    if args.per_row and "per_row" not in fields:
        raise UserError(f"--per-row applies to --method magnitude; {args.method} compares within rows already "
                        "or chooses its masks from the Hessian")
    return options.make_config(config_class, fields)


def _what_applies(method: str, flag: str) -> str:
    if method == "structured":
        return "structured pruning takes --mlp-keep, --heads-keep and --drop-layers"
    if flag.removeprefix("--").replace("-", "_") in StructuredConfig.model_fields:
        return f"{flag} belongs to --method structured"
    return f"{flag} is for another pruning method"


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    options.check_new_output(args.output)
    options.check_calibration_source(args)
    record = prune(args.model, config, args.output, resume=args.resume, quality_guard=args.quality_guard)
    options.write_command_report(args)
    if args.json:
        print(to_json(record, indent=2))
        return 0
    if "structured" in record:
        _print_structured(args.output, record)
        return 0
    p = record["pruned"]
    print(f"wrote {args.output}: {p['layers']} Linears pruned to {p['pattern']} "
          f"({100 * p['sparsity']:.1f}% of their weights are zero, counted in the file) in {record['wall_time_s']:.1f}s")
    print(f"what it buys: {p['what_it_buys']}")
    return 0


def _print_structured(output: str, record: dict) -> None:
    st = record["structured"]
    parts = []
    if "mlp_channels" in st:
        parts.append(f"MLP {st['mlp_channels']['before']} -> {st['mlp_channels']['after']} channels")
    if "heads" in st:
        parts.append(f"heads {st['heads']['q'][0]} -> {st['heads']['q'][1]} (kv {st['heads']['kv'][0]} -> "
                     f"{st['heads']['kv'][1]})")
    if st["layers"]["dropped"]:
        parts.append(f"layers {st['layers']['before']} -> {st['layers']['after']} (dropped {st['layers']['dropped']})")
    p = st["params"]
    print(f"wrote {output}: {', '.join(parts)}; {p['before'] / 1e6:.1f}M -> {p['after'] / 1e6:.1f}M parameters "
          f"({100 * p['kept']:.1f}%) in {record['wall_time_s']:.1f}s")
    print(f"what it buys: {st['what_it_buys']}")
