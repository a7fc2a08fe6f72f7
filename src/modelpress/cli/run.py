"""Run a YAML recipe (prune -> heal -> quantize -> export, in the order it gives), measuring every
step: the seed's stage table. Two or more recipes run side by side on the same model.

A rerun of the same command continues where a previous one stopped. See
modelpress.pipeline.yaml_recipe for the recipe's fields.

Example:
    modelpress run recipes/prune-then-quantize.yaml -o runs/ptq
    modelpress run recipes/prune-then-quantize.yaml recipes/quantize-only.yaml -o runs/orders
    modelpress run recipes/int4.yaml --model runs/gemma-3-270m -o runs/gemma-int4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpress.cli import options
from modelpress.cli.plan import wide_console
from modelpress.errors import UserError
from modelpress.pipeline.run import plan_recipe, run_recipe
from modelpress.pipeline.yaml_recipe import load_recipe
from modelpress.report.compare import COLUMNS, comparison_rows
from modelpress.report.html import measured_cells, step_rows, timing_cells
from modelpress.report.page import num, size_text
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help="YAML recipe(s); several run side by side")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="run folder: each stage's output under it (several recipes: one subfolder each); "
                             "rerun the same command to continue an interrupted run")
    options.add_report(parser, "the stage table, memory and roofline on the device, per-layer errors, weights "
                               "before and after, generations")
    parser.add_argument("--plan-only", action="store_true",
                        help="print each step's weight format, bytes, KV cache and fit on the recipe's device from "
                             "the planner's arithmetic, without the weights (the model may be a size such as 70B)")
    parser.add_argument("--model", metavar="MODEL",
                        help="run the recipes on this model (checkpoint folder, .gguf, hub id or, with --plan-only, "
                             "a size) instead of the one they name")
    options.add_json(parser)


def main(args: argparse.Namespace) -> int:
    recipes = [load_recipe(path, model=args.model) for path in args.recipes]  # all checked before any work
    if args.plan_only:
        plans = [plan_recipe(r) for r in recipes]
        if args.json:
            print(to_json(plans[0] if len(plans) == 1 else plans, indent=2))
        else:
            for recipe, plan in zip(recipes, plans):
                print_plan_steps(recipe.path, plan)
        return 0
    if args.output is None:
        raise UserError("give the run folder with -o OUT (or --plan-only for the arithmetic alone)")
    models = {r.model for r in recipes}
    if len(models) > 1:
        raise UserError(f"recipes compared side by side start from one model; these name {', '.join(sorted(models))}")
    if len(recipes) > 1:
        stems = [Path(r.path).stem for r in recipes]
        if len(set(stems)) < len(stems):
            raise UserError("two recipes have the same file name; their runs would share a folder under -o")
        outs = [Path(args.output) / stem for stem in stems]
    else:
        outs = [Path(args.output)]
    records = []
    for recipe, out in zip(recipes, outs):
        records.append(run_recipe(recipe, out, original=records[0]["original"] if records else None))
        if args.report:
            from modelpress.report.html import write_report

            write_report(out, out / "report.html")
    if args.report and len(records) > 1:
        from modelpress.report.compare import write_comparison_report

        write_comparison_report(args.output, Path(args.output) / "report.html")
    if args.json:
        print(to_json(records[0] if len(records) == 1 else records, indent=2))
        return 0
    for record, out in zip(records, outs):
        print_steps(record, out)
    if len(records) > 1:
        print_comparison(records)
    return 0


def print_steps(record: dict, out: Path) -> None:
    """The seed's stage table: step, technique, memory, accuracy impact (this step and cumulative)."""
    from rich.table import Table

    original, steps = record["original"], record["steps"]
    device = next((s.get("device") for s in [original, *steps] if s.get("device")), None)
    t = Table(title=f"{record['recipe']['path']}: {record['recipe']['model']} -> {record['output']}\n"
                    f"ppl-512 on {Path(original['text']).name} ({original['n_windows']} windows); accuracy impact is "
                    "the relative change in perplexity", title_justify="left")
    for col in ("step", "technique", "params", "weights (plan)", "on disk", "bits/param", "ppl", "this step",
                "cumulative", "KL", "top-1"):
        t.add_column(col, justify="left" if col == "technique" else "right")
    if device:
        t.add_column(f"tok/s {device}", justify="right")
    t.add_column("time", justify="right")
    t.add_column("peak RSS", justify="right")
    for step, title, m, impact, cumulative in step_rows(record):
        params, *rest = measured_cells(m, impact, cumulative)
        cells = [step, title, params, size_text(m.get("planner_bytes")), *rest]
        if device:
            cells.append(num(m.get("decode_tok_s"), ",.0f"))
        t.add_row(*cells, *timing_cells(m))
    console = wide_console(220)
    console.print(t)
    console.print(f"record: {out / 'modelpress.json'}")


def print_plan_steps(path: str, plan: dict) -> None:
    """The memory column of the seed's table, from the planner alone."""
    from rich.table import Table

    t = Table(title=f"{path}: {plan['model']} ({plan['params'] / 1e9:,.2f}B parameters) on {plan['device']} "
                    f"({size_text(plan['device_memory'])}), context {plan['context']:,} x batch {plan['batch']}; "
                    "plan only", title_justify="left")
    for col in ("step", "technique", "weights", "KV cache", "needs", f"fits one {plan['device']}", "decode tok/s"):
        t.add_column(col, justify="left" if col == "technique" else "right")
    for r in plan["steps"]:
        kv = "unknown" if r["kv_cache_bytes"] is None else f"{size_text(r['kv_cache_bytes'])} {r['kv_dtype']}"
        t.add_row("+".join(map(str, r["stages"])) or "0", r["title"], f"{size_text(r['weight_bytes'])} {r['format']}",
                  kv, size_text(r["needed_bytes"]), "yes" if r["fits"] else f"no ({r['devices_needed']} needed)",
                  f"{r['decode_tok_s']:,.1f}")
    console = wide_console(220)
    console.print(t)
    for line in [*plan["not_planned"], f"not measured: {plan['not_measured']}"]:
        console.print(f"note: {line}")


def print_comparison(records: list[dict]) -> None:
    """One row per recipe: where each ends."""
    from rich.table import Table

    t = Table(title="recipes side by side (each one's last step)", title_justify="left")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("recipe", "stages") else "right")
    for row in comparison_rows(records):
        t.add_row(*row)
    wide_console(220).print(t)
