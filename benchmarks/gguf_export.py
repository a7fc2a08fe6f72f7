"""GGUF side by side: llama.cpp's own quantizer vs modelpress (plain and GPTQ-calibrated), scored by llama.cpp.

For each model, the float32 checkpoint is written as an F32 GGUF (modelpress), which is
llama.cpp's quantizer input (``llama_model_quantize`` through llama-cpp-python, what
``llama-quantize`` runs; no importance matrix). modelpress writes the same file types straight from the
checkpoint, plain (round to nearest, llama.cpp's encoder) and calibrated (``--calibrate gptq``:
GPTQ codes on llama.cpp's block grids, calibration windows from Emma). Every file is scored by
llama.cpp itself: ppl-512 on Pride and Prejudice, the same token ids for all. Each conversion
runs in its own process under /usr/bin/time (wall seconds, peak RSS).

Usage (from the project root, after scripts/setup.sh):
    .venv/bin/python benchmarks/gguf_export.py [--models smollm2,gemma3] [--types q4_0,q4_k_m,q3_k_m]
        [--calib-samples 128] [--windows 40]

Writes benchmarks/results/gguf.md and .json. Quote ratios: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import austen, model_path, timed  # noqa: E402  (same model prep and timing)

from modelpress.data import CALIB_128X512, PPL_512, read_text, token_windows  # noqa: E402
from modelpress.eval.llamacpp import llama_cpp_ppl  # noqa: E402
from modelpress.models import loading  # noqa: E402

MP = str(ROOT / ".venv/bin/modelpress")


def _weights(path: Path) -> tuple[int, int]:
    """(tensor bytes, weights) of a GGUF file: bits/weight as llama.cpp reports it."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


def run(models: list[str], types: list[str], calib_samples: int, windows: int, work: Path) -> list[dict]:
    rows = []
    for name in models:
        src = model_path(name)
        tokenizer = loading.load_tokenizer(loading.resolve(src))
        ids = token_windows(tokenizer, read_text(austen("pride_and_prejudice.txt")), replace(PPL_512, n_windows=windows))
        f32 = work / f"{name}-f32.gguf"
        stats = timed([MP, "export", str(src), "--to", "gguf", "--format", "f32", "-o", str(f32)])
        runs = [("modelpress", "f32", f32, stats)]
        for t in types:
            ref = work / f"{name}-{t}-llamacpp.gguf"
            code = f"from modelpress.eval.llamacpp import llama_cpp_quantize; llama_cpp_quantize({str(f32)!r}, {str(ref)!r}, {t!r})"
            runs.append(("llama.cpp", t, ref, timed([str(ROOT / ".venv/bin/python"), "-c", code])))
            plain = work / f"{name}-{t}-modelpress.gguf"
            runs.append(("modelpress", t, plain, timed([MP, "export", str(src), "--to", "gguf", "--format", t,
                                                        "-o", str(plain)])))
            cal = work / f"{name}-{t}-modelpress-gptq.gguf"
            runs.append(("modelpress gptq", t, cal, timed([MP, "export", str(src), "--to", "gguf", "--format", t,
                                                           "--calibrate", "gptq", "--calib", str(austen("emma.txt")),
                                                           "--calib-samples", str(calib_samples), "-o", str(cal)])))
        for tool, t, path, stats in runs:
            nbytes, numel = _weights(path)
            row = {"model": name, "tool": tool, "type": t, "file_mb": path.stat().st_size / 1e6,
                   "bits_per_weight": 8 * nbytes / numel, "ppl": llama_cpp_ppl(path, ids), **stats}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | type | file MB | bits/weight | llama.cpp ppl | Δ vs f32 | wall s | peak RSS MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    floats = {r["model"]: r["ppl"] for r in rows if r["type"] == "f32"}
    for r in rows:
        delta = "" if r["type"] == "f32" else f"{100 * (r['ppl'] / floats[r['model']] - 1):+.2f}%"
        lines.append(f"| {r['model']} | {r['tool']} | {r['type'].upper()} | {r['file_mb']:.1f} | {r['bits_per_weight']:.3f} | "
                     f"{r['ppl']:.3f} | {delta} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--types", default="q4_0,q4_k_m,q3_k_m")
    parser.add_argument("--calib-samples", type=int, default=CALIB_128X512.n_windows)
    parser.add_argument("--windows", type=int, default=PPL_512.n_windows)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-gguf"))
    parser.add_argument("--out", default="gguf", help="results name under benchmarks/results (default gguf)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = run(args.models.split(","), args.types.split(","), args.calib_samples, args.windows, work)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(rows, indent=2))
    md = (f"llama.cpp (llama-cpp-python {_version()}) perplexity, ppl-512 ({args.windows} windows) on pride_and_prejudice.txt; "
          f"calibration: {args.calib_samples} x {CALIB_128X512.seq_len} tokens of emma.txt\n\n{table(rows)}\n")
    (out / f"{args.out}.md").write_text(md)
    print(md)


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


if __name__ == "__main__":
    main()
