"""Fit a model to a device: the least measured loss within its memory, mixed precision included.

The budget comes from the planner (device memory less the engine's reserve, the KV cache at
--context x --batch and activations; --weights-only: the size itself). Every Linear's error in
every candidate format is measured in one layer pass, priced in KL by short probes, and a
per-Linear allocation at the budget is measured for real against the best uniform formats that
fit. The winner is written to OUT (a compressed-tensors checkpoint; with --engine llama.cpp,
OUT/model.gguf with a block type per tensor) with OUT/fit.json (every candidate, its size
and measured loss) and OUT/recipe.yaml (the winner, for `modelpress run`).

Example:
    modelpress fit smollm2-135m/ --memory 200MB --weights-only -o smollm2-fit
    modelpress fit llama-3.1-8b/ --target rtx4090 --context 8192 --batch 4 -o llama-4090
    modelpress fit smollm2-135m/ --memory 100MB --weights-only --engine llama.cpp -o smollm2-gguf
    modelpress fit smollm2-135m/ --memory 160MB --weights-only --sensitivity-from smollm2-fit -o smollm2-160
"""

from __future__ import annotations

import argparse

from modelpress.cli import options
from modelpress.cli.plan import wide_console
from modelpress.errors import UserError
from modelpress.plan.memory import KV_BYTES
from modelpress.record import to_json
from modelpress.report.page import num, size_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_output(parser)
    t = parser.add_argument_group("target")
    t.add_argument("--target", metavar="DEVICE", help="a catalogue device (see plan --list-hardware), e.g. rtx4090")
    t.add_argument("--memory", metavar="SIZE", help="device memory for a device not in the catalogue: 12GB, 24GiB...")
    t.add_argument("--context", type=options.positive_int, default=4096, metavar="N", help="tokens per sequence (default 4096)")
    t.add_argument("--batch", type=options.positive_int, default=1, metavar="N", help="concurrent sequences (default 1)")
    t.add_argument("--kv-dtype", choices=sorted(KV_BYTES), default="fp16", help="KV-cache element type (default fp16)")
    t.add_argument("--weights-only", action="store_true",
                   help="the budget is the weights' bytes alone (e.g. to match a file size): no KV cache, no reserve")
    t.add_argument("--engine", choices=["vllm", "transformers", "llama.cpp"], default="vllm",
                   help="the engine the output is for: which formats are candidates (default vllm); llama.cpp "
                        "writes a GGUF file with a block type per tensor")
    t.add_argument("--gguf-base", default="q4_k_m", metavar="TYPE",
                   help="llama.cpp: the file type whose types the tensors other than the Linears, embedding "
                        "and output head take: norms (default q4_k_m)")
    t.add_argument("--formats", metavar="LIST", help="comma-separated candidate formats instead of the engine's")
    s = parser.add_argument_group("search")
    s.add_argument("--uniform", type=int, default=2, metavar="N",
                   help="uniform formats measured beside the mixed allocation (default 2, the best predicted)")
    s.add_argument("--sensitivity", choices=["gptq", "rtn"], default="gptq",
                   help="codes the per-Linear errors are measured with (default gptq, as written; rtn is cheaper)")
    s.add_argument("--sensitivity-from", metavar="FIT_OUT",
                   help="reuse an earlier fit's measured sensitivity (its output folder) instead of a new layer "
                        "pass: same model, formats, --sensitivity and calibration; to fit one model to several budgets")
    s.add_argument("--probe-windows", type=options.positive_int, default=2, metavar="N",
                   help="calibration windows per KL probe (default 2)")
    options.add_eval_text(parser)  # default: the calibration text past the windows calibration reads
    options.add_calibration(parser, "calibration (protocol calib-128x512 by default)")
    options.add_report(parser, "budget, candidates, sensitivity and allocation maps")
    options.add_speed(parser, "the winner")
    options.add_json(parser)


def main(args: argparse.Namespace) -> int:
    from modelpress.cli.plan import load_shape
    from modelpress.export.gguf_mix import file_type
    from modelpress.fit.search import budget_for, fit_model
    from modelpress.pipeline.recipe import GPTQConfig

    options.check_new_output(args.output)
    options.check_calibration_source(args)
    shape = load_shape(args.model)
    budget = budget_for(shape, args.target, args.memory, args.context, args.batch, args.kv_dtype, args.weights_only)
    if budget.weights <= 0:
        raise UserError(f"{budget.device} has no room for weights: the KV cache ({size_text(budget.kv_cache)} at "
                        f"{args.context} x {args.batch}) and activations take it all; lower --context or --batch")
    config = options.make_config(GPTQConfig, {"calibration": options.calibration_fields(args)})
    formats = None if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    record = fit_model(args.model, args.output, budget, config, engine=args.engine, formats=formats,
                       eval_text=args.text, windows=args.windows,
                       probe_windows=args.probe_windows, n_uniform=args.uniform, sensitivity_method=args.sensitivity,
                       report=args.report, gguf_base=file_type(args.gguf_base), speed=args.speed,
                       sensitivity_from=args.sensitivity_from)
    if args.json:
        print(to_json(record, indent=2))
        return 0
    print_fit(record, args.output)
    if record.get("speed"):
        from modelpress.cli.evaluate import print_speed

        print_speed(record["speed"])
    return 0


def print_fit(record: dict, out: str) -> None:
    from rich.table import Table

    b = record["budget"]
    title = (f"{record['model']} on {b['device']}: weights may take {size_text(b['weights'])}"
             + ("" if b["weights_only"] else f" (context {b['context']:,} x batch {b['batch']}, KV {size_text(b['kv_cache'])})"))
    t = Table(title=title, title_justify="left")
    for col in ("candidate", "formats", "bytes", "predicted KL", "ppl", "KL", "top-1", ""):
        t.add_column(col, justify="left" if col in ("candidate", "formats", "") else "right")
    for c in record["candidates"]:
        mix = ", ".join(f"{n} {f}" for f, n in c["mix"].items())
        t.add_row(c["name"], mix, size_text(c["bytes"]), num(c.get("predicted_kl"), ".4f"), num(c.get("ppl"), ".3f"),
                  num(c.get("kl"), ".4f"), num(c.get("top1_agreement"), ".1%"),
                  " ".join(filter(None, ["winner" if c["name"] == record["winner"] else "",
                                         "(measured by the earlier fit)" if c.get("measured_in") else ""])))
    console = wide_console(200)
    console.print(t)
    check = record["check"]
    console.print(f"wrote {out}: {size_text(check['written_tensor_bytes'])} of tensors, within the budget of "
                  f"{size_text(check['budget_weights_bytes'])}; candidates in {out}/fit.json")
