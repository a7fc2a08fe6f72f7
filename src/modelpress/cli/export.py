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
    parser.add_argument("--format", choices=["hf"], default="hf",
                        help="hf: plain float safetensors checkpoint (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="float dtype of the weights (default bfloat16)")


def main(args: argparse.Namespace) -> int:
    if Path(args.output).exists():
        raise UserError(f"output {args.output} already exists; choose a new folder or remove it")
    result = export_hf(args.model, args.output, args.dtype)
    print(f"wrote {args.output}: {result['tensors']} tensors, {result['bytes'] / 1e6:,.1f} MB in {args.dtype}")
    return 0
