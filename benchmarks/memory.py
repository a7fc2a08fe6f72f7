"""Peak memory of calibrated compression vs the model's size: the path that lets a big model fit.

Builds a randomly initialised Llama-architecture model large enough that its weights dominate
the process's fixed costs (default ~0.5 B parameters, 2 GB in float32), saves it as a sharded
safetensors checkpoint, and measures peak resident memory (``/usr/bin/time``'s max RSS) of:

- ``load``: plain ``AutoModelForCausalLM.from_pretrained`` in float32 and one forward pass (what a
  whole-model tool holds before it can start; the forward touches every weight, so memory-mapped
  tensors count);
- ``modelpress gptq``: ``modelpress compress --method gptq`` (layer by layer, layers read from the
  shards on demand).

Usage:
    .venv/bin/python benchmarks/memory.py [--hidden 1536] [--layers 16] [--calib-samples 16]

Writes benchmarks/results/memory.md and .json. Weights are random, so only memory and time mean
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
SHARED_DATA = ROOT.parent / "shared" / "data" / "austen"


def build_model(path: Path, hidden: int, layers: int, vocab: int) -> int:
    """Save a random Llama of the given size to ``path``; return its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CACHE  # the converted real models: borrow SmolLM2's tokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mp-memory-"))
    try:
        model = work / "model"
        n_params = build_model(model, args.hidden, args.layers, args.vocab)
        fp32_mb = n_params * 4 / 2**20
        py = str(ROOT / ".venv/bin/python")
        load = [py, "-c", "import sys, torch; from transformers import AutoModelForCausalLM; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
                "m(torch.ones(1, 8, dtype=torch.long))", str(model)]
        compress = [str(ROOT / ".venv/bin/modelpress"), "compress", str(model), "--method", "gptq", "--bits", "4",
                    "--group-size", "128", "--calib", str(SHARED_DATA / "emma.txt"), "--calib-samples",
                    str(args.calib_samples), "-o", str(work / "out")]
        rows = [{"run": "float32 size of the weights", "peak_rss_mb": fp32_mb}]
        for name, cmd in [("load whole model (transformers)", load), ("modelpress compress --method gptq", compress)]:
            rss, wall = peak_rss(cmd)
            rows.append({"run": name, "peak_rss_mb": rss, "wall_s": wall})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"params": n_params, "rows": rows}, indent=2))
    lines = [f"random Llama, {n_params / 1e6:.0f} M parameters ({args.layers} layers, hidden {args.hidden}); "
             f"GPTQ int4 g128, {args.calib_samples} x 512 calibration tokens", "",
             "| run | peak RSS MB | × float32 weights |", "| --- | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / fp32_mb:.2f} |" for r in rows]
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
