"""Every output kind of modelpress in vLLM itself, beside our own evaluator: what runs where.

For each model, modelpress writes each output kind (a float ``export --to hf``, a structurally
pruned model, W8A8, int4 g64 weight-only, and the float formats FP8 / NVFP4 / MXFP4), then one
vLLM process (``modelpress.eval.vllm``) loads each, scores the ``ppl-512`` windows and reports
the compressed-tensors scheme and kernel it ran every Linear with. Where vLLM has no kernel for
a format on this machine, the row says so and gives the scheme its config reader maps the
checkpoint to (what a GPU would run). Our evaluator (transformers, float32) scores the same
checkpoint on the same windows, so the ratio is engine against engine on identical weights.

Usage (from the project root, after scripts/setup.sh and scripts/setup_vllm.sh):
    MODELPRESS_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python benchmarks/vllm_check.py \
        [--models smollm2,gemma3] [--windows 40] [--kinds float,structured,w8a8,w4a16,fp8,nvfp4,mxfp4] [--tag cpu]

On a machine with a GPU and vLLM's GPU build, point MODELPRESS_VLLM_PYTHON at that Python and
pass ``--tag gpu --dtype bfloat16``: the same rows, run on the kernels a GPU has. Writes
benchmarks/results/vllm_TAG.md and .json. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import MODELS, RESULTS, austen, model_path  # noqa: E402  (same model prep and texts)

from modelpress.cli import main as modelpress  # noqa: E402
from modelpress.data import PPL_512, read_text, token_windows  # noqa: E402
from modelpress.eval.compare import measure  # noqa: E402
from modelpress.eval.vllm import nll, run_vllm, scheme_summary  # noqa: E402
from modelpress.models import loading  # noqa: E402

KINDS = {  # name -> the modelpress command that writes it (SRC and OUT filled in)
    "float": ["export", "SRC", "--to", "hf", "--dtype", "float32", "-o", "OUT"],
    "structured": ["prune", "SRC", "--method", "structured", "--drop-layers", "4", "--mlp-keep", "0.75",
                   "--calib", "CALIB", "--no-quality-guard", "-o", "OUT"],
    "w8a8": ["compress", "SRC", "--method", "rtn", "--bits", "8", "--granularity", "channel",
             "--activations", "int8-dynamic", "-o", "OUT"],
    "w4a16": ["compress", "SRC", "--method", "rtn", "--bits", "4", "--group-size", "GROUP", "-o", "OUT"],
    "fp8": ["compress", "SRC", "--method", "rtn", "--format", "fp8", "-o", "OUT"],
    "nvfp4": ["compress", "SRC", "--method", "rtn", "--format", "nvfp4", "-o", "OUT"],
    "mxfp4": ["compress", "SRC", "--method", "rtn", "--format", "mxfp4", "-o", "OUT"],
}
LABELS = {"float": "float32 (export --to hf)", "structured": "structured: 4 layers dropped, 75% MLP channels",
          "w8a8": "W8A8 (RTN int8 channel, dynamic int8 inputs)", "w4a16": "W4A16 (RTN int4 gGROUP)",
          "fp8": "FP8 weights", "nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
WNA16 = {"w4a16"}  # vLLM's CPU WNA16 kernel takes bfloat16/float16 activations only


def rows_for(name: str, kinds: list[str], windows: int, dtype: str | None, work: Path) -> list[dict]:
    src = model_path(name)
    paths = {}
    for kind in kinds:
        out = work / f"{name}-{kind}"
        args = [str(src) if a == "SRC" else str(out) if a == "OUT" else str(austen("emma.txt")) if a == "CALIB"
                else str(MODELS[name]) if a == "GROUP" else a for a in KINDS[kind]]
        if modelpress(args) != 0:
            raise SystemExit(f"modelpress {' '.join(args)} failed")
        paths[kind] = out
    text = austen("pride_and_prejudice.txt")
    ids = token_windows(loading.load_tokenizer(loading.resolve(src)), read_text(text),
                        replace(PPL_512, n_windows=windows)).tolist()
    run_dtype = {k: dtype or ("bfloat16" if k in WNA16 else "float32") for k in kinds}
    ran = run_vllm([{"name": k, "path": str(p), "windows": ids, "dtype": run_dtype[k], "parse": k not in
                     ("float", "structured"), "max_model_len": len(ids[0]) + 16} for k, p in paths.items()])
    rows = []
    for result in ran["models"]:
        kind = result["name"]
        ours = measure(str(paths[kind]), str(text), windows)["ppl"]
        row = {"model": name, "kind": kind, "label": LABELS[kind].replace("GROUP", str(MODELS[name])),
               "dtype": run_dtype[kind], "vllm": ran["vllm_version"], "library": ran["kernel_library"],
               "ours_ppl": ours, "load_seconds": result.get("load_seconds"), "eval_seconds": result.get("eval_seconds")}
        if result["failed_at"] is None:
            total, n = nll(result)
            row.update(status="ran", vllm_ppl=math.exp(total / n), ratio=math.exp(total / n) / ours,
                       schemes=scheme_summary(result["schemes"]))
        else:
            parsed = [v[0] for k, v in (result.get("parsed") or {}).items() if k != "config"]
            row.update(status="loaded, failed to run" if result["failed_at"] == "run" else "parsed only",
                       error=result["error"].splitlines()[0][:160],
                       schemes={str(s): parsed.count(s) for s in dict.fromkeys(parsed)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render(rows: list[dict], windows: int) -> str:
    first = rows[0]
    lines = [f"vLLM {first['vllm']} (kernel library {first['library']}) against our evaluator (transformers, "
             f"float32) on the same checkpoints: ppl-512, {windows} windows of pride_and_prejudice.txt. "
             "Each model's rows ran alone on the machine, in one vLLM process.", "",
             "| model | output | vLLM dtype | vLLM ran it as | vLLM ppl | our ppl | vLLM / ours |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        schemes = ", ".join(f"{k} x{n}" for k, n in r["schemes"].items())
        if r["status"] == "ran":
            lines.append(f"| {r['model']} | {r['label']} | {r['dtype']} | {schemes} | {r['vllm_ppl']:.3f} | "
                         f"{r['ours_ppl']:.3f} | {r['ratio']:.4f} |")
        else:
            lines.append(f"| {r['model']} | {r['label']} | {r['dtype']} | {r['status']}: scheme {schemes}; "
                         f"{r['error']} | - | {r['ours_ppl']:.3f} | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--dtype", help="vLLM's activation dtype for every row (default: float32, bfloat16 for int4)")
    parser.add_argument("--tag", default="cpu", help="results file suffix (cpu, gpu)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += rows_for(name, args.kinds.split(","), args.windows, args.dtype, Path(tmp))
    (RESULTS / f"vllm_{args.tag}.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=1))
    (RESULTS / f"vllm_{args.tag}.md").write_text(render(rows, args.windows))
    print(render(rows, args.windows))


if __name__ == "__main__":
    main()
