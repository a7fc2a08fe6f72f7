"""modelpress vs llm-compressor pruning, side by side: same models, calibration ids and evaluation.

For each model, method (magnitude, wanda, sparsegpt) and pattern (50% unstructured, 4:8, 2:4),
both tools prune the same float32 checkpoint with the same calibration token windows (protocol
calib-128x512 on Emma), each in its own process timed by /usr/bin/time; the sparsity is counted
in the written tensors of the decoder Linears, and both outputs are evaluated by the same code
(ppl-512 on Pride and Prejudice).

Usage (from the project root, after scripts/setup.sh and scripts/setup_bench.sh):
    .venv/bin/python benchmarks/pruning.py [--models smollm2,gemma3] [--methods magnitude,wanda,sparsegpt]
        [--patterns 0.5,4:8,2:4] [--tools modelpress,llm-compressor] [--calib-samples 128] [--windows 40]
        [--structured mlp-0.75,heads-0.75,drop-4,drop-4-angular]

Structured rows (``--structured``; modelpress only, since llm-compressor has no structured pruning)
add the parameter count and the file size of the smaller checkpoint; no healing.

Writes benchmarks/results/pruning.md and .json after every row (pruning-SxW.* for another
protocol); rows accumulate across runs like the calibrated benchmark's. Take each row alone on
the machine: two torch processes on two cores slow each other 4-5x.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import RESULTS, Table, add_common_arguments, model_path, perplexity, protocol_line, scratch, timed  # noqa: E402
from conftest import austen  # noqa: E402  (on the path through calibrated)

from modelpress.data import CALIB_128X512, PPL_512, read_text, token_windows  # noqa: E402
from modelpress.models import loading  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measured_sparsity(folder: Path) -> float:
    """Zeros among the decoder Linears' weights, counted in the written safetensors."""
    zeros = total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if ".layers." in name and name.removesuffix(".weight").endswith(LINEARS) and name.endswith(".weight"):
                    t = f.get_tensor(name)
                    zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    return zeros / total if total else 0.0


def caption(protocol: dict) -> str:
    return (f"{protocol_line(protocol)} Both tools prune every decoder Linear (lm_head kept dense); magnitude: "
            "modelpress per layer, llm-compressor's MagnitudePruningModifier; wanda: per output row; sparsegpt: "
            "adaptive masks per 128 columns, damping 0.01. Sparsity is counted in the written tensors. Dense "
            "checkpoints: the zeros save no bytes. Wall times of rows measured beside other work are not comparable")


def render(rows: list[dict]) -> str:
    lines = ["| model | tool | method | pattern | sparsity | params | file MB | ppl | Δ vs float | wall s | peak RSS MB "
             "| measured |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    floats = {r["model"]: r["ppl"] for r in rows if r["tool"] == "float32"}
    for r in rows:
        if r["model"] not in floats:
            continue
        delta = "" if r["tool"] == "float32" else f"{100 * (r['ppl'] / floats[r['model']] - 1):+.2f}%"
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        sparsity = f"{100 * r['sparsity']:.1f}%" if "sparsity" in r else ""
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        size = f"{r['file_mb']:.0f}" if "file_mb" in r else ""
        lines.append(f"| {r['model']} | {r['tool']} | {r['method']} | {r.get('pattern', '')} | {sparsity} | {params} | "
                     f"{size} | {r['ppl']:.3f} | {delta} | {wall} | {rss} | {r.get('measured', '')} |")
    return "\n".join(lines)


def _pattern_flags(pattern: str) -> list[str]:
    return ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]


# structured rows (modelpress only: llm-compressor has no structured pruning): name -> prune flags
STRUCTURED = {
    "mlp-0.75": ["--mlp-keep", "0.75"],
    "heads-0.75": ["--heads-keep", "0.75"],
    "heads-0.5": ["--heads-keep", "0.5"],
    "drop-4": ["--drop-layers", "4"],
    "drop-4-angular": ["--drop-layers", "4", "--layer-metric", "angular"],
}


