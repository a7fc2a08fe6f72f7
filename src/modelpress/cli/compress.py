"""Quantize a model and write a checkpoint that plain transformers and vLLM load.

Example:
    modelpress compress smollm2-135m --method rtn --bits 4 --group-size 64 -o smollm2-int4
    modelpress compress smollm2-135m --method gptq --format nvfp4 -o smollm2-nvfp4
"""

from __future__ import annotations

import argparse

from modelpress.cli import options
from modelpress.cli.evaluate import print_table
from modelpress.compress import compress
from modelpress.errors import UserError
from modelpress.eval.compare import measure
from modelpress.pipeline.recipe import METHODS, methods
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_output(parser)
    parser.add_argument("--method", choices=methods("quantize"), default="rtn")
    q = parser.add_argument_group("format")
    q.add_argument("--format", metavar="SPEC", dest="weight_format",
                   help="weight format by name, overriding --bits/--granularity/--group-size: fp8, fp8-channel, "
                        "nvfp4, mxfp4, nf4 (written dequantized), nf4-g128, or an integer spec such as int4-g128")
    q.add_argument("--bits", type=int, help="2 to 8 (default 4; 8 for smoothquant)")
    q.add_argument("--granularity", choices=["tensor", "channel", "group"],
                   help="one scale per tensor, output channel or group (default group; channel for smoothquant)")
    q.add_argument("--group-size", type=options.positive_int, metavar="G",
                   help="columns per scale with --granularity group (default 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True, help="zero point 0 (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="a zero point per group")
    q.add_argument("--symmetric-range", choices=["exact-negative", "full", "restricted"], default="exact-negative",
                   help="symmetric scales: exact-negative maps a negative extreme exactly to -2^(b-1), a positive "
                        "one within half a step of 2^(b-1)-1 (default; measured best); full puts both within half "
                        "a step; restricted is max|w| / (2^(b-1) - 1), which never uses -2^(b-1)")
    q.add_argument("--observer", choices=["minmax", "percentile", "mse"],
                   help="how each group's range is chosen (default mse for gptq, minmax otherwise; mse searches clipping)")
    q.add_argument("--scale-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    q.add_argument("--exclude", action="append", metavar="REGEX",
                   help="keep matching Linear modules unquantized (repeatable; default: lm_head; a list that does "
                        "not match the output head quantizes it too, as llm-compressor's ignore list does)")
    q.add_argument("--quantize-head", action="store_true",
                   help="quantize an untied output head too (GPTQ from the Hessian of its inputs; rounded to "
                        "nearest for the other methods); a head tied to the input embedding stays in float")
    q.add_argument("--group-fallback", choices=["error", "keep", "shrink"], default="error",
                   help="layers whose input size the group size does not divide: error (default), "
                        "keep them unquantized, or shrink their group to the largest common divisor")
    a = parser.add_argument_group("activations (W8A8: int8 weights and int8 Linear inputs)")
    a.add_argument("--activations", choices=["dynamic", "static", "int8-dynamic", "int8-static"],
                   help="quantize Linear inputs to int8: per token at run time (dynamic; smoothquant's default, "
                        "and plain W8A8 with --method rtn) or one calibrated scale per Linear (static; smoothquant)")
    a.add_argument("--alpha", type=float, default=0.5, help="smoothquant: migration strength in [0, 1] (default 0.5)")
    a.add_argument("--weights", choices=["rtn", "gptq"], default="rtn",
                   help="smoothquant: how the smoothed int8 weights are rounded (default rtn)")
    g = options.add_calibration(parser, "calibrated methods (gptq, awq, smoothquant)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--act-order", dest="act_order", action="store_true", default=True,
                       help="GPTQ: columns by decreasing Hessian diagonal, static groups (default)")
    order.add_argument("--no-act-order", dest="act_order", action="store_false")
    options.add_damp(g)
    g.add_argument("--block-size", type=options.positive_int, default=128, help="GPTQ: columns per lazy-update block (default 128)")
    g.add_argument("--scale-search", choices=["activation", "duo", "both"], default="both",
                   help="awq: per-channel scales x^a (activation), x^a / w^(1-a) (duo), or the better of both "
                        "per layer (default)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--no-quality-guard", dest="quality_guard", action="store_false",
                        help="write the output even when its perplexity explodes (by default a model over 10x "
                             "the source's perplexity on a little calibration text is refused)")
    parser.add_argument("--eval", action="store_true", help="after compressing, evaluate against the original")
    options.add_eval_text(parser)
    options.add_report(parser, "settings, what was quantized, per-layer error, and the --eval numbers")
    options.add_json(parser)


def build_config(args: argparse.Namespace):
    fields = {
        "format": args.weight_format,
        "symmetric": args.symmetric,
        "symmetric_range": args.symmetric_range,
        "scale_dtype": args.scale_dtype,
        "group_fallback": args.group_fallback,
    }
    if args.observer is not None:  # else the method's default
        fields["observer"] = args.observer
    if args.bits is not None:
        fields["bits"] = args.bits
    if args.granularity is not None:  # else the method's default (group of 128; channel for smoothquant)
        fields["granularity"] = args.granularity
        fields["group_size"] = (args.group_size or 128) if args.granularity == "group" else None
    elif args.group_size is not None:
        fields["group_size"] = args.group_size
    if args.exclude is not None:
        fields["exclude"] = args.exclude
    config_class = METHODS[args.method].config
    if args.quantize_head:
        default = config_class.model_fields["exclude"].get_default(call_default_factory=True)
        fields["exclude"] = [p for p in fields.get("exclude", default) if p != "lm_head"]
    method_options = {"act_order": args.act_order, "damp": args.damp, "block_size": args.block_size,
                      "scale_search": args.scale_search, "alpha": args.alpha, "weights": args.weights,
                      "calibration": options.calibration_fields(args)}
    fields.update({k: v for k, v in method_options.items() if k in config_class.model_fields})  # the method's own
    fields.update(_activation_fields(args))
    return options.make_config(config_class, fields)


def _activation_fields(args: argparse.Namespace) -> dict:
    if args.activations is None:
        return {}
    kind = args.activations.removeprefix("int8-")
    if args.method == "smoothquant" or (args.method == "rtn" and kind == "dynamic"):
        return {"activations": kind}
    if args.method == "rtn":
        raise UserError("static activation scales need calibration data: use --method smoothquant --activations static")
    raise UserError(f"--activations applies to --method rtn (dynamic) and smoothquant, not {args.method}")


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    config.weight_format()  # validate bits / group size before any work
    act = config.act_format()  # W8A8 needs int8 per-channel or per-tensor weights
    options.check_new_output(args.output)
    if args.eval and args.text is None:
        raise UserError("--eval needs --text FILE to evaluate on")
    options.check_calibration_source(args)
    record = compress(args.model, config, args.output, resume=args.resume, quality_guard=args.quality_guard)
    result = measure(args.output, args.text, args.windows, baseline=args.model) if args.eval else None
    options.write_command_report(args, result)
    if args.json:
        print(to_json({"record": record, "eval": result}, indent=2))
        return 0
    q = record["quantized"]
    sqnr = "exact" if q["mean_sqnr_db"] is None else f"{q['mean_sqnr_db']:.1f} dB"
    print(
        f"wrote {args.output}: {q['layers']} layers quantized to {config.weight_format().name}"
        f"{'' if act is None else f' with {act.name} inputs'} "
        f"({q['bits_per_weight']:.3f} bits/weight, mean SQNR {sqnr}) in {record['wall_time_s']:.1f}s"
    )
    if result is not None:
        print_table(result)
    return 0
