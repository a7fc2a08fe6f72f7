"""Digests of what the README's commands write for tiny models of several architectures.

Run it before and after a change that must not change behaviour (a refactor of the runner, the
stages or the writers), and compare the two outputs: every line must be equal. Each line is one
output: the sha256 of its tensors (name, dtype, shape, bytes, in name order) and of its
``quantization_config``, or of the whole file for GGUF. Run records (``modelpress.json``) are
left out: they hold times and versions.

    .venv/bin/python scripts/output_digest.py > before.txt
    ... change ...
    .venv/bin/python scripts/output_digest.py > after.txt && diff before.txt after.txt

Calibrated runs use the built-in text, so nothing outside the repository is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_tiny_model, train_tokenizer  # noqa: E402  (the test suite's tiny models)

ARCHS = ("llama", "qwen2", "gemma3_text", "opt", "mixtral")
CALIB = {"samples": 4, "seq_len": 64, "batch_size": 2}


def _runs() -> dict[str, list[str]]:
    """Output name -> ``modelpress`` arguments (MODEL and OUT are filled in)."""
    calib = ["--calib-samples", str(CALIB["samples"]), "--calib-seq-len", str(CALIB["seq_len"])]
    return {
        "rtn-int4-g32": ["compress", "--method", "rtn", "--bits", "4", "--group-size", "32"],
        "gptq-int4-g32": ["compress", "--method", "gptq", "--bits", "4", "--group-size", "32", *calib],
        "gptq-nvfp4": ["compress", "--method", "gptq", "--format", "nvfp4", *calib],
        "awq-int3-g32-asym": ["compress", "--method", "awq", "--bits", "3", "--group-size", "32", "--asymmetric",
                              *calib],
        "smoothquant-static-gptq": ["compress", "--method", "smoothquant", "--activations", "static",
                                    "--weights", "gptq", *calib],
        "gguf-q4_k_m": ["export", "--to", "gguf", "--format", "q4_k_m"],
        "gguf-q4_k_m-gptq": ["export", "--to", "gguf", "--format", "q4_k_m", "--calibrate", "gptq", *calib],
    }


def digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()[:16]
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    config = json.loads((path / "config.json").read_text())
    h.update(json.dumps(config.get("quantization_config"), sort_keys=True).encode())
    return h.hexdigest()[:16]


def main() -> int:
    from modelpress.cli import main as cli

    logging.disable(logging.WARNING)
    tokenizer = train_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        for i, arch in enumerate(ARCHS):
            model = make_tiny_model(Path(tmp) / arch, arch, tokenizer, seed=i)
            for name, args in _runs().items():
                out = Path(tmp) / (f"{arch}-{name}" + (".gguf" if "gguf" in name else ""))
                if args[0] == "export" and arch in ("opt", "mixtral"):
                    continue  # no GGUF writer for these architectures
                if name.startswith(("awq", "smoothquant", "rtn")) and arch == "mixtral":
                    continue  # fused experts: RTN refuses them, AWQ/SmoothQuant have no expert pairs
                with contextlib.redirect_stdout(sys.stderr):  # the commands' own lines hold times
                    code = cli([args[0], str(model), *args[1:], "-o", str(out)] +
                               (["--no-quality-guard"] if args[0] == "compress" else []))
                print(f"{arch:12} {name:26} " + (digest(out) if code == 0 else f"exit {code}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
