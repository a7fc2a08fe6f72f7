"""Write a model in a format an engine or a hub release uses.

Example:
    modelpress export SmolLM2-135M-Instruct.Q4_1.gguf --to hf --dtype bfloat16 -o smollm2-135m
    modelpress export smollm2-135m --to gguf --format q4_k_m -o smollm2-q4_k_m.gguf

``--to`` names the container and ``--format`` the weight format, as ``--format`` does in
``compress``. The earlier spellings (``--format hf|gguf`` for the container, ``--type`` for the
GGUF type) still work in this release, with a warning that says what to write instead.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modelpress.cli import options
from modelpress.pipeline.recipe import CalibrationConfig
from modelpress.errors import UserError
from modelpress.export.hf import DTYPES, export_hf

logger = logging.getLogger("modelpress")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_output(parser, "output folder (hf) or .gguf file (gguf); must not exist")
    parser.add_argument("--to", choices=["hf", "gguf"],
                        help="container: hf, a plain float safetensors checkpoint (default); gguf, one file for "
                             "llama.cpp (the default when --format names a GGUF type)")
    parser.add_argument("--format", dest="weight_format", metavar="SPEC",
                        help="gguf: a llama.cpp file type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, "
                             "q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (q3_k, q4_k, q5_k mean the _m "
                             "mixes, as in llama-quantize; default f16)")
    parser.add_argument("--type", dest="old_type", help=argparse.SUPPRESS)  # deprecated: --format's GGUF meaning
    parser.add_argument("--pure", action="store_true",
                        help="gguf: the type's block type for every quantizable tensor, not llama.cpp's mix")
    parser.add_argument("--verify", action="store_true",
                        help="gguf: load the file in llama.cpp and check its ppl-512 on --text against ours "
                             "for the same weights (within 1%%; the file is removed if not)")
    g = options.add_calibration(parser, "calibrated GGUF (--calibrate gptq)")
    g.add_argument("--calibrate", choices=["gptq"],
                   help="gguf: GPTQ chooses the decoder Linears' codes on the block grids of the type "
                        "(same types and size as llama.cpp's quantizer, lower error)")
    options.add_damp(g)
    options.add_eval_text(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="float dtype of the weights (default bfloat16)")


def container_and_format(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(container, weight format)`` from ``--to``/``--format``, and the spellings before 0.2."""
    to, fmt = args.to, args.weight_format
    if fmt in ("hf", "gguf"):
        logger.warning("export --format %s is deprecated (it named the container); write --to %s", fmt, fmt)
        to, fmt = to or fmt, None
    if args.old_type is not None:
        logger.warning("export --type is deprecated; write --format %s", args.old_type)
        fmt = fmt or args.old_type
    to = to or ("gguf" if fmt else "hf")
    if to == "hf" and fmt is not None:
        raise UserError(f"--to hf writes float weights (choose them with --dtype); --format {fmt} applies to --to gguf")
    return to, fmt


def main(args: argparse.Namespace) -> int:
    options.check_new_output(args.output)
    container, weight_format = container_and_format(args)
    if container == "gguf":
        gguf_type = weight_format or "f16"
        from modelpress.export.gguf import export_gguf

        if args.verify and args.text is None:
            raise UserError("--verify needs --text FILE to compute perplexity on")
        if args.calibrate:
            from modelpress.calibrated_gguf import export_calibrated_gguf

            options.check_calibration_source(args)
            calibration = CalibrationConfig(**options.calibration_fields(args))
            result = export_calibrated_gguf(args.model, args.output, gguf_type, calibration, pure=args.pure,
                                            damp=args.damp)
        else:
            result = export_gguf(args.model, args.output, gguf_type, pure=args.pure)
        types = ", ".join(f"{n} {t}" for t, n in sorted(result["types"].items()))
        print(f"wrote {args.output}: {result['tensors']} tensors ({types}), {result['bytes'] / 1e6:,.1f} MB")
        if "calibrated" in result:
            c = result["calibrated"]
            print(f"GPTQ on {c['linears']} Linears of {c['layers']} layers from {c['tokens']:,} calibration tokens; "
                  f"mean relative output error {c['output_rel_mse'] or 0:.2e}")
        if args.verify:
            _verify_gguf(args)
        return 0
    result = export_hf(args.model, args.output, args.dtype)
    print(f"wrote {args.output}: {result['tensors']} tensors, {result['bytes'] / 1e6:,.1f} MB in {args.dtype}")
    return 0


def _verify_gguf(args: argparse.Namespace) -> None:
    """llama.cpp's ppl of the written file vs ours for the same weights; remove the file if they disagree."""
    from dataclasses import replace

    from modelpress.data import PPL_512, read_text, token_windows
    from modelpress.eval.llamacpp import gguf_weights_model, llama_cpp_ppl
    from modelpress.eval.perplexity import evaluate
    from modelpress.models import loading

    tokenizer = loading.load_tokenizer(loading.resolve(args.model))
    windows = token_windows(tokenizer, read_text(args.text), replace(PPL_512, n_windows=args.windows))
    theirs = llama_cpp_ppl(args.output, windows)
    ours = evaluate(gguf_weights_model(args.model, args.output), windows).ppl
    rel = abs(theirs / ours - 1)
    print(f"ppl-512 ({len(windows)} windows): llama.cpp {theirs:.3f}, modelpress {ours:.3f} (differ by {100 * rel:.2f}%)")
    if rel > 0.01:
        Path(args.output).unlink()
        raise UserError(f"llama.cpp's perplexity differs from ours by {100 * rel:.2f}% (> 1%): the file does not "
                        "hold what we meant; removed it. Please report this with the model and --format")
