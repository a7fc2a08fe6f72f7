"""Peak memory of calibrated compression vs the model's size: the path that lets a big model fit.

Builds randomly initialised Llama-architecture models of one width and several depths (default
hidden 1536 with 16 and 48 layers: 0.55 B and 1.4 B parameters, 2.1 and 5.4 GB in float32), saves
each as a sharded safetensors checkpoint, and measures peak resident memory (``/usr/bin/time``'s
max RSS) of:

- ``load``: plain ``AutoModelForCausalLM.from_pretrained`` in float32 and one forward pass (what a
  whole-model tool holds before it can start; the forward touches every weight, so memory-mapped
  tensors count);
- ``modelpress gptq``: ``modelpress compress --method gptq`` (layer by layer, layers read from the
  shards on demand).

Usage:
    .venv/bin/python benchmarks/memory.py [--hidden 1536] [--layers 16,48] [--calib-samples 16]

A layer-by-layer run holds one decoder layer, its calibration activations and the process's
fixed costs (Python, torch, the model skeleton), so its peak should not grow with depth while the
float32 size does: comparing depths shows that, where one model alone mostly shows fixed costs.

Writes benchmarks/results/memory.md and .json (rows of depths not measured in this run are kept). Weights are random, so only memory and time mean
anything here; quality is measured by benchmarks/calibrated.py on real models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CACHE, austen  # noqa: E402  (the converted real models and the texts, as the tests find them)


def build_model(path: Path, hidden: int, layers: int, vocab: int) -> int:
    """Save a random Llama of the given size to ``path``; return its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(CACHE / "smollm2-135m")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=max(vocab, len(tokenizer)),
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="500MB")
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """``(peak RSS MB, wall s)`` of a command run under ``/usr/bin/time``."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = t.read().split()[-2:]
    return int(rss_kb) / 1024, float(wall)


def measure(hidden: int, layers: int, vocab: int, calib_samples: int) -> dict:
    """Peak RSS of loading and of compressing one random model of the given shape."""
    work = Path(tempfile.mkdtemp(prefix="mp-memory-"))
    try:
        model = work / "model"
        n_params = build_model(model, hidden, layers, vocab)
        fp32_mb = n_params * 4 / 2**20
        py = str(ROOT / ".venv/bin/python")
        load = [py, "-c", "import sys, torch; from transformers import AutoModelForCausalLM; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
                "m(torch.ones(1, 8, dtype=torch.long))", str(model)]
        compress = [str(ROOT / ".venv/bin/modelpress"), "compress", str(model), "--method", "gptq", "--bits", "4",
                    "--group-size", "128", "--calib", str(austen("emma.txt")), "--calib-samples",
                    str(calib_samples), "-o", str(work / "out"),
                    "--no-quality-guard"]  # the guard loads the model whole; this measures the layer loop
        result = {"hidden": hidden, "layers": layers, "params": n_params, "float32_mb": fp32_mb}
        for key, cmd in [("load", load), ("compress", compress)]:
            rss, wall = peak_rss(cmd)
            result[key] = {"peak_rss_mb": rss, "wall_s": wall}
        print(json.dumps(result), flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", default="16,48", help="depths to measure, comma-separated")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "memory.json"
    results = {}
    if saved.exists():  # rows of other shapes measured before are kept (same hidden size and calibration)
        old = json.loads(saved.read_text())
        if old.get("hidden") == args.hidden and old.get("calib_samples") == args.calib_samples:
            results = {r["layers"]: r for r in old["models"]}
    for layers in map(int, args.layers.split(",")):
        results[layers] = measure(args.hidden, layers, args.vocab, args.calib_samples)
    models = [results[k] for k in sorted(results)]
    saved.write_text(json.dumps({"hidden": args.hidden, "calib_samples": args.calib_samples, "models": models}, indent=2))
    lines = [f"random Llama models, hidden {args.hidden}, of several depths; GPTQ int4 g128, {args.calib_samples} x 512 "
             "calibration tokens; peak RSS by /usr/bin/time", "",
             "| layers | parameters | float32 weights MB | load whole model (transformers) MB | "
             "modelpress compress --method gptq MB | compress / float32 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {m['layers']} | {m['params'] / 1e6:.0f} M | {m['float32_mb']:.0f} | {m['load']['peak_rss_mb']:.0f} | "
              f"{m['compress']['peak_rss_mb']:.0f} | {m['compress']['peak_rss_mb'] / m['float32_mb']:.2f} |" for m in models]
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
