"""Decode speed on this machine beside its memory-bound ceiling: how far an engine is from the limit.

For each model and GGUF file type, modelpress writes the file (``export --to gguf``, plain
llama.cpp encoding: speed depends on the tensor types, not on the codes) and llama.cpp decodes
with it (``modelpress.eval.speed``: batch 1, a one-token prompt, 64 tokens, every core), best of
three runs. The ceiling is this machine's streaming-read bandwidth (``plan --hardware local``:
the best of several sums over a 256 MB tensor) over the bytes one decode step reads (every tensor
but an untied input embedding). The float checkpoint in transformers is measured the same way
for comparison.

Usage (from the project root, after scripts/setup.sh):
    .venv/bin/python benchmarks/speed.py [--models smollm2,gemma3] [--types q4_k_m,q8_0,f16] [--repeats 3]

Writes benchmarks/results/speed.md and .json. Run it alone on the machine: decode speed is the
first thing another process on the cores takes away. Quote the fractions, not the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import RESULTS, model_path  # noqa: E402  (same model prep)

from modelpress.cli import main as modelpress  # noqa: E402
from modelpress.eval.speed import decode_speed, with_ceiling  # noqa: E402


def best_of(model: str, repeats: int) -> dict:
    runs = [decode_speed(model) for _ in range(repeats)]
    return max(runs, key=lambda r: r["decode_tok_s"])


def row(name: str, kind: str, speed: dict) -> dict:
    """One table row: the speed beside this machine's ceiling (``eval --speed``'s arithmetic)."""
    s = with_ceiling(speed)
    return {"model": name, "type": kind, "engine": s["engine"], "mb_per_token": s["bytes_per_token"] / 1e6,
            "decode_tok_s": s["decode_tok_s"], "ceiling_tok_s": s["ceiling_tok_s"], "fraction": s["fraction"],
            "bandwidth": s["bandwidth"]}


def render(rows: list[dict], bandwidth: float) -> str:
    lines = [f"Decode tokens/s (batch 1, 64 tokens, best of the runs) on this machine, beside the memory-bound "
             f"ceiling: measured read bandwidth {bandwidth / 1e9:.1f} GB/s over the bytes one step reads. "
             "Each row ran alone on the machine.", "",
             "| model | file | engine | MB read per token | measured tok/s | ceiling tok/s | fraction of ceiling |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['type']} | {r['engine']} | {r['mb_per_token']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['ceiling_tok_s']:.1f} | {r['fraction']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--types", default="q4_k_m,q8_0,f16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="skip the float checkpoint in transformers")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            src = model_path(name)
            for t in args.types.split(","):
                out = Path(tmp) / f"{name}-{t}.gguf"
                if modelpress(["export", str(src), "--to", "gguf", "--format", t, "-o", str(out)]) != 0:
                    raise SystemExit(f"export of {name} to {t} failed")
                rows.append(row(name, t.upper(), best_of(str(out), args.repeats)))
                out.unlink()
                print(json.dumps(rows[-1]), flush=True)
            if not args.no_transformers:
                rows.append(row(name, "safetensors (float32)", best_of(str(src), args.repeats)))
                print(json.dumps(rows[-1]), flush=True)
    bandwidth = rows[0]["bandwidth"]  # measured once per process (plan --hardware local)
    (RESULTS / "speed.json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    (RESULTS / "speed.md").write_text(render(rows, bandwidth))
    print(render(rows, bandwidth))


if __name__ == "__main__":
    main()
