"""Mixed precision against uniform formats and the first/last-layers heuristic, at equal bytes.

For each model: one sensitivity pass (every Linear's GPTQ output error and bytes in int8,
int4/int3 at groups 128 and 64, int2-g64, or float) and the KL probes, then GPTQ for real on:

- uniform int3 and int4 (the model's group size: 64 on SmolLM2, whose width 576 is not a
  multiple of 128) and int8;
- the heuristic "first and last layers in 8 bits": int3 (int4) everywhere, whole layers taken
  alternately from both ends into int8 up to 3.5 (4.5) bits per Linear weight;
- the mixed allocation (``modelpress.fit``, objective ``kl``) at exactly the bytes of each of
  those, and at 4.0 bits per Linear weight.

Every row: same calibration ids (calib-128x512 on Emma), same GPTQ settings (modelpress's
defaults), evaluated by the same code (ppl-512 on Pride and Prejudice). Bits/weight count the
decoder Linears only (embeddings and norms stay in the checkpoint's dtype in every row).

Usage (from the project root, after scripts/setup.sh):
    .venv/bin/python benchmarks/mixed.py [--models smollm2,gemma3] [--rows all|uniform,heuristic,mixed]
        [--only "mixed at = uniform int3,4.0 bits"]

Writes benchmarks/results/mixed.md, .json and mixed.svg (ppl against bits per weight) after every row.
The sensitivity of each model is kept in runs/mixed-bench/ and reused by later invocations.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from calibrated import MODELS, RESULTS, Table, model_path, perplexity, timed  # noqa: E402
from conftest import austen  # noqa: E402

from modelpress.data import CALIB_128X512, PPL_512, read_text, token_windows  # noqa: E402

WORK = ROOT / "runs" / "mixed-bench"


CANDIDATES = ["int8", "int4-g128", "int4-g64", "int3-g128", "int3-g64", "int2-g64", "keep"]


def sensitivity(name: str, src: Path, calib_samples: int, candidates=CANDIDATES, fused: bool = True,
                work: Path = WORK, embeddings: bool = False):
    """The model's sensitivity (GPTQ codes) with KL probes on those codes, measured once and kept in
    ``work``; with ``embeddings`` (llama.cpp's types), the embedding and output head as choices too."""
    from modelpress.fit.sensitivity import measure_embeddings
    from modelpress.fit.sensitivity import Sensitivity, measure_sensitivity, probe_gains
    from modelpress.pipeline.recipe import CalibrationConfig, GPTQConfig

    path = work / f"{name}-sensitivity-{calib_samples}.json"
    sens = Sensitivity.load(path) if path.is_file() else None
    config = GPTQConfig(calibration=CalibrationConfig(text=str(austen("emma.txt")), samples=calib_samples))
    if sens is None or sens.probe_codes != "gptq":
        probes = work / f"{name}-probe-weights"
        sens = measure_sensitivity(str(src), list(candidates), config, "gptq", probe_dir=probes, fused=fused)
        probe_gains(sens, config, probe_dir=probes)
        sens.save(path)
        shutil.rmtree(probes)
    if embeddings and not any(s.kl_measured for s in sens.linears.values()):
        measure_embeddings(sens, config)
        sens.save(path)
    return sens


def allocations(sens, group: int, kinds: set[str]) -> list[tuple[str, str, dict]]:
    """``(kind, label, Linear -> format)`` of every row, in the order they are measured."""
    from modelpress.fit.allocate import allocate, ends_high, uniform

    n = sum(s.numel for s in sens.linears.values())

    def at_bits(bits: float) -> float:
        return sens.fixed_bytes + bits * n / 8

    u3, u4 = f"int3-g{group}", f"int4-g{group}"
    rows = []
    if "uniform" in kinds:
        rows += [("uniform", f"uniform {u}", uniform(sens, u)) for u in (u3, u4, "int8")]
    heuristics = [("heuristic", f"{u3} + int8 first/last layers", ends_high(sens, u3, "int8", at_bits(3.5))),
                  ("heuristic", f"{u4} + int8 first/last layers", ends_high(sens, u4, "int8", at_bits(4.5)))]
    if "heuristic" in kinds:
        rows += heuristics
    if "mixed" in kinds:
        targets = [("= " + label, sens.bytes_of(choice)) for _, label, choice in
                   [("", f"uniform {u3}", uniform(sens, u3)), ("", f"uniform {u4}", uniform(sens, u4)), *heuristics]]
        targets.append(("4.0 bits", at_bits(4.0)))
        rows += [("mixed", f"mixed at {label}", allocate(sens, budget, "kl")) for label, budget in targets]
    return rows


def compress_one(spec_file: Path) -> None:
    """In a child process: GPTQ with per-Linear formats (the row's allocation)."""
    from modelpress.compress import compress
    from modelpress.pipeline.recipe import CalibrationConfig, GPTQConfig

    spec = json.loads(spec_file.read_text())
    config = GPTQConfig(format=spec["default"], overrides=spec["overrides"],
                        calibration=CalibrationConfig(text=str(austen("emma.txt")), samples=spec["calib_samples"]))
    compress(spec["src"], config, spec["out"], quality_guard=False)


def render(rows: list[dict]) -> str:
    lines = ["| model | allocation | bits/weight (Linears) | tensors MB | formats | predicted KL | ppl | Δ vs float | wall s | peak RSS MB |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    floats = {r["model"]: r["ppl"] for r in rows if r["tool"] == "float32"}
    for r in sorted(rows, key=lambda r: (r["model"], r.get("bits", 99), r["method"])):
        if r["tool"] == "float32":
            lines.append(f"| {r['model']} | float | | | | | {r['ppl']:.3f} | | | |")
            continue
        mix = ", ".join(f"{k} {v}" for k, v in r["formats"].items())
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']:.3f} | {r['bytes'] / 1e6:.1f} | {mix} | "
                     f"{r['predicted_kl']:.4f} | {r['ppl']:.3f} | {100 * (r['ppl'] / floats[r['model']] - 1):+.2f}% | "
                     f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def caption(protocol: dict) -> str:
    return (f"calibration: {protocol['calib_samples']} x {CALIB_128X512.seq_len} tokens of emma.txt; evaluation: "
            f"ppl-512 ({protocol['windows']} windows) on pride_and_prejudice.txt. GPTQ (modelpress defaults) in every "
            "row; only the per-Linear formats differ. Mixed: `modelpress.fit` allocation (KL objective) at exactly "
            "the bytes of the row it names. Rows ran one at a time; wall times are not comparable where the "
            "README says other work ran beside them.")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["tool"] != "float32" and r["bits"] < 7]
        for kind, marker in (("uniform", "o"), ("heuristic", "s"), ("mixed", "^")):
            pts = sorted((r["bits"], r["ppl"]) for r in mine if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle="-" if kind == "mixed" else "none", label=kind)
        base = next((r["ppl"] for r in rows if r["model"] == model and r["tool"] == "float32"), None)
        if base:
            ax.axhline(base, color="grey", linestyle=":", label="float")
        ax.set(title=model, xlabel="bits per Linear weight", ylabel="ppl-512", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed.svg")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--rows", default="uniform,heuristic,mixed")
    parser.add_argument("--only", metavar="TEXT", help="only the rows whose label contains TEXT (comma-separated: any)")
    parser.add_argument("--calib-samples", type=int, default=CALIB_128X512.n_windows)
    parser.add_argument("--windows", type=int, default=PPL_512.n_windows)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: compress one row in a child process
    args = parser.parse_args()
    if args.one:
        compress_one(Path(args.one))
        return
    from collections import Counter

    from safetensors.torch import save_file

    from modelpress.models import loading

    WORK.mkdir(parents=True, exist_ok=True)
    table = Table(args.calib_samples, args.windows, fresh=False, stem="mixed", caption=caption, render=render)
    for name in args.models.split(","):
        src, group = model_path(name), MODELS[name]
        tokenizer = loading.load_tokenizer(loading.resolve(src))
        evaluation = token_windows(tokenizer, read_text(austen("pride_and_prejudice.txt")), PPL_512)[:args.windows]
        eval_file = WORK / f"{name}-eval.safetensors"
        save_file({"input_ids": evaluation.contiguous()}, eval_file)
        table.add({"model": name, "tool": "float32", "method": "-", "ppl": perplexity(src, eval_file)})
        sens = sensitivity(name, src, args.calib_samples)
        n = sum(s.numel for s in sens.linears.values())
        for kind, label, choice in allocations(sens, group, set(args.rows.split(","))):
            if choice is None or (args.only and not any(t in label for t in args.only.split(","))):
                continue
            default = Counter(choice.values()).most_common(1)[0][0]
            spec = {"src": str(src), "out": str(WORK / f"{name}-row"), "default": default,
                    "overrides": {re.escape(m): f for m, f in choice.items() if f != default},
                    "calib_samples": args.calib_samples}
            spec_file = WORK / f"{name}-row.json"
            spec_file.write_text(json.dumps(spec))
            shutil.rmtree(spec["out"], ignore_errors=True)
            stats = timed([sys.executable, __file__, "--one", str(spec_file)])
            ppl = perplexity(Path(spec["out"]), eval_file)
            predicted = sum(sens.gain(s.group, choice[m]) * s.errors[choice[m]] for m, s in sens.linears.items())
            table.add({"model": name, "tool": "modelpress", "method": label, "kind": kind,
                       "bits": 8 * (sens.bytes_of(choice) - sens.fixed_bytes) / n, "bytes": sens.bytes_of(choice),
                       "formats": dict(Counter(choice.values()).most_common()), "predicted_kl": predicted,
                       "ppl": ppl, **stats})
            shutil.rmtree(spec["out"])
            plot(json.loads((RESULTS / "mixed.json").read_text())["rows"])
    print((RESULTS / "mixed.md").read_text())


if __name__ == "__main__":
    main()
