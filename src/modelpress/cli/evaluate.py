"""Measure a model: perplexity (ppl-512), and KL divergence / top-1 agreement vs a baseline.

Example:
    modelpress eval out/smollm2-int4 --baseline smollm2-135m --text pride_and_prejudice.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modelpress.cli import options
from modelpress.errors import UserError
from modelpress.eval.compare import measure
from modelpress.eval.kv_cache import KV_CACHE_FORMATS
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, .gguf file or hub id")
    parser.add_argument("--baseline", metavar="MODEL", help="reference model for KL divergence and top-1 agreement")
    parser.add_argument("--kv-cache", choices=KV_CACHE_FORMATS,
                        help="evaluate MODEL with its keys and values quantized as they enter the cache")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="who computes the logits: transformers (default; .gguf files are dequantized), or vLLM "
                             "itself, from $MODELPRESS_VLLM_PYTHON or this Python (ppl and top-1 agreement; vLLM "
                             "returns top log-probabilities only, so no KL)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="with --engine vllm: the activation dtype (vLLM's CPU int4/int8 weight-only kernels "
                             "take bfloat16 or float16 only)")
    options.add_speed(parser)
    options.add_eval_text(parser)
    options.add_json(parser)


def print_table(result: dict, console: Console | None = None) -> None:
    """Before/after table of an eval result."""
    console = console or Console()
    engine = f", {result['engine']} in {result['dtype']}" if result.get("engine") else ""
    table = Table(title=f"{result['protocol']} on {Path(result['text']).name} ({result['n_tokens']} tokens{engine})")
    for col in ("model", "size", "ppl", "Δ ppl", "KL (nats/token)", "top-1 agree"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def mb(n):
        return "-" if n is None else f"{n / 1e6:,.1f} MB"

    notes = [f"{k} {result[k]}" for k in ("activations", "kv_cache") if result.get(k)]
    name = result["model"] + (f" ({', '.join(notes)})" if notes else "")

    if result.get("baseline") is not None:
        table.add_row(result["baseline"], mb(result["baseline_size_bytes"]), f"{result['baseline_ppl']:.3f}", "", "", "")
        delta = 100 * (result["ppl"] / result["baseline_ppl"] - 1)
        table.add_row(
            name, mb(result["size_bytes"]), f"{result['ppl']:.3f}", f"{delta:+.2f}%",
            "-" if result["kl"] is None else f"{result['kl']:.4f}", f"{100 * result['top1_agreement']:.1f}%",
        )
    else:
        table.add_row(name, mb(result["size_bytes"]), f"{result['ppl']:.3f}", "", "", "")
    console.print(table)
    if result.get("schemes"):
        console.print("vLLM ran its Linears as: " + ", ".join(f"{k} x{n}" for k, n in result["schemes"].items()))


def print_speed(speed: dict, console: Console | None = None) -> None:
    """Measured decode speed beside the memory-bound ceiling of this machine."""
    console = console or Console()
    table = Table(title=f"decode, batch 1, {speed['tokens']} tokens ({speed['engine']}); ceiling: this machine's "
                        f"measured read bandwidth {speed['bandwidth'] / 1e9:.1f} GB/s over "
                        f"{speed['bytes_per_token'] / 1e6:,.1f} MB read per token")
    for col in ("measured tok/s", "ceiling tok/s", "fraction of ceiling"):
        table.add_column(col, justify="right")
    table.add_row(f"{speed['decode_tok_s']:.1f}", f"{speed['ceiling_tok_s']:.1f}", f"{100 * speed['fraction']:.0f}%")
    console.print(table)


def main(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        if args.kv_cache or args.speed:
            raise UserError("--engine vllm takes neither --kv-cache nor --speed yet; run vLLM with its own "
                            "--kv-cache-dtype, or drop --engine vllm")
        from modelpress.eval.vllm import vllm_measure

        result = vllm_measure(args.model, args.text, args.windows, args.baseline, dtype=args.dtype)
    else:
        result = measure(args.model, args.text, args.windows, args.baseline, kv_cache=args.kv_cache)
    if args.speed:
        from modelpress.eval.speed import decode_speed, with_ceiling

        result["speed"] = with_ceiling(decode_speed(args.model))
    if args.json:
        print(to_json(result, indent=2))
    else:
        print_table(result)
        if args.speed:
            print_speed(result["speed"])
    return 0
