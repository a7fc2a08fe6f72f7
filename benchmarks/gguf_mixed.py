"""Per-tensor GGUF types chosen by measured sensitivity, against llama.cpp's own mixes at equal bytes.

For each model and llama.cpp file type (``q4_k_m``, ``q3_k_m``...), three files of the same
tensor bytes, all scored by llama.cpp itself (ppl-512 on Pride and Prejudice, the same token ids):

- ``llama.cpp``: its quantizer (``llama_model_quantize`` through llama-cpp-python, what
  ``llama-quantize`` runs; no importance matrix) on the F32 GGUF, with its own per-tensor mix;
- ``llama.cpp imatrix``: llama.cpp's calibrated path, its importance matrix: ``llama-imatrix``
  on the F32 GGUF over the calibration text (Emma, chunks of 512 tokens, as many chunks as
  calibration windows), then ``llama-quantize --imatrix`` (both built from the llama.cpp source
  vendored in llama-cpp-python by ``scripts/setup_llama_tools.sh``);
- ``modelpress gptq``: the same mix, codes chosen by GPTQ on llama.cpp's block grids
  (``export --calibrate gptq``);
- ``modelpress fit``: the types of the decoder Linears, the embedding and an untied output head
  chosen by ``modelpress.fit`` (KL objective, each Linear its own group, llama.cpp's block types
  as candidates) at exactly the mix's bytes, the norms as the mix has them, codes by GPTQ as in
  the row above. Only the types differ.

The sensitivity (GPTQ codes in every candidate type, KL probes with those codes) is measured once
per model and kept in runs/gguf-mixed-bench/. Calibration: calib-128x512 on Emma. Each row runs
alone in its own process under /usr/bin/time (wall seconds, peak RSS).

Usage (from the project root, after scripts/setup.sh; for the imatrix row scripts/setup_llama_tools.sh):
    .venv/bin/python benchmarks/gguf_mixed.py [--models smollm2,gemma3] [--types q4_k_m,q3_k_m]
        [--rows llama.cpp,imatrix,gptq,fit]

Writes benchmarks/results/gguf_mixed.md and .json after every row. Quote ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import austen, model_path, timed  # noqa: E402  (same model prep and timing)
from gguf_export import MP, _version, _weights  # noqa: E402
from mixed import sensitivity  # noqa: E402  (the same sensitivity with probes, here on llama.cpp's types)

from modelpress.data import CALIB_128X512, PPL_512, read_text, token_windows  # noqa: E402

WORK = ROOT / "runs" / "gguf-mixed-bench"
RESULTS = ROOT / "benchmarks" / "results"


def export_one(spec_file: Path) -> None:
    """In a child process: a calibrated GGUF of ``type`` with per-Linear ``overrides``."""
    from modelpress.calibrated_gguf import export_calibrated_gguf
    from modelpress.pipeline.recipe import CalibrationConfig

    spec = json.loads(spec_file.read_text())
    export_calibrated_gguf(spec["src"], spec["out"], spec["type"],
                           CalibrationConfig(text=str(austen("emma.txt")), samples=spec["calib_samples"]),
                           overrides=spec["overrides"])


def imatrix_quantize(f32: Path, out: Path, ftype: str, chunks: int) -> dict:
    """llama.cpp's calibrated path: ``llama-imatrix`` over Emma in ``chunks`` chunks of 512 tokens,
    then ``llama-quantize --imatrix``; wall seconds of both, the larger peak RSS."""
    tools = ROOT / ".cache" / "llama.cpp" / "bin"
    if not (tools / "llama-imatrix").is_file():
        raise SystemExit("the imatrix row needs llama.cpp's tools: bash scripts/setup_llama_tools.sh")
    matrix = out.with_suffix(".imatrix.gguf")
    threads = str(os.cpu_count())
    a = timed([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(austen("emma.txt")), "-c",
               str(CALIB_128X512.seq_len), "--chunks", str(chunks), "--no-ppl", "-t", threads, "-o", str(matrix)])
    b = timed([str(tools / "llama-quantize"), "--imatrix", str(matrix), str(f32), str(out), ftype.upper(), threads])
    matrix.unlink()
    return {"wall_s": a["wall_s"] + b["wall_s"], "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"])}


def render(rows: list[dict], calib_samples: int, windows: int) -> str:
    lines = [f"llama.cpp (llama-cpp-python {_version()}) perplexity, ppl-512 ({windows} windows) on "
             f"pride_and_prejudice.txt; calibration: {calib_samples} x {CALIB_128X512.seq_len} tokens of emma.txt. "
             "Every row of a type has the same tensor bytes; only the types (fit: the decoder Linears', and the "
             "embedding's and output head's in rows that list them) or the codes (imatrix, gptq) differ. Each row "
             "ran alone on the machine.", "",
             "| model | type | tool | Linear types | token_embd / output | tensor MB | bits/weight | llama.cpp ppl | Δ vs f32 | wall s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    floats = {r["model"]: r["ppl"] for r in rows if r["type"] == "f32"}
    # "modelpress fit (Linears only)": fit before the embedding and output head were choices (kept rows)
    tools = ["modelpress", "llama.cpp", "llama.cpp imatrix", "modelpress gptq", "modelpress fit (Linears only)",
             "modelpress fit"]
    for r in sorted(rows, key=lambda r: (r["model"], r["type"] != "f32", r["type"], tools.index(r["tool"]))):
        if r["type"] == "f32":
            lines.append(f"| {r['model']} | F32 | | | | {r['tensor_mb']:.1f} | 32.000 | {r['ppl']:.3f} | | | |")
            continue
        mix = ", ".join(f"{k} {v}" for k, v in r["linear_types"].items())
        ends = " / ".join(r.get("ends", []))  # rows before 2026-12-03 did not record them
        lines.append(f"| {r['model']} | {r['type'].upper()} | {r['tool']} | {mix} | {ends} | {r['tensor_mb']:.1f} | "
                     f"{r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / floats[r['model']] - 1):+.2f}% | "
                     f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--types", default="q4_k_m,q3_k_m")
    parser.add_argument("--rows", default="llama.cpp,imatrix,gptq,fit")
    parser.add_argument("--calib-samples", type=int, default=CALIB_128X512.n_windows)
    parser.add_argument("--windows", type=int, default=PPL_512.n_windows)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: write one file in a child process
    args = parser.parse_args()
    if args.one:
        export_one(Path(args.one))
        return
    import re

    from gguf import GGUFReader

    from modelpress.eval.llamacpp import llama_cpp_ppl
    from modelpress.fit import gguf as fit_gguf
    from modelpress.fit.allocate import allocate
    from modelpress.models import loading

    WORK.mkdir(parents=True, exist_ok=True)
    kinds = set(args.rows.split(","))
    results = RESULTS / "gguf_mixed.json"
    rows = json.loads(results.read_text()) if results.is_file() else []

    def add(row: dict) -> None:
        rows[:] = [r for r in rows if (r["model"], r["type"], r.get("tool")) != (row["model"], row["type"], row.get("tool"))]
        rows.append(row)
        results.write_text(json.dumps(rows, indent=1))
        (RESULTS / "gguf_mixed.md").write_text(render(rows, args.calib_samples, args.windows))
        print(json.dumps(row), flush=True)

    for name in args.models.split(","):
        src = model_path(name)
        ids = token_windows(loading.load_tokenizer(loading.resolve(src)), read_text(austen("pride_and_prejudice.txt")),
                            replace(PPL_512, n_windows=args.windows))
        f32 = WORK / f"{name}-f32.gguf"
        if not f32.is_file():
            timed([MP, "export", str(src), "--to", "gguf", "--format", "f32", "-o", str(f32)])
        add({"model": name, "type": "f32", "tool": "modelpress", "tensor_mb": _weights(f32)[0] / 1e6,
             "ppl": llama_cpp_ppl(f32, ids)})
        sens = sensitivity(name, src, args.calib_samples, fit_gguf.CANDIDATES, fused=False, work=WORK,
                           embeddings=True) if "fit" in kinds else None
        linear_names = [e.gguf_name for e in fit_gguf.layout(str(src), "f32").entries  # the decoder Linears
                        if ".layers." in e.name and len(e.shape) == 2]
        for t in args.types.split(","):
            files = []
            if "llama.cpp" in kinds:
                out = WORK / f"{name}-{t}-llamacpp.gguf"
                code = f"from modelpress.eval.llamacpp import llama_cpp_quantize; llama_cpp_quantize({str(f32)!r}, {str(out)!r}, {t!r})"
                files.append(("llama.cpp", out, lambda out=out, code=code: timed([str(ROOT / ".venv/bin/python"), "-c", code])))
            if "imatrix" in kinds:
                out = WORK / f"{name}-{t}-imatrix.gguf"
                files.append(("llama.cpp imatrix", out, lambda out=out: imatrix_quantize(f32, out, t, args.calib_samples)))
            if "gptq" in kinds:
                out = WORK / f"{name}-{t}-gptq.gguf"
                files.append(("modelpress gptq", out, lambda out=out: timed([
                    MP, "export", str(src), "--to", "gguf", "--format", t, "--calibrate", "gptq", "--calib",
                    str(austen("emma.txt")), "--calib-samples", str(args.calib_samples), "-o", str(out)])))
            if sens is not None:
                sens.fixed_bytes = fit_gguf.fixed_bytes(str(src), t, set(sens.linears))
                budget = sens.bytes_of(fit_gguf.mix_choice(str(src), t, sens.linears))
                choice = allocate(sens, budget, "kl")
                floats = fit_gguf.float_types(str(src))
                out = WORK / f"{name}-{t}-fit.gguf"
                spec = {"src": str(src), "out": str(out), "type": t, "calib_samples": args.calib_samples,
                        "overrides": {re.escape(n): floats[n] if f == "keep" else f for n, f in choice.items()}}
                spec_file = WORK / f"{name}-{t}-fit.json"
                spec_file.write_text(json.dumps(spec))
                files.append(("modelpress fit", out, lambda spec_file=spec_file: timed(
                    [sys.executable, __file__, "--one", str(spec_file)])))
            for tool, out, make in files:
                out.unlink(missing_ok=True)
                stats = make()
                nbytes, numel = _weights(out)
                types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(out).tensors}
                linear = Counter(types[g] for g in linear_names)
                add({"model": name, "type": t, "tool": tool, "tensor_mb": nbytes / 1e6,
                     "bits_per_weight": 8 * nbytes / numel, "linear_types": dict(linear.most_common()),
                     "ends": [types[g] for g in ("token_embd.weight", "output.weight") if g in types],
                     "ppl": llama_cpp_ppl(out, ids), **stats})
                out.unlink()
    print((RESULTS / "gguf_mixed.md").read_text())


if __name__ == "__main__":
    main()
