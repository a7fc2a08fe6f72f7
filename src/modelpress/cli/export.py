"""Write a model in a format an engine or a hub release uses.

Example:
    modelpress export SmolLM2-135M-Instruct.Q4_1.gguf --format hf --dtype bfloat16 -o smollm2-135m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpress.errors import UserError
from modelpress.export.hf import DTYPES, export_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, .gguf file or hub id")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must not exist)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="hf: plain float safetensors checkpoint (default); gguf: one file for llama.cpp")
    parser.add_argument("--type", default="f16", metavar="T",
                        help="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k (default f16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="float dtype of the weights (default bfloat16)")


def main(args: argparse.Namespace) -> int:
    if Path(args.output).exists():
        raise UserError(f"output {args.output} already exists; choose a new folder or remove it")
    if args.format == "gguf":
        from modelpress.export.gguf import export_gguf

        result = export_gguf(args.model, args.output, args.type)
        types = ", ".join(f"{n} {t}" for t, n in sorted(result["types"].items()))
        print(f"wrote {args.output}: {result['tensors']} tensors ({types}), {result['bytes'] / 1e6:,.1f} MB")
        return 0
    result = export_hf(args.model, args.output, args.dtype)
    print(f"wrote {args.output}: {result['tensors']} tensors, {result['bytes'] / 1e6:,.1f} MB in {args.dtype}")
    return 0