def file_stats(folder: Path) -> dict:
    """Parameters and bytes of the written safetensors (every tensor, embeddings included)."""
    params = nbytes = 0
    for shard in folder.glob("*.safetensors"):
        nbytes += shard.stat().st_size
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                params += math.prod(f.get_slice(name).get_shape())
    return {"params": params, "file_mb": nbytes / 2**20}


def run_structured(name: str, src: Path, specs: list[str], calib_samples: int, eval_file: Path, work: Path,
                   results: Table) -> None:
    emma = austen("emma.txt")
    for spec in specs:
        out = work / f"{name}-structured-{spec}"
        stats = timed([str(ROOT / ".venv/bin/modelpress"), "prune", str(src), "--method", "structured",
                       *STRUCTURED[spec], "--calib", str(emma), "--calib-samples", str(calib_samples), "-o", str(out),
                       "--no-quality-guard"])
        results.add({"model": name, "tool": "modelpress", "method": f"structured {spec}", "pattern": spec,
                     **file_stats(out), "ppl": perplexity(out, eval_file), **stats})
        shutil.rmtree(out)


def run(models, methods, patterns, tools, calib_samples, windows, work: Path, results: Table,
        structured: list[str] = ()) -> None:
    emma = austen("emma.txt")
    for name in models:
        src = model_path(name)
        tokenizer = loading.load_tokenizer(loading.resolve(src))
        calib = token_windows(tokenizer, read_text(emma), replace(CALIB_128X512, n_windows=calib_samples))
        ids_file = work / f"{name}-calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, ids_file)
        evaluation = token_windows(tokenizer, read_text(austen("pride_and_prejudice.txt")),
                                   replace(PPL_512, n_windows=windows))
        eval_file = work / f"{name}-eval.safetensors"
        save_file({"input_ids": evaluation.contiguous()}, eval_file)
        results.add({"model": name, "tool": "float32", "method": "-", "ppl": perplexity(src, eval_file),
                     **file_stats(src)})
        if structured:
            run_structured(name, src, structured, calib_samples, eval_file, work, results)
        for method in methods:
            for pattern in patterns:
                runs = []
                if "modelpress" in tools:
                    out = work / f"{name}-{method}-{pattern.replace(':', 'of')}-modelpress"
                    runs.append(("modelpress", out, ".venv", [
                        str(ROOT / ".venv/bin/modelpress"), "prune", str(src), "--method", method,
                        *_pattern_flags(pattern), "--calib", str(emma), "--calib-samples", str(calib_samples),
                        "-o", str(out), "--no-quality-guard"]))
                if "llm-compressor" in tools and not (method == "magnitude" and ":" in pattern):  # none in it
                    out = work / f"{name}-{method}-{pattern.replace(':', 'of')}-llmcompressor"
                    runs.append(("llm-compressor", out, ".venv-bench", [
                        str(ROOT / ".venv-bench/bin/python"), str(ROOT / "benchmarks/llmcompressor_prune_side.py"),
                        str(src), str(out), method, pattern, str(ids_file)]))
                for tool, out, venv, cmd in runs:
                    stats = timed(cmd)
                    results.add({"model": name, "tool": tool, "method": f"{method} {pattern}", "pattern": pattern,
                                 "sparsity": measured_sparsity(out), "ppl": perplexity(out, eval_file, venv), **stats})
                    shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "prune-bench")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default="0.5,4:8,2:4")
    parser.add_argument("--structured", default="", help=f"structured rows, comma-separated: {', '.join(STRUCTURED)}")
    args = parser.parse_args()
    work = scratch(args.work)
    results = Table(args.calib_samples, args.windows, args.fresh, stem="pruning", caption=caption, render=render)
    run(args.models.split(","), [m for m in args.methods.split(",") if m], args.patterns.split(","), args.tools.split(","),
        args.calib_samples, args.windows, work, results, [s for s in args.structured.split(",") if s])
    print((RESULTS / f"{results.stem}.md").read_text())


if __name__ == "__main__":
    main()
