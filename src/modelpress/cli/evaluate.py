"""Measure a model: perplexity (ppl-512), and KL divergence / top-1 agreement vs a baseline.

Example:
    modelpress eval out/smollm2-int4 --baseline smollm2-135m --text pride_and_prejudice.txt
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modelpress.cli import options
from modelpress.data import PPL_512, read_text, token_windows
from modelpress.errors import UserError
from modelpress.eval.fake_quant import activation_fake_quant, checkpoint_input_quant
from modelpress.eval.kv_cache import KV_CACHE_FORMATS, check_kv_format
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, .gguf file or hub id")
    parser.add_argument("--baseline", metavar="MODEL", help="reference model for KL divergence and top-1 agreement")
    parser.add_argument("--kv-cache", choices=KV_CACHE_FORMATS,
                        help="evaluate MODEL with its keys and values quantized as they enter the cache")
    options.add_eval_text(parser)
    options.add_json(parser)


def size_on_disk(source: loading.ModelSource) -> int | None:
    """Bytes of the weight files (safetensors shards or the GGUF file); None for a hub id."""
    if source.kind == "gguf":
        return Path(source.path).stat().st_size
    if source.kind == "folder":
        return sum(p.stat().st_size for p in source.safetensors_files())
    return None


def run_eval(model: str, text: str | None, windows: int, baseline: str | None = None,
             kv_cache: str | None = None) -> dict:
    """Evaluate ``model`` (and compare with ``baseline``) on ``text``; plain-data result.

    A W8A8 checkpoint is evaluated with its Linear inputs fake-quantized the engine's way
    (:mod:`modelpress.eval.fake_quant`); ``kv_cache`` (``int8``/``fp8``) quantizes its KV cache.
    """
    if text is None:
        raise UserError("no evaluation text: pass --text FILE (UTF-8 .txt or .jsonl)")
    source = loading.resolve(model)
    base_source = loading.resolve(baseline) if baseline else None
    raw = read_text(text)
    tokenizer = loading.load_tokenizer(source)
    ids = token_windows(tokenizer, raw, replace(PPL_512, n_windows=windows))
    protocol = PPL_512.name if windows == PPL_512.n_windows else f"{PPL_512.name} (first {len(ids)} windows)"
    if base_source is not None:
        base_ids = token_windows(loading.load_tokenizer(base_source), raw, replace(PPL_512, n_windows=windows))
        if not (base_ids.shape == ids.shape and (base_ids == ids).all()):
            raise UserError("the model and the baseline tokenize the text differently; compare models that share a tokenizer")
    if kv_cache is not None:
        check_kv_format(kv_cache)
    loaded = loading.load_model(source)
    inputs = checkpoint_input_quant(loaded)
    with activation_fake_quant(loaded, inputs):
        result = evaluate(
            loaded,
            ids,
            baseline=loading.load_model(base_source) if base_source else None,
            protocol=protocol,
            kv_cache=kv_cache,
        )
    if not math.isfinite(result.ppl):
        raise UserError(f"perplexity of {model} is {result.ppl}: its outputs overflow or are NaN; "
                        "evaluate it in float32, or check the weights")
    result.activations = ", ".join(sorted({q.fmt.name for q in inputs.values()})) or None
    out = {"text": str(text), "model": model, "size_bytes": size_on_disk(source), **result.to_dict()}
    if base_source is not None:
        out["baseline"] = baseline
        out["baseline_size_bytes"] = size_on_disk(base_source)
    return out


def print_table(result: dict, console: Console | None = None) -> None:
    """Before/after table of an eval result."""
    console = console or Console()
    table = Table(title=f"{result['protocol']} on {Path(result['text']).name} ({result['n_tokens']} tokens)")
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
            f"{result['kl']:.4f}", f"{100 * result['top1_agreement']:.1f}%",
        )
    else:
        table.add_row(name, mb(result["size_bytes"]), f"{result['ppl']:.3f}", "", "", "")
    console.print(table)


def main(args: argparse.Namespace) -> int:
    result = run_eval(args.model, args.text, args.windows, args.baseline, kv_cache=args.kv_cache)
    if args.json:
        print(to_json(result, indent=2))
    else:
        print_table(result)
    return 0
