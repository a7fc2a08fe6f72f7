"""``modelpress fit`` at several memory budgets: what it chooses, how big, and what it costs.

For each model, ``modelpress fit`` as a user runs it (default candidates of ``--engine vllm``,
GPTQ, calib-128x512 on Emma), measured on held-out text (ppl-512 on Pride and Prejudice):

- weights-only budgets at 3.25, 3.5, 4.0 and 4.5 bits per decoder-Linear weight (the budget in
  bytes: every other tensor as stored, plus that many bits per Linear weight): the points of the
  mixed-precision curve, and the uniform format fit measures beside each;
- ``--device`` rows: a device-style target (memory, context, batch), where the KV cache takes
  part of the memory and fit also weighs an fp8 cache against more bits for the weights.

The first fit of a model measures the sensitivity; each later one reuses the fit before it
(``--sensitivity-from``): its sensitivity, and any candidate it measured with the same recipe,
which is not run again. So the wall time of a row is what that fit cost after the ones above it. Each fit runs alone, under /usr/bin/time.

Usage (from the project root, after scripts/setup.sh):
    .venv/bin/python benchmarks/fit_budgets.py [--models smollm2,gemma3] [--bits 3.25,3.5,4.0,4.5]
        [--device "600MB:4096:4"] [--uniform 1]

Writes benchmarks/results/fit_budgets.md and .json after every fit. Quote ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from calibrated import RESULTS, model_path, timed  # noqa: E402
from conftest import austen  # noqa: E402
from gguf_export import MP  # noqa: E402

WORK = ROOT / "runs" / "fit-bench"


def linear_split(src: Path) -> tuple[int, int]:
    """(decoder-Linear weights, bytes of every other tensor as stored), from the safetensors headers:
    a budget of ``b`` bits per Linear weight is ``other + b * weights / 8`` bytes."""
    from modelpress.fit.search import header_bytes
    from modelpress.models import loading

    source = loading.resolve(str(src))
    headers = loading.tensor_headers(source)
    linear = {n for n, (shape, _) in headers.items() if ".layers." in n and n.endswith(".weight") and len(shape) == 2}
    stored = header_bytes(source)
    return sum(math.prod(headers[n][0]) for n in linear), sum(b for n, b in stored.items() if n not in linear)


def row_of(model: str, label: str, out: Path, stats: dict, n_linear: int, other: int) -> dict:
    record = json.loads((out / "fit.json").read_text())
    winner = next(c for c in record["candidates"] if c["name"] == record["winner"])
    written = record["check"]["written_tensor_bytes"]
    return {"model": model, "budget": label, "budget_weights_bytes": record["budget"]["weights"],
            "kv_cache_bytes": record["budget"]["kv_cache"], "winner": record["winner"], "mix": winner["mix"],
            "kv_dtype": record["check"]["kv_dtype"], "written_bytes": written,
            "bits_per_weight": 8 * (written - other) / n_linear,
            "ppl": winner["ppl"], "kl": winner["kl"], "original_ppl": record["original"]["ppl"],
            "candidates": [{k: c.get(k) for k in ("name", "bytes", "ppl", "kl", "kv_dtype", "measured_in")}
                           for c in record["candidates"]],
            "sensitivity_reused": "reused_from" in record["sensitivity"], **stats}


def render(rows: list[dict]) -> str:
    lines = ["`modelpress fit` (engine vllm, default candidates, GPTQ; calib-128x512 on Emma; measured by ppl-512 "
             "over 40 windows of Pride and Prejudice, KL against the float model on the same windows). Bits/weight: "
             "the written decoder Linears' bytes (codes, scales, shapes) per Linear weight. Candidates in brackets "
             "were measured by an earlier fit of the same model (same recipe), not run again. Each fit ran alone.", "",
             "| model | budget (weights) | KV cache | candidates: ppl | winner | bits/weight | written MB | ppl | Δ vs float | KL | wall s | peak RSS MB |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["kv_cache_bytes"] > 0, r["budget_weights_bytes"])):
        cands = ", ".join((f"[{c['name']}" if c.get("measured_in") else c["name"]) + f" {c['ppl']:.3f}"
                          + ("]" if c.get("measured_in") else "") for c in r["candidates"] if c["ppl"] is not None)
        winner = r["winner"] + ("" if r["kv_dtype"] in ("fp16", "bf16") else f" (KV {r['kv_dtype']})")
        mix = ", ".join(f"{f} {n}" for f, n in r["mix"].items())
        kv = f"{r['kv_cache_bytes'] / 1e6:.0f} MB" if r["kv_cache_bytes"] else ""
        lines.append(f"| {r['model']} | {r['budget']}: {r['budget_weights_bytes'] / 1e6:.1f} MB | {kv} | {cands} | "
                     f"{winner}: {mix} | {r['bits_per_weight']:.3f} | {r['written_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / r['original_ppl'] - 1):+.2f}% | {r['kl']:.4f} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--bits", default="3.25,3.5,4.0,4.5", help="weights-only budgets, bits per Linear weight")
    parser.add_argument("--device", default="", help="comma-separated MEMORY:CONTEXT:BATCH targets, e.g. 600MB:4096:4")
    parser.add_argument("--uniform", type=int, default=1, help="fit --uniform (uniform formats measured beside)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = RESULTS / "fit_budgets.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    calib = ["--calib", str(austen("emma.txt")), "--text", str(austen("pride_and_prejudice.txt")), "--windows", "40",
             "--uniform", str(args.uniform)]
    for name in args.models.split(","):
        src = model_path(name)
        n_linear, other = linear_split(src)
        targets = [(f"{b} bits", ["--memory", f"{int(other + float(b) * n_linear / 8)}B", "--weights-only"])
                   for b in args.bits.split(",") if b]
        for d in filter(None, args.device.split(",")):
            memory, context, batch = d.split(":")
            targets.append((f"{memory}, context {context} x batch {batch}",
                            ["--memory", memory, "--context", context, "--batch", batch]))
        previous = None  # each fit reuses the one before: its sensitivity, and the candidates it measured
        for label, target in targets:
            out = WORK / f"{name}-{label.replace(' ', '_').replace(',', '').replace(':', '')}"
            if out.exists() and (out / "fit.json").is_file():  # done by an earlier invocation
                previous = out
                continue
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            reuse = ["--sensitivity-from", str(previous)] if previous else []
            stats = timed([MP, "fit", str(src), *target, "-o", str(out), *calib, *reuse], log=WORK / f"{out.name}.log")
            previous = out
            row = row_of(name, label, out, stats, n_linear, other)
            rows[:] = [r for r in rows if (r["model"], r["budget"]) != (name, label)] + [row]
            results.write_text(json.dumps(rows, indent=1))
            (RESULTS / "fit_budgets.md").write_text(render(rows))
            print(json.dumps(row), flush=True)
    print((RESULTS / "fit_budgets.md").read_text())


if __name__ == "__main__":
    main()
